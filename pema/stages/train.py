"""The data owner's training stage: RCT, then RCT_PD (or one of them), written once.

:func:`train_worker` is the body, run by every data-parallel worker: on Ray Train's workers
(:mod:`pema.executors.ray_train`), in one process by the inline executor (:mod:`pema.executors.inline`), and inside
a Ray Tune trial (:mod:`pema.executors.ray_tune`). What it is given, a :class:`TrainContext`:

- ``rank``, ``world`` and ``device``. Worker ``rank`` trains on rows ``[rank * n, (rank + 1) * n)`` of the training
  memory (``n = N // world``), held in memory (on the device with ``train.resident``, bfloat16 keys on a GPU); every
  worker runs the same number of steps (equal shares, global batch ``train.batch_size`` split evenly) and validates
  on the whole dev memory, so early stopping agrees everywhere. With ``world > 1`` the adapter is wrapped in DDP.
- ``logger``, a :class:`~pema.stages.logger.MetricLogger`: metrics and checkpoints only. Every validation is logged
  with a checkpoint writer (safetensors + JSON, :mod:`pema.adapter.checkpoint`). Every rank logs (on Ray Train a
  report is a barrier); the logger keeps rank 0's checkpoint.
- ``latest_checkpoint()``: the folder of the last checkpoint when the executor restarted the workers after a crash;
  training resumes there, skipping the steps already taken.

The body returns a :class:`TrainResult` holding the trained adapter; how that value crosses a process boundary
(a Ray Train worker's only way back is its reported checkpoint) is the executor's business
(:mod:`pema.executors.handoff`), not the stage's.

:func:`run_train` is the stage: it runs the body on an executor, puts the adapter at ``<output-dir>/adapter``
(stage, verify, replace), writes ``train_history.json``, logs every validation, the phase figures and the loss
curves, and returns a :class:`TrainResult` (``to_dict()`` is what the ledger and the job's output keep).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import ContextManager, Mapping, Protocol

import torch

from pema.adapter.checkpoint import load_checkpoint, save_checkpoint
from pema.adapter.io import load_adapter, load_head
from pema.adapter.model import PemaAdapter
from pema.adapter.phases import run_phases
from pema.adapter.train import target_vocab
from pema.config import PipelineConfig, config_from_dict, to_dict
from pema.errors import ConfigError, PemaError
from pema.formats.layout import RunLayout, replace_dir, write_text_atomic
from pema.stages import plots
from pema.stages.inputs import adapter_meta, open_bundles
from pema.stages.logger import MetricLogger, NullLogger
from pema.stages.neighbours import ensure_neighbours
from pema.stages.train_memory import training_memory


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What training hands back. ``phases``: per phase ``phase``, ``best_val``, ``best_step``, ``steps``,
    ``stopped_early``, ``seconds``, ``rows_per_s`` and ``history`` (every validation); ``steps_run``: the steps
    this attempt took (fewer than ``steps_total`` after a resume); ``workers``: the data-parallel world size;
    ``seconds``: the stage's wall time (0 from the body). The trained adapter is ``adapter`` (in memory: the body's
    and :func:`train_local`'s result) or the bundle folder ``adapter_dir`` (an executor's and :func:`run_train`'s).
    """
    phases: tuple[dict, ...]
    steps_run: int
    steps_total: int
    workers: int
    seconds: float = 0.0
    adapter: PemaAdapter | None = dataclasses.field(default=None, compare=False, repr=False)
    adapter_dir: str | None = None
    train_memory: str | None = None  # how the training memory was held: "resident" or "streaming"

    @property
    def history(self) -> list[dict]:
        """Every validation of every phase, in order."""
        return [h for p in self.phases for h in p.get("history", ())]

    def to_dict(self) -> dict:
        """The result as recorded (the ledger's ``stages.json``, the train job's output): the phases without their
        history (that is ``train_history.json``), the steps, the workers and the seconds."""
        return {"phases": [{k: v for k, v in p.items() if k != "history"} for p in self.phases],
                "steps_run": self.steps_run, "steps_total": self.steps_total, "workers": self.workers,
                "seconds": self.seconds, "train_memory": self.train_memory}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainResult":
        """Back from :meth:`to_dict` (a stage the ledger holds as done)."""
        return cls(phases=tuple(d["phases"]), steps_run=d["steps_run"], steps_total=d["steps_total"],
                   workers=d["workers"], seconds=d.get("seconds", 0.0), train_memory=d.get("train_memory"))


class TrainContext(Protocol):
    rank: int
    world: int
    device: torch.device
    logger: MetricLogger

    def latest_checkpoint(self) -> ContextManager[str | None]: ...


def train_worker(config: dict, ctx: TrainContext) -> TrainResult:
    """The per-worker body. ``config``: ``cfg`` (the config as a dict), ``output_dir``, ``adapter_meta`` (the
    bundle's JSON) and ``progress``. Returns this worker's :class:`TrainResult`, the trained adapter on the CPU."""
    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    rank, world, device = ctx.rank, ctx.world, ctx.device
    head, _, train_reader, dev_reader = open_bundles(config["output_dir"])
    share = len(train_reader) // world
    if share == 0 or t.batch_size < world:
        raise ConfigError(f"resources.train_workers={world} is too many for {len(train_reader)} memory rows and "
                          f"train.batch_size={t.batch_size}: each worker needs rows and >= 1 row per batch")
    local_batch = t.batch_size // world
    mem = training_memory(cfg, train_reader, dev_reader, rank=rank, world=world, device=device,
                          batch_size=local_batch)  # resident or streamed (train.streaming)
    torch.manual_seed(t.seed)
    a = cfg.adapter
    adapter = PemaAdapter(head.d, a.rank, a.alpha, a.dropout, a.mlp_hidden)
    if t.warm_start:
        adapter.load_state_dict(warm_start_adapter(config["output_dir"], adapter).state_dict())
    adapter = adapter.to(device)
    head = head.to(device)
    wrap = None
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
    log = ctx.logger

    resume = None
    with ctx.latest_checkpoint() as d:  # (a restart after the end is the executor's: it hands back that result)
        if d is not None:
            resume = load_checkpoint(d)
    steps_run = []

    def on_check(ckpt, metrics):
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        log.log_metrics({**flat, "phase_index": ckpt.phase_index, "done": False}, step=metrics.get("step"),
                        checkpoint=lambda tmp: save_checkpoint(ckpt, tmp))

    results = run_phases(
        adapter, head, t, train_batches=mem.train_batches, train_rows=mem.rows, dev_batches=mem.dev_batches,
        vocab_subset=lambda: target_vocab(b["token"] for b in train_reader.iter_batches(65536)).to(device),
        progress=config.get("progress", False) and rank == 0, checkpoint=on_check, resume=resume,
        wrap=wrap, steps_done=steps_run.append)
    summary = [{"phase": r.phase, "best_val": r.best_val, "best_step": r.best_step, "steps": r.steps,
                "stopped_early": r.stopped_early, "seconds": r.seconds, "rows_per_s": r.entries_per_s,
                "history": r.history} for r in results]
    return TrainResult(phases=tuple(summary), steps_total=sum(r.steps for r in results),
                       steps_run=sum(steps_run),  # this attempt's steps: fewer than steps_total after a resume
                       workers=world, adapter=adapter.cpu(), train_memory=mem.path)  # "resident" or "streaming"


def warm_start_adapter(output_dir, like: PemaAdapter) -> PemaAdapter:
    """``train.warm_start``: the adapter trained before in ``<output_dir>/adapter``, of the shape ``like`` has;
    ConfigError naming the key when there is none or it has another shape (``adapter.*`` changed)."""
    folder = RunLayout(output_dir).adapter
    try:
        previous, _ = load_adapter(folder, load_head(RunLayout(output_dir).head)[1])
    except (PemaError, OSError) as exc:
        raise ConfigError(f"train.warm_start=true starts from {folder}, which holds no adapter ({exc}); train once "
                          "without it") from None
    shapes = {k: tuple(v.shape) for k, v in previous.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in like.state_dict().items()}:
        raise ConfigError(f"train.warm_start=true: the adapter in {folder} has other shapes ({shapes}) than "
                          "adapter.* makes now; train without train.warm_start")
    return previous


def worker_config(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool) -> dict:
    """What :func:`train_worker` is given; opening the bundles here fails fast, before any worker starts."""
    layout = RunLayout(output_dir)
    _, head_meta, train_reader, _ = open_bundles(layout.root)
    ensure_neighbours(cfg, layout.memory("train"), log=print if progress else (lambda *_: None))
    return {"cfg": to_dict(cfg), "output_dir": str(layout.root), "progress": progress,
            "adapter_meta": adapter_meta(cfg, head_meta, train_reader)}


def run_train(cfg: PipelineConfig, output_dir: str | os.PathLike, executor, logger: MetricLogger | None = None, *,
              progress: bool = True) -> TrainResult:
    """Train on ``executor`` from ``<output_dir>/{head,memory/train,memory/dev}``; writes ``adapter/`` and
    ``train_history.json``, logs to ``logger``; returns the :class:`TrainResult` (``adapter_dir``: ``adapter/``,
    ``seconds``: the time taken)."""
    layout, logger = RunLayout(output_dir), logger or NullLogger()
    config = worker_config(cfg, layout.root, progress=progress)
    _, head_meta = load_head(layout.head)
    start = time.perf_counter()
    with executor.train(train_worker, config, cfg=cfg, layout=layout) as trained:  # adapter_dir valid inside
        replace_dir(layout.adapter, lambda s: shutil.copytree(trained.adapter_dir, s, dirs_exist_ok=True),
                    lambda s: load_adapter(s, head_meta))  # a damaged bundle never replaces a good one
    result = dataclasses.replace(trained, adapter_dir=str(layout.adapter),
                                 seconds=round(time.perf_counter() - start, 2))
    write_text_atomic(layout.train_history, json.dumps(result.history, indent=2))
    log_training(logger, result, layout)
    return result


def log_training(logger: MetricLogger, result: TrainResult, layout: RunLayout) -> None:
    """Every validation's losses on one global step axis across the phases, the phase figures, the history."""
    offset, last_phase, last_step = 0, None, 0
    history = result.history
    for h in history:
        if h["phase"] != last_phase and last_phase is not None:
            offset += last_step
        last_phase, last_step = h["phase"], h["step"]
        logger.log_metrics({f"{h['phase']}/{k}": float(v) for k, v in h.items()
                            if k.startswith("val_") or k == "train_loss"}, step=offset + h["step"])
    for p in result.phases:
        logger.log_metrics({f"{p['phase']}/best_val": p["best_val"], f"{p['phase']}/steps": p["steps"],
                            f"{p['phase']}/seconds": p["seconds"], f"{p['phase']}/rows_per_s": p["rows_per_s"]})
    logger.log_metrics({"train_s": result.seconds, "steps_run": result.steps_run, "workers": result.workers})
    if result.train_memory:  # how the training memory was held (train.streaming): "resident" or "streaming"
        logger.set_tags({"train_memory": result.train_memory})
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


def train_local(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True) -> TrainResult:
    """The training body in this process, one worker, on ``resources.device``: its :class:`TrainResult`, the
    adapter in memory (on the CPU). For a stage that trains inside its own task (the compare job); the train stage
    itself is :func:`run_train`."""
    config = worker_config(cfg, output_dir, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        return train_worker(config, LocalTrainContext(Path(tmp) / "latest", cfg.resources.device))
