"""Ray Tune search over PEMA: ASHA over the training space, a decoding sweep on dev per surviving adapter, every
trial an MLflow child run, and the best (adapter, decoding setting) registered as `champion` if it is better.

    pema tune --config jobs/configs/default.yaml --output-dir outputs/tune --num-samples 4 \
        --decode-samples 4 --name pema-wmt22

Builds <output-dir>/memory and head first when they are missing. Interrupted (Ctrl+C, a lost driver)? Run the same
command again: the search resumes (Tuner.restore) and finished trials are not run again. Exit code 130 while
trials are unfinished. Writes <output-dir>/tune_summary.json and the winner's adapter at <output-dir>/adapter.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pema.jobs.cli import job_parser, run_job

ROOT = Path(__file__).resolve().parents[2]  # the repository (or the unpacked working dir of a `ray job submit`)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, prog="pema tune")
    parser.add_argument("--train-space", default=str(ROOT / "tune_spaces" / "train.yaml"))
    parser.add_argument("--decode-space", default=str(ROOT / "tune_spaces" / "decode.yaml"))
    parser.add_argument("--num-samples", type=int, default=4, help="training configurations to try")
    parser.add_argument("--decode-samples", type=int, default=4,
                        help="decoding settings per surviving adapter (0: the full grid)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials at once")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling of both spaces")
    parser.add_argument("--name", help="register the winner under this model name (moves `champion` if better)")
    args = parser.parse_args(argv)
    for flag in ("num_samples", "max_concurrent"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.decode_samples < 0:
        parser.error("--decode-samples must be >= 0")
    from pema.errors import PemaError
    from pema.executors.search_space import decode_grid, load_space

    try:  # a bad space fails here, before Ray starts or anything is written
        train_space = load_space(args.train_space, args.config)
        grid = decode_grid(load_space(args.decode_space, args.config), args.decode_samples, args.seed)
    except (PemaError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def stage(cfg):
        from pema.jobs import stages

        return stages.tune(cfg, args.output_dir, train_space=train_space, decode_grid=grid,
                           num_samples=args.num_samples, name=args.name, max_concurrent=args.max_concurrent,
                           seed=args.seed, progress=not args.no_progress)

    def show(summary):
        best = summary.get("best")
        rows = [f"{t['trial_id']:<14} {t['status']:<10} dev_ce={t['dev_ce']!s:<22} dev_bleu={t['dev_bleu']}"
                for t in summary["trials"]]
        tail = f"best: {json.dumps(best)}" if best else "unfinished: rerun the same command to resume"
        return "\n".join(rows + [tail])

    code = run_job(args, stage, show=show, inputs=("train", "dev"))  # the test pairs are not used
    summary_path = Path(args.output_dir) / "tune_summary.json"
    if code == 0 and summary_path.is_file() and json.loads(summary_path.read_text())["unfinished"]:
        return 130
    return code

