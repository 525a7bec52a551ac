"""Run every PEMA stage: build memories, export the head, train RCT -> RCT_PD, decode and score.

    python jobs/pipeline.py --config jobs/configs/default.yaml --output-dir outputs/default [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pema.config import load_config  # noqa: E402
from pema.errors import PemaError  # noqa: E402
from pema.pipeline import format_table, run_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("--output-dir", default="outputs/run", help="where memories, head, adapter, summary go")
    parser.add_argument("--train", help="training pairs JSONL (overrides data.train)")
    parser.add_argument("--dev", help="dev pairs JSONL (overrides data.dev)")
    parser.add_argument("--test", help="test pairs JSONL (overrides data.test)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.kappa=0.3")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.{name}={getattr(args, name)}" for name in ("train", "dev", "test") if getattr(args, name)]
    try:
        cfg = load_config(args.config, overrides)
        summary = run_pipeline(cfg, args.output_dir, progress=not args.no_progress)
    except (PemaError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"summary: {Path(args.output_dir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
