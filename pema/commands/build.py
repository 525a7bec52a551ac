"""PLM owner's stage on Ray: build the train and dev memories with Ray Data actors and export the head bundle.

    pema build --config jobs/configs/smoke.yaml --output-dir outputs/smoke [resources.memory_actors=2 ...]

Writes <output-dir>/memory/train, <output-dir>/memory/dev and <output-dir>/head. One encoder actor per GPU (or
resources.memory_actors CPU actors); the driver writes every part. Rerunning after a crash or a kill resumes: finished
parts in memory/<split>.partial/ are kept (their sha256 is checked), the rest are rebuilt.
"""
from __future__ import annotations

import json

from pema.jobs.cli import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, prog="pema build", splits=("train", "dev")).parse_args(argv)

    def stage(cfg):
        from pema.jobs import stages

        return stages.build(cfg, args.output_dir, progress=not args.no_progress)

    return run_job(args, stage, show=json.dumps)

