"""``python jobs/split_heldout.py ...`` is ``pema split-heldout ...``
(:mod:`pema.commands.split_heldout`); kept for scripts that call it."""
import sys

from pema.commands.split_heldout import main

if __name__ == "__main__":
    sys.exit(main())
