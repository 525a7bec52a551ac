"""Split one JSONL file of pairs into train, dev and test by position, after hygiene (pema/formats/hygiene.py).

The held-out splits are the LAST pairs of the file (test last, dev before it), so they come from other documents
than the first training pairs; pairs whose content already appears earlier are dropped, as are same-text pairs and
targets in the source's language. How the shipped News Commentary splits (data/nc/) were made:

    pema split-heldout data/wmt22/train.jsonl data/nc --dev 200 --test 200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pema.errors import PemaError
from pema.formats.hygiene import TASK_LANGUAGES, clean_splits
from pema.formats.layout import write_text_atomic
from pema.formats.tasks import load_pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pema split-heldout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs"), parser.add_argument("out_dir")
    parser.add_argument("--dev", type=int, default=200), parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--template", default="wmt22_en_de", help="names the language pair (hygiene's language rule)")
    parser.add_argument("--source-field", default="en"), parser.add_argument("--target-field", default="du")
    args = parser.parse_args(argv)
    try:
        pairs = load_pairs(args.pairs, source_field=args.source_field, target_field=args.target_field)
    except (PemaError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    languages = TASK_LANGUAGES.get(args.template)
    whole, first = clean_splits({"all": pairs}, languages)
    kept = whole["all"]
    if len(kept) < args.dev + args.test + 1:
        print(f"error: {args.pairs} keeps {len(kept)} pairs after hygiene, fewer than --dev {args.dev} + --test "
              f"{args.test} + 1 training pair", file=sys.stderr)
        return 2
    cut_dev, cut_test = len(kept) - args.dev - args.test, len(kept) - args.test
    splits, second = clean_splits({"train": kept[:cut_dev], "dev": kept[cut_dev:cut_test],
                                   "test": kept[cut_test:]}, languages)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        write_text_atomic(out / f"{name}.jsonl", "".join(json.dumps(
            {args.source_field: p.source, args.target_field: p.target}, ensure_ascii=False) + "\n" for p in split))
    summary = {"input": args.pairs, "input_pairs": len(pairs), "hygiene": first.to_dict()["all"],
               "dropped_lines": {r: [i + 1 for i in v] for r, v in first.dropped["all"].items()},
               "splits": second.to_dict()}
    write_text_atomic(out / "split.json", json.dumps(summary, indent=2) + "\n")
    print("\n".join(first.lines() + second.lines()))
    return 0

