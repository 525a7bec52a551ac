"""``python jobs/serve_adapters.py ...`` is ``pema serve-adapters ...``
(:mod:`pema.commands.serve_adapters`); kept for scripts that call it."""
import sys

from pema.commands.serve_adapters import main

if __name__ == "__main__":
    sys.exit(main())
