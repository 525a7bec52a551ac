"""The output folder of a run, every path in one place, and the one way a stage puts a folder there.

::

    <output-dir>/
      config.json            the config the run used (the pipeline; the tune job writes the winner's)
      memory/{train,dev}/    the owner's memories: Parquet parts + manifest.json      (build)
      memory/train/neighbours.{safetensors,json}  each row's neighbours from other examples (train, distill)
      head/                  the owner's output head: head.safetensors + head.json     (build)
      adapter/               the data owner's adapter: adapter.safetensors + .json   (train, tune)
      train_history.json     every validation of the training phases                   (train)
      train_checkpoints/     the inline executor's last training checkpoint            (train, inline)
      predictions/<system>.jsonl, predictions/ood_test/<system>.jsonl  the two test sets   (evaluate)
      summary.json           scores, intervals and timings                             (pipeline)
      mlflow.db, mlartifacts/  the embedded MLflow store and its artifacts (no MLFLOW_TRACKING_URI)
      ray_train/, ray_tune/  Ray's own run folders (checkpoints, results)
      trials/<trial id>/     one folder per Tune trial; tune_state.json, tune_summary.json (tune)
      compare/               the compare job's predictions, compare.md and summary.json (compare)
      stages.json            the finished stages, for a rerun to skip              (every job)
      compare_state.json     the open compare run, for a rerun after a kill to resume  (compare)

:func:`replace_dir` is "stage, verify, replace": a stage fills ``<dest>.partial``, the result is checked, and only
then does it replace ``dest``, so a stage killed at any instant leaves the old folder or the new one, never half.
:func:`write_text_atomic` does the same for one file (``train_history.json``, predictions).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OWNER_BUNDLES = ("memory/train/manifest.json", "memory/dev/manifest.json", "head/head.json")
ADAPTER_BUNDLES = ("head/head.json", "adapter/adapter.json")  # what decoding reads (the PLM answers the rest)


@dataclass(frozen=True)
class RunLayout:
    """Every path of one output folder (nothing is created by asking for a path)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root).resolve())

    def memory(self, split: str) -> Path:
        return self.root / "memory" / split

    @property
    def head(self) -> Path:
        return self.root / "head"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def train_history(self) -> Path:
        return self.root / "train_history.json"

    @property
    def train_checkpoints(self) -> Path:
        return self.root / "train_checkpoints"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def prediction(self, system: str, folder: Path | None = None) -> Path:
        return (folder or self.predictions) / f"{system}.jsonl"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    @property
    def ray_tune(self) -> Path:
        return self.root / "ray_tune"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def tune_state(self) -> Path:
        return self.root / "tune_state.json"

    @property
    def tune_summary(self) -> Path:
        return self.root / "tune_summary.json"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    def missing(self, bundles: tuple[str, ...] = OWNER_BUNDLES) -> list[str]:
        """Which of ``bundles`` (paths relative to the root) this folder lacks; [] when all are there."""
        return [b for b in bundles if not (self.root / b).is_file()]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``path`` through ``<path>.tmp`` and a rename: a write that fails part-way (a full disk) leaves the old
    file or none, never half of one, and no ``.tmp``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def staging_dir(dest: str | os.PathLike) -> Path:
    """Where a stage builds ``dest`` before :func:`replace_dir` moves it into place."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".partial")


def replace_dir(dest: str | os.PathLike, fill: Callable[[Path], object],
                verify: Callable[[Path], object] | None = None, *, fresh: bool = True):
    """Stage, verify, replace: ``fill(staging)`` writes the new folder into ``<dest>.partial`` (emptied first
    unless ``fresh=False``, for a resumable build that keeps its staged parts), ``verify(staging)`` raises on a bad
    result, and only then does the staging folder replace ``dest``. On an error the old ``dest`` is untouched and
    the staging folder is removed (kept when ``fresh=False``, so a rerun resumes). Returns what ``verify`` (or,
    without one, ``fill``) returned."""
    dest = Path(dest)
    staging = staging_dir(dest)
    if fresh:
        shutil.rmtree(staging, ignore_errors=True)
        if staging.exists():
            staging.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    try:
        result = fill(staging)
        if verify is not None:
            result = verify(staging)
    except BaseException:
        if fresh:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    os.replace(staging, dest)
    return result


SNAPSHOTS, SOURCES = "inputs", "sources.json"  # a job's copies of the JSONL files it read, and where they came from


def source_of(path: str | os.PathLike) -> str:
    """The file a job's copy of its input (``<output-dir>/inputs/<split>-<sha256>.jsonl``) was read from, as the
    user named it (``inputs/sources.json``); any other path as it is."""
    path = Path(path)
    if path.parent.name == SNAPSHOTS:
        try:
            return str(json.loads((path.parent / SOURCES).read_text(encoding="utf-8"))[path.name])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return str(path)
