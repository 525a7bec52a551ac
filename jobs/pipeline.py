"""Run every PEMA stage on Ray: build the memories (Ray Data), train RCT -> RCT_PD (Ray Train), decode and score.

    python jobs/pipeline.py --config jobs/configs/default.yaml --output-dir outputs/default [key=value ...]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --config ...

Without RAY_ADDRESS or --address it starts a local Ray cluster in this process. MLflow: a parent run with the
stages as child runs, in MLFLOW_TRACKING_URI or <output-dir>/mlflow.db. Writes memory/, head/, adapter/,
predictions/ and summary.json under --output-dir.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pema.jobs.cli import job_parser, run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)

    def stage(cfg):
        from pema.jobs import stages
        from pema.stages.tables import format_table

        summary = stages.pipeline(cfg, args.output_dir, progress=not args.no_progress)
        return f"{format_table(summary)}\nsummary: {Path(args.output_dir) / 'summary.json'}"

    return run_job(args, stage)


if __name__ == "__main__":
    sys.exit(main())
