"""``python jobs/register.py ...`` is ``pema register ...``
(:mod:`pema.commands.register`); kept for scripts that call it."""
import sys

from pema.commands.register import main

if __name__ == "__main__":
    sys.exit(main())
