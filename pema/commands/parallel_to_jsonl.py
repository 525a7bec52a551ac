"""Convert two parallel plain-text files (one segment per line) into the JSONL pairs the jobs read.

    pema parallel-to-jsonl train.en train.de data/mine/train.jsonl --source-field en --target-field du
"""
from __future__ import annotations

import argparse
import sys

from pema.errors import PemaError
from pema.formats.tasks import parallel_to_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pema parallel-to-jsonl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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

