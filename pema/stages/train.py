"""The data owner's training stage: RCT, then RCT_PD (or one of them), written once.

:func:`train_worker` is the body, run by every data-parallel worker: on Ray Train's workers
(:mod:`pema.executors.ray_train`), in one process by the inline executor (:mod:`pema.executors.inline`), and inside
a Ray Tune trial (:mod:`pema.executors.ray_tune`). What it is given, a :class:`TrainContext`:

- ``rank``, ``world`` and ``device``. Worker ``rank`` trains on rows ``[rank * n, (rank + 1) * n)`` of the training
  memory (``n = N // world``), held in memory (on the device with ``train.resident``, bfloat16 keys on a GPU); every
  worker runs the same number of steps (equal shares, global batch ``train.batch_size`` split evenly) and validates
  on the whole dev memory, so early stopping agrees everywhere. With ``world > 1`` the adapter is wrapped in DDP.
- ``logger``, a :class:`~pema.stages.logger.MetricLogger`. Every validation is logged with a checkpoint writer
  (safetensors + JSON, :mod:`pema.adapter.checkpoint`) and the last log carries the trained adapter bundle beside
  ``final.json``. Every rank logs (on Ray Train a report is a barrier); the logger keeps rank 0's checkpoint.
- ``latest_checkpoint()``: the folder of the last checkpoint when the executor restarted the workers after a crash;
  training resumes there, skipping the steps already taken.

:func:`run_train` is the stage: it runs the body on an executor, puts the adapter at ``<output-dir>/adapter``
(stage, verify, replace), writes ``train_history.json`` and logs every validation, the phase figures and the loss
curves.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import ContextManager, Protocol

import torch

from pema.adapter.checkpoint import load_checkpoint, save_checkpoint
from pema.adapter.io import load_adapter, load_head, save_adapter
from pema.adapter.model import PemaAdapter
from pema.adapter.phases import run_phases
from pema.adapter.resident import ResidentMemory
from pema.adapter.train import target_vocab
from pema.config import PipelineConfig, config_from_dict, to_dict
from pema.errors import ConfigError
from pema.formats.layout import RunLayout, replace_dir, write_text_atomic
from pema.stages import plots
from pema.stages.inputs import adapter_meta, open_bundles
from pema.stages.logger import MetricLogger, NullLogger
from pema.stages.neighbours import distill_targets, ensure_neighbours

FINAL = "final.json"  # marks the last checkpoint: the trained adapter bundle sits beside it in adapter/


class TrainContext(Protocol):
    rank: int
    world: int
    device: torch.device
    logger: MetricLogger

    def latest_checkpoint(self) -> ContextManager[str | None]: ...


def train_worker(config: dict, ctx: TrainContext) -> None:
    """The per-worker body. ``config``: ``cfg`` (the config as a dict), ``output_dir``, ``adapter_meta`` (the
    bundle's JSON) and ``progress``."""
    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    rank, world, device = ctx.rank, ctx.world, ctx.device
    head, _, train_reader, dev_reader = open_bundles(config["output_dir"])
    share = len(train_reader) // world
    if share == 0 or t.batch_size < world:
        raise ConfigError(f"resources.train_workers={world} is too many for {len(train_reader)} memory rows and "
                          f"train.batch_size={t.batch_size}: each worker needs rows and >= 1 row per batch")
    dtype = torch.bfloat16 if t.resident and device.type == "cuda" else torch.float32
    mem_device = device if t.resident else torch.device("cpu")
    train_mem = ResidentMemory.from_reader(train_reader.rows(rank * share, (rank + 1) * share), mem_device, dtype)
    if t.distill_beta > 0:  # the stored neighbours of this worker's rows (ensure_neighbours ran on the driver)
        train_mem = train_mem.with_extra(**distill_targets(cfg, train_reader.mem_dir, rank * share,
                                                          (rank + 1) * share, mem_device))
    dev_mem = ResidentMemory.from_reader(dev_reader, mem_device, dtype)
    local_batch = t.batch_size // world
    torch.manual_seed(t.seed)
    a = cfg.adapter
    adapter = PemaAdapter(head.d, a.rank, a.alpha, a.dropout, a.mlp_hidden).to(device)
    head = head.to(device)
    wrap = None
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
    log = ctx.logger

    resume = None
    with ctx.latest_checkpoint() as d:
        if d is not None and (Path(d) / FINAL).is_file():  # restarted after the end: log the same result again
            final = json.loads((Path(d) / FINAL).read_text())
            log.log_metrics({**final["metrics"], "steps_run": 0},
                            checkpoint=lambda tmp: shutil.copytree(d, tmp, dirs_exist_ok=True))
            return
        if d is not None:
            resume = load_checkpoint(d)
    steps_run = []

    def on_check(ckpt, metrics):
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        log.log_metrics({**flat, "phase_index": ckpt.phase_index, "done": False}, step=metrics.get("step"),
                        checkpoint=lambda tmp: save_checkpoint(ckpt, tmp))

    results = run_phases(
        adapter, head, t, train_batches=lambda epoch: train_mem.batches(local_batch, seed=t.seed * 1000 + epoch),
        train_rows=len(train_mem), dev_batches=lambda: dev_mem.batches(4096, shuffle=False),
        vocab_subset=lambda: target_vocab(b["token"] for b in train_reader.iter_batches(65536)).to(device),
        progress=config.get("progress", False) and rank == 0, checkpoint=on_check, resume=resume,
        wrap=wrap, steps_done=steps_run.append)
    summary = [{"phase": r.phase, "best_val": r.best_val, "best_step": r.best_step, "steps": r.steps,
                "stopped_early": r.stopped_early, "seconds": r.seconds, "rows_per_s": r.entries_per_s,
                "history": r.history} for r in results]
    metrics = {"done": True, "steps_total": sum(r.steps for r in results), "best_val": results[-1].best_val,
               "steps_run": sum(steps_run)}  # this attempt's steps: fewer than steps_total after a resume

    def write_final(tmp):
        save_adapter(adapter.cpu(), Path(tmp) / "adapter", config["adapter_meta"])
        (Path(tmp) / FINAL).write_text(json.dumps({"metrics": metrics, "results": summary, "world_size": world}))

    log.log_metrics(metrics, checkpoint=write_final)


def worker_config(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool) -> dict:
    """What :func:`train_worker` is given; opening the bundles here fails fast, before any worker starts."""
    layout = RunLayout(output_dir)
    _, head_meta, train_reader, _ = open_bundles(layout.root)
    ensure_neighbours(cfg, layout.memory("train"), log=print if progress else (lambda *_: None))
    return {"cfg": to_dict(cfg), "output_dir": str(layout.root), "progress": progress,
            "adapter_meta": adapter_meta(cfg, head_meta, train_reader)}


def run_train(cfg: PipelineConfig, output_dir: str | os.PathLike, executor, logger: MetricLogger | None = None, *,
              progress: bool = True) -> dict:
    """Train on ``executor`` from ``<output_dir>/{head,memory/train,memory/dev}``; writes ``adapter/`` and
    ``train_history.json``, logs to ``logger``; returns the phase summaries, the steps run and the seconds taken."""
    layout, logger = RunLayout(output_dir), logger or NullLogger()
    config = worker_config(cfg, layout.root, progress=progress)
    _, head_meta = load_head(layout.head)
    start = time.perf_counter()
    with executor.train(train_worker, config, cfg=cfg, layout=layout) as final_dir:
        final = json.loads((Path(final_dir) / FINAL).read_text())
        replace_dir(layout.adapter, lambda s: shutil.copytree(Path(final_dir) / "adapter", s, dirs_exist_ok=True),
                    lambda s: load_adapter(s, head_meta))  # a damaged bundle never replaces a good one
    history = [h for r in final["results"] for h in r["history"]]
    write_text_atomic(layout.train_history, json.dumps(history, indent=2))
    info = {"phases": [{k: v for k, v in r.items() if k != "history"} for r in final["results"]],
            "steps_run": final["metrics"]["steps_run"], "steps_total": final["metrics"]["steps_total"],
            "workers": final["world_size"], "seconds": round(time.perf_counter() - start, 2)}
    log_training(logger, history, info, layout)
    return info


def log_training(logger: MetricLogger, history: list[dict], info: dict, layout: RunLayout) -> None:
    """Every validation's losses on one global step axis across the phases, the phase figures, the history."""
    offset, last_phase, last_step = 0, None, 0
    for h in history:
        if h["phase"] != last_phase and last_phase is not None:
            offset += last_step
        last_phase, last_step = h["phase"], h["step"]
        logger.log_metrics({f"{h['phase']}/{k}": float(v) for k, v in h.items()
                            if k.startswith("val_") or k == "train_loss"}, step=offset + h["step"])
    for p in info["phases"]:
        logger.log_metrics({f"{p['phase']}/best_val": p["best_val"], f"{p['phase']}/steps": p["steps"],
                            f"{p['phase']}/seconds": p["seconds"], f"{p['phase']}/rows_per_s": p["rows_per_s"]})
    logger.log_metrics({"train_s": info["seconds"], "steps_run": info["steps_run"], "workers": info["workers"]})
    logger.log_artifact(layout.train_history)
    logger.log_figure(plots.loss_curves(history), "loss_curves.png")


class _KeepLatest(NullLogger):
    """Keeps the last checkpoint in ``folder`` (stage, verify, replace)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        if checkpoint is not None:
            replace_dir(self.folder, lambda staging: checkpoint(str(staging)))


class LocalTrainContext:
    """Rank 0 of 1 in this process; checkpoints go to ``folder`` (the last one replaces the one before)."""

    rank, world = 0, 1

    def __init__(self, folder: str | os.PathLike, device: str):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.logger = _KeepLatest(self.folder)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield str(self.folder) if self.folder.is_dir() else None


def train_local(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True):
    """The training body in this process, one worker, on ``resources.device``: ``(adapter, phase summaries)``.
    For a stage that trains inside its own task (the compare job); the train stage itself is :func:`run_train`."""
    config = worker_config(cfg, output_dir, progress=progress)
    _, head_meta = load_head(RunLayout(output_dir).head)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalTrainContext(Path(tmp) / "latest", cfg.resources.device)
        train_worker(config, ctx)
        final = json.loads((ctx.folder / FINAL).read_text())
        adapter, _ = load_adapter(ctx.folder / "adapter", head_meta)
    return adapter, final["results"]
