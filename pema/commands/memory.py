"""``pema memory``: the memory as a living dataset. Append pairs, delete pairs by source, list versions, collect old
ones.

    pema memory append   --config C --output-dir D --pairs new.jsonl        encode only the pairs the memory lacks
    pema memory delete   --config C --output-dir D --pairs gone.jsonl       withdraw pairs (or --ids HASH,HASH)
    pema memory versions --output-dir D [--split train|dev] [--json]        every version and what it changed
    pema memory gc       --output-dir D [--dry-run]                         drop versions no registered model uses

Append and delete are jobs like the others (Ray, an MLflow run each, the folder held). Each makes a new version of
``memory/train`` (append) or of every memory of the folder (delete); the next ``pema train`` trains on it (the
stage gate sees the manifest change) and logs it as its dataset input. See :mod:`pema.formats.versions` for the
files and :mod:`pema.stages.memory_versions` for the rules.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from pema.errors import ConfigError, PemaError
from pema.jobs.cli import check_output_dir, job_parser, run_job
from pema.formats.layout import OWNER_BUNDLES, RunLayout

SPLITS = ("train", "dev")
HASH = re.compile(r"[0-9a-f]{64}")


def _pairs_arg(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--pairs", required=required, help="JSONL pairs, the same fields as data.train")


def _no_pairs_file(args) -> bool:
    """True (and the error said) when ``--pairs`` names no readable file: checked before Ray or MLflow start."""
    from pathlib import Path

    if args.pairs is not None and not Path(args.pairs).is_file():
        print(f"error: --pairs {args.pairs}: no such file (give the JSONL file of pairs)", file=sys.stderr)
        return True
    return False


def _append(argv) -> int:
    parser = job_parser("Add the pairs of --pairs that memory/train lacks, encoding only them, as a new version.",
                        prog="pema memory append", splits=())
    _pairs_arg(parser, True)
    parser.add_argument("--split", choices=SPLITS, default="train", help="the memory to add to (default train)")
    args = parser.parse_args(argv)
    if _no_pairs_file(args):
        return 2

    def stage(cfg):
        from pema.executors.ray_executor import RayExecutor
        from pema.stages.build import append_memory
        from pema.stages.inputs import pairs_of_file
        from pema.tracking.logger import MLflowLogger

        pairs, report = pairs_of_file(cfg, args.pairs, held_out=True)
        for line in report.lines():
            print(f"[data] {line}")
        with MLflowLogger(cfg, args.output_dir).stage("memory_append") as logger:
            result = append_memory(cfg, RunLayout(args.output_dir).memory(args.split), pairs,
                                   RayExecutor(not args.no_progress), progress=not args.no_progress)
            _log(logger, result)
        return result

    return run_job(args, stage, show=_show, inputs=(), bundles=OWNER_BUNDLES)


def _delete(argv) -> int:
    parser = job_parser("Withdraw pairs (--pairs or --ids) from every memory of the folder, as a new version; their "
                        "rows, old parts and stored neighbours go at once.", prog="pema memory delete", splits=())
    _pairs_arg(parser, False)
    parser.add_argument("--ids", help="pair ids (sha256, as in versions/v*.json 'added'), comma-separated")
    args = parser.parse_args(argv)
    if (args.pairs is None) == (args.ids is None):
        print("error: give --pairs FILE.jsonl or --ids HASH[,HASH...], one of them", file=sys.stderr)
        return 2
    if _no_pairs_file(args):
        return 2
    ids = [] if args.ids is None else [x.strip().lower() for x in args.ids.split(",") if x.strip()]
    if args.ids is not None and (not ids or (bad := [x for x in ids if not HASH.fullmatch(x)])):
        print(f"error: --ids: {', '.join(bad) if ids else 'nothing given'} is not a pair id (64 hex digits, as "
              "listed in versions/v*.json)", file=sys.stderr)
        return 2

    def stage(cfg):
        from pema.formats.versions import pair_hash
        from pema.stages.build import delete_from_memory
        from pema.stages.inputs import pairs_of_file
        from pema.tracking.logger import MLflowLogger

        hashes = set(ids) or {pair_hash(p.source, p.target) for p in pairs_of_file(cfg, args.pairs,
                                                                                    held_out=False)[0]}
        results = {}
        with MLflowLogger(cfg, args.output_dir).stage("memory_delete") as logger:
            for split in SPLITS:
                results[split] = delete_from_memory(RunLayout(args.output_dir).memory(split), hashes)
                _log(logger, results[split], prefix=f"{split}/")
        found = len(set().union(*(r["deleted_ids"] for r in results.values())))
        print(f"[memory] {len(hashes)} pairs asked, {found} found and deleted; retrain now: pema train --config "
              f"{args.config} --output-dir {args.output_dir}")
        return results

    return run_job(args, stage, show=_show, inputs=(), bundles=OWNER_BUNDLES)


def _log(logger, result: dict, prefix: str = "") -> None:
    logger.log_metrics({f"{prefix}{k}": v for k, v in result.items() if isinstance(v, int)})
    result = {k: v for k, v in result.items() if k != "deleted_ids"}  # ids stay out of MLflow
    logger.log_dict(result, f"{prefix.rstrip('/') or 'memory'}_version.json")


def _show(result) -> str:
    return json.dumps(result)


def _versions(argv) -> int:
    parser = argparse.ArgumentParser(prog="pema memory versions", description="Every version of the folder's "
                                     "memories: what each changed, and the registered models trained on it.")
    parser.add_argument("--output-dir", default="outputs/run", help="the run's folder (default outputs/run)")
    parser.add_argument("--split", choices=SPLITS, help="one memory (default: both)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    from pema.formats.versions import list_versions

    out = {}
    for split in [args.split] if args.split else SPLITS:
        mem = RunLayout(args.output_dir).memory(split)
        if not (mem / "manifest.json").is_file():
            raise ConfigError(f"--output-dir {args.output_dir}: no memory at {mem}; build it first (pema build)")
        used = _in_use(args.output_dir, mem)
        out[split] = [{**{k: v for k, v in r.items() if k not in ("added", "deleted", "parts")},
                       "added": len(r["added"]), "deleted": len(r["deleted"]),
                       "models": used.get(r["version"], [])} for r in list_versions(mem)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for split, rows in out.items():
        print(f"memory/{split}")
        print(f"  {'version':>7} {'parent':>6}  {'created':<25} {'examples':>8} {'rows':>9} {'+added':>7} "
              f"{'-deleted':>8}  {'status':<8} models / reason")
        for r in rows:
            print(f"  {r['version']:>7} {r['parent']:>6}  {r['created']:<25} {r['num_examples']:>8} "
                  f"{r['total_rows']:>9,} {r['added']:>7} {r['deleted']:>8}  {r['status']:<8} "
                  f"{', '.join(r['models']) or '-'} / {r['reason']}")
    return 0


def _in_use(output_dir, mem) -> dict[int, list[str]]:
    """Registered model versions per memory version, from the folder's MLflow store (none when it has none)."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI") and not RunLayout(output_dir).mlflow_db.is_file():
        return {}
    from pema.tracking.registry import memory_versions_in_use
    from pema.tracking.runs import connect

    connect(output_dir)
    return memory_versions_in_use(mem)


def _gc(argv) -> int:
    parser = argparse.ArgumentParser(prog="pema memory gc", description="Remove the versions of the folder's "
                                     "memories that are not current and that no registered model version was "
                                     "trained on, with the parts only they read.")
    parser.add_argument("--output-dir", default="outputs/run", help="the run's folder (default outputs/run)")
    parser.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    args = parser.parse_args(argv)
    from pema.formats.versions import collect_garbage, list_versions
    from pema.jobs.guard import FolderLock

    check_output_dir(args.output_dir)
    result = {}
    with FolderLock(args.output_dir):
        for split in SPLITS:
            mem = RunLayout(args.output_dir).memory(split)
            if not (mem / "manifest.json").is_file():
                continue
            keep = set(_in_use(args.output_dir, mem))
            if args.dry_run:
                result[split] = {"would_remove": [v["version"] for v in list_versions(mem)
                                                  if v["status"] != "current" and v["version"] not in keep],
                                 "kept_for_models": sorted(keep)}
            else:
                result[split] = {**collect_garbage(mem, keep), "kept_for_models": sorted(keep)}
    print(json.dumps(result))
    return 0


COMMANDS = {"append": _append, "delete": _delete, "versions": _versions, "gc": _gc}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: pema memory {argv[0]!r} is not a command; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except PemaError as exc:  # versions and gc (append and delete report through run_job)
        print(f"error: {exc}", file=sys.stderr)
        return 2

