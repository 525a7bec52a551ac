"""``python jobs/compare.py ...`` is ``pema compare ...``
(:mod:`pema.commands.compare`); kept for scripts that call it."""
import sys

from pema.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
