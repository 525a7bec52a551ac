"""Compare every system on the same test pairs: zero-shot, kNN-LM, LoRA and PEMA with its ablations.

    pema compare --config jobs/configs/default.yaml --output-dir outputs/default [--systems a,b]
        [--against zero_shot,knn_lm] [k=v ...]

Builds memory/ and head/ under --output-dir when they are missing (Ray Data), then trains and decodes every system
in one Ray task. Writes predictions/<system>.jsonl, compare/ (the trained adapters) and merges the rows into
summary.json. MLflow: a parent run "compare" with one child run per system, compare.png and compare.md.
Systems: zero_shot, knn_lm, lora, pema_pd_only, pema_no_rct, pema_const, pema_gu (default: all).
Every system is tested against each --against system (default: zero_shot) with sacreBLEU's paired bootstrap
(1,000 resamples, fixed seed): the table gets 95% intervals of BLEU and chrF and a p-value column per baseline.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pema.jobs.cli import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, prog="pema compare")
    parser.add_argument("--systems", default="all", help="comma separated systems to run (default: all)")
    parser.add_argument("--against", default=None, metavar="NAME[,NAME]",
                        help="comma separated systems (among those run) to test every system against with sacreBLEU's "
                             "paired bootstrap (default: zero_shot)")
    args = parser.parse_args(argv)
    from pema.errors import ConfigError
    from pema.stages.compare import check_against, check_systems

    try:
        systems = check_systems(args.systems)  # before Ray starts or anything is written
        against = check_against(args.against, systems)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def stage(cfg):
        from pema.jobs.compare import compare

        summary = compare(cfg, args.output_dir, systems=systems, progress=not args.no_progress, against=against)
        return f"{summary['compare_table']}\nsummary: {Path(args.output_dir) / 'summary.json'}"

    from pema.formats.layout import RunLayout

    # the dev pairs are read only to build a missing memory
    splits = ("train", "dev", "test") if RunLayout(args.output_dir).missing() else ("train", "test")
    return run_job(args, stage, inputs=splits)

