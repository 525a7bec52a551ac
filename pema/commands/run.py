"""Run every PEMA stage on Ray: build the memories (Ray Data), train RCT -> RCT_PD (Ray Train), decode and score.

    pema run --config jobs/configs/default.yaml --output-dir outputs/default [key=value ...]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python -m pema run --config ...

Without RAY_ADDRESS or --address it starts a local Ray cluster in this process. MLflow: a parent run with the
stages as child runs, in MLFLOW_TRACKING_URI or <output-dir>/mlflow.db. Writes memory/, head/, adapter/,
predictions/ and summary.json under --output-dir.
"""
from __future__ import annotations

from pathlib import Path

from pema.jobs.cli import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, prog="pema run").parse_args(argv)

    def stage(cfg):
        from pema.jobs import stages
        from pema.stages.tables import format_table

        summary = stages.pipeline(cfg, args.output_dir, progress=not args.no_progress)
        return f"{format_table(summary)}\nsummary: {Path(args.output_dir) / 'summary.json'}"

    return run_job(args, stage)

