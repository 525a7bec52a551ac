"""New pairs arrive: retrain from the previous adapter (warm start) or from scratch? Measured on the NC dev pairs.

    .venv/bin/python bench/warm_start.py --output-dir bench_out/warm_start [--first 1000] [--total 1200]

1. The memory of the first ``--first`` NC training pairs is built and an adapter trained on it (``first``).
2. The train file grows to ``--total`` pairs: the build encodes only the new pairs, as version 2 of the memory.
3. On version 2, one adapter is trained from ``first`` (``train.warm_start=true``: only the joint phase) and one
   from scratch (RCT, then the joint phase), with the same settings (jobs/configs/default.yaml).
4. The three adapters decode the NC dev pairs (``pema``, ``decode.pema``), scored with sacreBLEU's paired bootstrap
   against ``scratch``.

Everything runs in this process on the inline executor (the stages are the jobs' own). The last line printed is
one JSON object with the build and training figures and the dev scores. Dev only: nothing here touches a test set.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from pema.config import load_config, with_absolute_data, with_overrides
from pema.executors.inline import InlineExecutor
from pema.formats.versions import version_of
from pema.formats.memory import read_manifest
from pema.stages.build import run_build
from pema.stages.decode import decode_and_score
from pema.stages.inputs import cleaned_splits, plm_or_client
from pema.stages.scoring import paired_significance
from pema.stages.train import run_train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "default.yaml"


class CountingExecutor(InlineExecutor):
    """The inline executor, counting the examples the build asks the PLM to encode."""

    examples = 0

    def encode(self, encoder_factory, items, *, cfg):
        items = list(items)
        self.examples += sum(len(b) for it in items for b in json.loads(it["batches"]))
        yield from super().encode(encoder_factory, items, cfg=cfg)


def _train(cfg, out: Path, keep_as: str) -> dict:
    result = run_train(cfg, out, InlineExecutor(), progress=False)
    shutil.copytree(out / "adapter", out / keep_as, dirs_exist_ok=True)
    last = result.phases[-1]
    return {"phases": [p["phase"] for p in result.phases], "steps": result.steps_total, "seconds": result.seconds,
            "best_val_loss": round(last["best_val"], 4), "best_step": last["best_step"],
            "last_val_ce": round(result.history[-1].get("val_ce", float("nan")), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="default: jobs/configs/default.yaml")
    parser.add_argument("--output-dir", default="bench_out/warm_start")
    parser.add_argument("--first", type=int, default=1000, help="NC training pairs of the first memory")
    parser.add_argument("--total", type=int, default=1200, help="NC training pairs after the new ones arrive")
    parser.add_argument("--dev-pairs", type=int, default=200, help="NC dev pairs decoded (default all 200)")
    parser.add_argument("overrides", nargs="*", help="config overrides, for every step")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    base = with_absolute_data(load_config(args.config, [*args.overrides, f"data.dev_limit={args.dev_pairs}"]))
    first_cfg = with_overrides(base, {"data.train_limit": args.first})
    grown = with_overrides(base, {"data.train_limit": args.total})
    report: dict = {"first_pairs": args.first, "total_pairs": args.total, "dev_pairs": args.dev_pairs}

    start = time.perf_counter()
    run_build(first_cfg, out, InlineExecutor(), progress=False)
    report["build_first_s"] = round(time.perf_counter() - start, 1)
    report["first"] = _train(first_cfg, out, "adapter_first")
    print(json.dumps({"step": "first", **report["first"]}), flush=True)

    counting, start = CountingExecutor(), time.perf_counter()
    run_build(grown, out, counting, progress=False)
    manifest = read_manifest(out / "memory" / "train")
    report["append"] = {"examples_encoded": counting.examples, "seconds": round(time.perf_counter() - start, 1),
                        "version": version_of(manifest), "rows": manifest.total_rows}
    print(json.dumps({"step": "append", **report["append"]}), flush=True)

    shutil.copytree(out / "adapter_first", out / "adapter", dirs_exist_ok=True)
    report["warm"] = _train(with_overrides(grown, {"train.warm_start": True}), out, "adapter_warm")
    print(json.dumps({"step": "warm", **report["warm"]}), flush=True)
    report["scratch"] = _train(grown, out, "adapter_scratch")
    print(json.dumps({"step": "scratch", **report["scratch"]}), flush=True)

    model, tokenizer = plm_or_client(grown)
    refs = [p.target for p in cleaned_splits(grown, "dev", tokenizer=tokenizer)[0]["dev"]]
    hyps = {}
    for name in ("scratch", "warm", "first"):
        scores = decode_and_score(grown, out, model=model, tokenizer=tokenizer, progress=False, split="dev",
                                  systems=("pema",), adapter_dir=out / f"adapter_{name}")
        kept = shutil.copy(out / "predictions" / "dev" / "pema.jsonl", out / f"dev_{name}.jsonl")
        lines = Path(kept).read_text(encoding="utf-8").splitlines()
        hyps[name] = [json.loads(x)["hypothesis"] for x in lines]
        report.setdefault("dev", {})[name] = {k: scores["pema"][k] for k in ("bleu", "chrf", "ter")}
    sig = paired_significance(hyps, refs, baseline="scratch")
    for name in ("warm", "first"):
        report["dev"][name]["vs_scratch_p"] = {m: sig[name][m]["p_value"] for m in ("bleu", "chrf", "ter")}
    for name in hyps:  # sacreBLEU's bootstrap 95% interval of each system's score
        report["dev"][name]["ci"] = {m: [sig[name][m]["ci_low"], sig[name][m]["ci_high"]] for m in ("bleu", "chrf",
                                                                                                   "ter")}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
