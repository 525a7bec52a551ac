"""Decode the test pairs with zero-shot, PEMA (constant lambda) and PEMA (Gradual Unrolling); score with sacreBLEU.

    pema evaluate --config jobs/configs/smoke.yaml --output-dir outputs/smoke [decode.gu.lam_max=0.8 ...]

Reads <output-dir>/head, adapter and memory/train/manifest.json; writes predictions/<system>.jsonl and
scores.json. Runs as a Ray task (on a GPU when resources.device is not cpu and the cluster has one).
"""
from __future__ import annotations

import json
from pathlib import Path

from pema.jobs.cli import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, prog="pema evaluate", splits=("test",)).parse_args(argv)

    def stage(cfg):
        from pema.jobs import stages
        from pema.stages.tables import format_table

        scores = stages.evaluate(cfg, args.output_dir, progress=not args.no_progress)
        path = Path(args.output_dir) / "scores.json"
        path.write_text(json.dumps(scores, indent=2, ensure_ascii=False))
        cut = [f"[data] {split}: {n:,} texts over data.max_tokens={cfg.data.max_tokens} cut to it"
               for split, n in scores.get("truncated", {}).items() if n]
        return "\n".join([*cut, format_table(scores), f"scores: {path}"])

    from pema.jobs.stages import ADAPTER_BUNDLES

    return run_job(args, stage, bundles=ADAPTER_BUNDLES)

