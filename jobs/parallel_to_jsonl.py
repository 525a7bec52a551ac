"""Convert two parallel plain-text files (one segment per line) into the JSONL pairs the jobs read.

    python jobs/parallel_to_jsonl.py train.en train.de data/mine/train.jsonl --source-field en --target-field du
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pema.errors import PemaError  # noqa: E402
from pema.formats.tasks import parallel_to_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source"), parser.add_argument("target"), parser.add_argument("out")
    parser.add_argument("--source-field", default="en")
    parser.add_argument("--target-field", default="du")
    args = parser.parse_args(argv)
    try:
        n = parallel_to_jsonl(args.source, args.target, args.out, source_field=args.source_field,
                              target_field=args.target_field)
    except (PemaError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
