"""``python -m pema <command> ...``: the ``pema`` command (:mod:`pema.commands`)."""
import sys

from pema.commands import main

if __name__ == "__main__":
    sys.exit(main())
