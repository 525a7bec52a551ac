"""``python jobs/pipeline.py ...`` is ``pema run ...`` (:mod:`pema.commands.run`); kept for scripts that call it."""
import sys

from pema.commands.run import main

if __name__ == "__main__":
    sys.exit(main())
