"""Registered adapters served on Ray Serve: POST http://127.0.0.1:PORT/adapters {"adapter": "NAME@champion",
"texts": [...]} -> {"model": "NAME/VERSION", "texts": [...]}, until Ctrl+C.

    python jobs/serve_adapters.py --config jobs/configs/default.yaml --output-dir outputs/default --port 8001

The registry is MLFLOW_TRACKING_URI or <output-dir>/mlflow.db. The base model is model.model_id here, or the owner's
service with resources.owner_url (then no PLM weights are loaded by this service).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pema.jobs.cli import run_job, serve_parser, serve_until_stopped  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = serve_parser(__doc__, 8001).parse_args(argv)

    def stage(cfg):
        from pema.config import to_dict
        from pema.jobs.serve_adapters import start_adapters
        from pema.tracking.runs import connect

        url = start_adapters(connect(args.output_dir), to_dict(cfg), port=args.port)
        return serve_until_stopped(url, "the registered adapters", args.once)

    return run_job(args, stage)


if __name__ == "__main__":
    sys.exit(main())
