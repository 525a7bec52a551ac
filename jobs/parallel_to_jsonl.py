"""``python jobs/parallel_to_jsonl.py ...`` is ``pema parallel-to-jsonl ...``
(:mod:`pema.commands.parallel_to_jsonl`); kept for scripts that call it."""
import sys

from pema.commands.parallel_to_jsonl import main

if __name__ == "__main__":
    sys.exit(main())
