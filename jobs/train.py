"""``python jobs/train.py ...`` is ``pema train ...`` (:mod:`pema.commands.train`); kept for scripts that call it."""
import sys

from pema.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
