"""``python jobs/tune.py ...`` is ``pema tune ...`` (:mod:`pema.commands.tune`); kept for scripts that call it."""
import sys

from pema.commands.tune import main

if __name__ == "__main__":
    sys.exit(main())
