"""The label-private build against the teacher-forced one, on dev pairs: the PLM alone and PEMA of each run.

Each run folder holds a trained adapter (``make run`` leaves the teacher-forced one in ``outputs/default``; the
label-private one is built and trained through the owner's service with ``memory.keys=owner_greedy``, see
docs/results.md). Both are decoded here on the same dev pairs with the in-process PLM (decoding does not depend
on how the memory was built), and compared with sacreBLEU's paired bootstrap (chrF, TER, BLEU).

    python bench/label_private.py --runs outputs/default outputs/private --names teacher_forced owner_greedy
    python bench/label_private.py --runs outputs/default outputs/private data.dev=data/wmt22/dev.jsonl

Prints progress to stderr and ONE JSON object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/default.yaml"))
    p.add_argument("--runs", nargs=2, required=True, help="two run folders, each with adapter/ and head/")
    p.add_argument("--names", nargs=2, default=["teacher_forced", "owner_greedy"])
    p.add_argument("--split", default="dev")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.dev=data/wmt22/dev.jsonl (the WMT22 "
                                                "general dev pairs, out of the training domain)")
    args = p.parse_args(argv)

    from pema.config import load_config, with_absolute_data
    from pema.owner.plm import load_plm
    from pema.stages.decode import decode_and_score
    from pema.stages.inputs import cleaned_splits
    from pema.stages.scoring import significance_against

    cfg = with_absolute_data(load_config(args.config, args.overrides))
    model, tokenizer = load_plm(cfg.model.model_id, dtype=cfg.model.dtype)
    out: dict = {"split": args.split, "pairs_file": getattr(cfg.data, args.split), "config": args.config,
                 "runs": dict(zip(args.names, args.runs))}
    hyps: dict[str, list[str]] = {}
    for name, run in zip(args.names, args.runs):
        systems = ("zero_shot", "pema") if not hyps else ("pema",)
        print(f"decoding {args.split} with {name} ({run}) ...", file=sys.stderr, flush=True)
        summary = decode_and_score(cfg, run, model=model, tokenizer=tokenizer, split=args.split, systems=systems,
                                   progress=True)
        for system in systems:
            label = system if system == "zero_shot" else f"pema ({name})"
            out[label] = {k: summary[system][k] for k in ("bleu", "chrf", "ter") if k in summary[system]}
            with open(Path(run) / "predictions" / args.split / f"{system}.jsonl", encoding="utf-8") as f:
                hyps[label] = [json.loads(line)["hypothesis"] for line in f]
    pairs = cleaned_splits(cfg, args.split, tokenizer=tokenizer)[0][args.split]
    refs = [x.target for x in pairs]
    out["significance"] = significance_against(hyps, refs, ["zero_shot", f"pema ({args.names[0]})"])
    out["pairs"] = len(refs)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
