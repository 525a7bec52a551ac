"""Register the trained adapter in the MLflow Model Registry; move the alias `champion` only if it is better.

    pema register --config jobs/configs/default.yaml --output-dir outputs/default --name pema-wmt22

Logs <output-dir>/adapter + head + the config as a pyfunc model (text -> text), registers a new version of --name,
measures its dev BLEU as the `pema` row, under decode.pema (unless --dev-bleu is given), and points `champion` at it
when it beats the current champion's dev BLEU. Logs to MLFLOW_TRACKING_URI, or to <output-dir>/mlflow.db without it.
"""
from __future__ import annotations

import json

from pema.jobs.cli import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, prog="pema register", splits=("dev",))
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--dev-bleu", type=float, help="the adapter's dev BLEU when already measured (Tune)")
    args = parser.parse_args(argv)

    def stage(cfg):
        from pema.jobs.stages import register

        return register(cfg, args.output_dir, args.name, dev_bleu=args.dev_bleu, progress=not args.no_progress)

    # the dev pairs are decoded only when --dev-bleu is not given
    return run_job(args, stage, show=json.dumps, inputs=("dev",) if args.dev_bleu is None else (),
                   bundles=("adapter/adapter.json", "head/head.json"))

