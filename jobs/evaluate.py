"""``python jobs/evaluate.py ...`` is ``pema evaluate ...``
(:mod:`pema.commands.evaluate`); kept for scripts that call it."""
import sys

from pema.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
