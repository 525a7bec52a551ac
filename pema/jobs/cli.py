"""What every job (``pema <command>``, :mod:`pema.commands`) shares: the command line, config loading, connecting
to Ray and the exit code.

A job is ``parse -> config -> inputs checked -> one stage call -> exit code``: 0 on success, 2 with ``error: ...`` on
stderr when the input is wrong (a named :class:`~pema.errors.PemaError`, a missing file). The config, the JSONL
files, the model path and the bundles the job reads are checked before Ray starts and before anything is written, so
a refused job leaves ``--output-dir`` as it was. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable

from pema.config import PipelineConfig, load_config, with_overrides
from pema.errors import ConfigError, PemaError, full_disk
from pema.jobs.guard import FolderLock, interruption, stop_on_signals


def job_parser(doc: str, *, splits: tuple[str, ...] = ("train", "dev", "test"),
               prog: str | None = None) -> argparse.ArgumentParser:
    """A job's command line; ``prog``: its name in usage lines (``pema train``)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("--output-dir", default="outputs/run", help="the run's folder: memory/, head/, adapter/, ...")
    for split in splits:
        parser.add_argument(f"--{split}", help=f"{split} pairs JSONL (overrides data.{split})")
    if "test" in splits:
        parser.add_argument("--ood-test", dest="ood_test", help="a second test set, out of the training domain: "
                            "its own table (overrides data.ood_test)")
    parser.set_defaults(input_splits=splits)  # the JSONL files run_job checks (unless the job names others)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines (off: stage lines, bars, "
                        "the table)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.kappa=0.3")
    return parser


def serve_parser(doc: str, port: int, prog: str | None = None) -> argparse.ArgumentParser:
    """A service job's command line: the job's options plus ``--port`` and ``--once`` (start, print, return)."""
    parser = job_parser(doc, splits=(), prog=prog)
    parser.add_argument("--port", type=int, default=port, help=f"HTTP port on 127.0.0.1 (default {port})")
    parser.add_argument("--once", action="store_true", help="start, print the URL and return (tests)")
    parser.set_defaults(service=True)  # stopped by a signal: one "stopped" line (run_job)
    return parser


def serve_until_stopped(url: str, what: str, once: bool) -> str:
    """Print where ``what`` answers and keep the job (and with it the Serve application) up until Ctrl+C."""
    import time

    print(f"{what} at {url}", flush=True)
    while not once:
        time.sleep(3600)
    return url


def job_config(args: argparse.Namespace) -> PipelineConfig:
    """The config file with the overrides, then the ``--train/--dev/--test`` paths as given (paths, not YAML: a
    file named ``null`` or ``a: b.jsonl`` is that file)."""
    cfg = load_config(args.config, args.overrides)
    paths = {f"data.{split}": getattr(args, split) for split in ("train", "dev", "test", "ood_test")
             if getattr(args, split, None) is not None}
    return with_overrides(cfg, paths) if paths else cfg


def check_output_dir(output_dir: str, write: bool = True) -> None:
    """ConfigError naming the path when ``--output-dir`` is empty, or it (or the first of its parents that exists)
    is not a folder, or, with ``write`` (every job but the services, which only read it), cannot be written (a
    read-only disk, no permission): the job would fail when it first writes, after Ray has started. Writing is
    tried: a probe file in the folder, or, when it is missing, a probe folder in the first parent that exists (where
    it would be made); both are removed at once, so a refused job leaves the disk as it was."""
    if not str(output_dir).strip():
        raise ConfigError("--output-dir is empty: give the run's folder (it is made when missing)")
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"--output-dir {output_dir}: {path} is a file, not a folder; give a folder")
            break
    if not write:
        return
    probe = path / f".pema-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        if path == Path(output_dir):
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        else:
            os.mkdir(probe)
            os.rmdir(probe)
    except OSError as exc:
        reason = f"cannot be written ({exc.strerror or exc}); give a folder this job may write"
        if path == Path(output_dir):
            raise ConfigError(f"--output-dir {output_dir} {reason}") from None
        raise ConfigError(f"--output-dir {output_dir} cannot be made: {path} {reason}") from None


def run_job(args: argparse.Namespace, stage: Callable[[PipelineConfig], object],
            show: Callable[[object], str] = str, *, inputs: tuple[str, ...] | None = None, model: bool = True,
            bundles: tuple[str, ...] = (), lock: bool = True) -> int:
    """Load the config, check the inputs, take the folder, connect to Ray, run ``stage(cfg)`` and print
    ``show(result)``; returns the exit code. Checked first, once (:func:`~pema.jobs.stages.check_inputs`): the pairs
    of ``inputs`` (default: the job's ``--train/--dev/--test`` splits) and what the pair hygiene keeps of them,
    ``model.model_id`` when ``model`` and ``bundles`` under ``--output-dir``. Then the job holds the folder
    (:class:`~pema.jobs.guard.FolderLock`, unless ``lock`` is off: the services only read it), reads its JSONL
    splits once (:func:`~pema.stages.ledger.snapshot_inputs`) and runs with SIGINT and SIGTERM turned into a clean
    stop (exit 130 and 143, :func:`~pema.jobs.guard.stop_on_signals`)."""
    try:
        with stop_on_signals():
            return _run_job(args, stage, show, inputs, model, bundles, lock)
    except (PemaError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk, also behind Ray's errors (a task's, Ray Train's workers' or controller's)
        if (disk := full_disk(exc)) is None:
            raise
        where = "" if disk.filename else f" (writing under {args.output_dir})"
        print(f"error: {disk}{where}: free some space (or raise the file size limit) and rerun the same command; the "
              "finished parts of the stage are kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        stop = interruption(exc)
        if getattr(args, "service", False):  # the way a service ends: no work to resume
            print(f"\nstopped ({stop}); rerun the same command to start it again", file=sys.stderr)
        else:
            print(f"\ninterrupted ({stop}): the job stopped; rerun the same command to resume (finished stages "
                  "and memory parts are kept)", file=sys.stderr)
        return stop.exit_code


def check_paths(args: argparse.Namespace, cfg: PipelineConfig | None = None, splits: tuple[str, ...] = ()) -> None:
    """ConfigError naming the option when a file it names is missing or a folder: ``--config`` and the
    ``--train/--dev/--test/--ood-test`` given; with ``cfg``, the ``data.<split>`` paths of ``splits`` that the
    config file gave (``--ood-test`` with ``test``), named as the config's keys."""
    given = {"config": args.config, **{s: getattr(args, s) for s in ("train", "dev", "test", "ood_test")
                                       if getattr(args, s, None) is not None}}
    named = {k: (f"--{k.replace('_', '-')}", v) for k, v in given.items()}
    if cfg is not None:
        for split in (*splits, "ood_test") if "test" in splits else splits:
            if split not in given and (path := getattr(cfg.data, split)) is not None:
                named[split] = (f"data.{split}", path)
    for option, path in named.values():
        where = "" if option.startswith("--") else \
            f" (set by --config {args.config} or an override; --{option[5:].replace('_', '-')} replaces it)"
        if not os.path.exists(path):
            raise ConfigError(f"{option} {path}: no such file{where}")
        if os.path.isdir(path):
            raise ConfigError(f"{option} {path}: a folder, not a file{where}")


def _run_job(args, stage, show, inputs, model, bundles, lock) -> int:
    check_paths(args)  # before anything else: a mistyped path is named with its option
    check_output_dir(args.output_dir, write=lock)  # the services (lock off) only read the folder
    cfg = job_config(args)
    splits = getattr(args, "input_splits", ()) if inputs is None else inputs
    check_paths(args, cfg, splits)
    from pema.jobs.stages import check_inputs
    from pema.stages.inputs import SPLITS, cleaned_splits

    check_inputs(cfg, args.output_dir, splits=splits, model=model, bundles=bundles)
    if splits:  # a split that the pair hygiene would leave empty: named here, before anything is written
        cleaned_splits(cfg, max(splits, key=SPLITS.index))
    from pema.executors.ray_runtime import init_ray
    from pema.stages.ledger import snapshot_inputs
    from pema.tracking.runs import check_server, tracking_uri

    check_server(tracking_uri(args.output_dir))  # a dead tracking server stops the job before any work
    with FolderLock(args.output_dir) if lock else contextlib.nullcontext():
        if lock and splits:
            cfg = snapshot_inputs(cfg, args.output_dir, splits)
        init_ray(args.address, quiet=not getattr(args, "verbose", False))
        with stop_on_signals():  # again, after Ray's core worker installed its own SIGTERM handler
            result = stage(cfg)
    print(show(result))
    return 0
