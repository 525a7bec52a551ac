"""``python jobs/serve_owner.py ...`` is ``pema serve-owner ...``
(:mod:`pema.commands.serve_owner`); kept for scripts that call it."""
import sys

from pema.commands.serve_owner import main

if __name__ == "__main__":
    sys.exit(main())
