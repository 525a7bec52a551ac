"""``python jobs/build_memory.py ...`` is ``pema build ...``
(:mod:`pema.commands.build`); kept for scripts that call it."""
import sys

from pema.commands.build import main

if __name__ == "__main__":
    sys.exit(main())
