"""Data owner's stage on Ray Train: RCT, then RCT_PD, on resources.train_workers DDP workers.

    pema train --config jobs/configs/smoke.yaml --output-dir outputs/smoke [resources.train_workers=2 ...]

Reads <output-dir>/memory/{train,dev} and <output-dir>/head (from `pema build`); writes <output-dir>/adapter
and train_history.json. Checkpoints go to <output-dir>/ray_train; a crashed worker resumes from the last one.
"""
from __future__ import annotations

import json

from pema.jobs.cli import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, prog="pema train", splits=()).parse_args(argv)

    def stage(cfg):
        from pema.jobs import stages

        return stages.train(cfg, args.output_dir, progress=not args.no_progress)

    from pema.formats.layout import OWNER_BUNDLES as BUNDLES

    # the data owner's inputs are the memory and the head: it never loads the PLM
    return run_job(args, stage, show=json.dumps, model=False, bundles=BUNDLES)

