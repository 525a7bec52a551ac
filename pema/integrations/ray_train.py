"""The data owner's training stage on Ray Train: a TorchTrainer runs RCT, then RCT_PD, on ``train.num_workers``
data-parallel workers (DDP over gloo on CPUs, NCCL on GPUs).

- Each worker holds its share of the training memory: rows ``[rank * n, (rank + 1) * n)`` with ``n = N // W``, read
  from the Parquet parts that overlap it (a :class:`~pema.memory.MemorySlice`). With ``train.resident`` the share
  and the dev memory live on the worker's device (bfloat16 keys on a GPU), and each epoch is a ``randperm`` there:
  no per-row DataLoader. Every worker runs the same number of steps (equal shares, global batch
  ``train.batch_size`` split evenly) and validates on the whole dev memory, so early stopping agrees everywhere.
- Every validation reports its metrics and a checkpoint (rank 0 writes it; safetensors + JSON, see
  :mod:`pema.adapter.checkpoint`). With ``train.max_failures`` Ray restarts the workers after a crash and they resume
  at the last checkpoint, skipping the steps already taken.
- The last report carries the trained adapter bundle; :func:`run_train_stage` copies it to ``output_dir/adapter``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pema.adapter.checkpoint import load_checkpoint, save_checkpoint
from pema.adapter.io import load_adapter, save_adapter
from pema.adapter.model import PemaAdapter
from pema.adapter.phases import run_phases
from pema.adapter.resident import ResidentMemory
from pema.adapter.train import target_vocab
from pema.config import PipelineConfig, config_from_dict, to_dict
from pema.errors import ConfigError
from pema.pipeline import adapter_meta, open_bundles

FINAL = "final.json"  # marks the last checkpoint: the trained adapter bundle sits beside it in adapter/


def _report(metrics: dict, ckpt_writer=None, rank: int = 0) -> None:
    """All ranks report (it is a barrier); rank 0 attaches the checkpoint that ``ckpt_writer(dir)`` writes."""
    if rank == 0 and ckpt_writer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_writer(tmp)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


def train_worker(config: dict) -> None:
    """The per-worker loop (``train_loop_per_worker``)."""
    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.device.startswith("cuda") else torch.device("cpu")
    head, _, train_reader, dev_reader = open_bundles(config["output_dir"])
    share = len(train_reader) // world
    if share == 0 or t.batch_size < world:
        raise ConfigError(f"train.num_workers={world} is too many for {len(train_reader)} memory rows and "
                          f"train.batch_size={t.batch_size}: each worker needs rows and >= 1 row per batch")
    on_device = t.resident
    dtype = torch.bfloat16 if on_device and device.type == "cuda" else torch.float32
    mem_device = device if on_device else torch.device("cpu")
    train_mem = ResidentMemory.from_reader(train_reader.rows(rank * share, (rank + 1) * share), mem_device, dtype)
    dev_mem = ResidentMemory.from_reader(dev_reader, mem_device, dtype)
    local_batch = t.batch_size // world
    torch.manual_seed(t.seed)
    adapter = PemaAdapter(head.d, cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout).to(device)
    head = head.to(device)

    wrap = None
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)

    resume, latest = None, ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as d:
            if (Path(d) / FINAL).is_file():  # restarted after the end: report the same result again
                final = json.loads((Path(d) / FINAL).read_text())
                _report({**final["metrics"], "steps_run": 0}, lambda tmp: shutil.copytree(d, tmp, dirs_exist_ok=True),
                        rank)
                return
            resume = load_checkpoint(d)
    steps_run = []
    fault = config.get("fault")

    def on_check(ckpt, metrics):
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        _report({**flat, "phase_index": ckpt.phase_index, "done": False}, lambda tmp: save_checkpoint(ckpt, tmp), rank)
        if fault is not None:
            fault(rank, ckpt)

    results = run_phases(
        adapter, head, t, train_batches=lambda epoch: train_mem.batches(local_batch, seed=t.seed * 1000 + epoch),
        train_rows=len(train_mem), dev_batches=lambda: dev_mem.batches(4096, shuffle=False),
        vocab_subset=lambda: target_vocab(b["token"] for b in train_reader.iter_batches(65536)).to(device),
        progress=config.get("progress", False) and rank == 0, checkpoint=on_check, resume=resume,
        wrap=wrap, steps_done=steps_run.append)
    summary = [{"phase": r.phase, "best_val": r.best_val, "best_step": r.best_step, "steps": r.steps,
                "stopped_early": r.stopped_early, "seconds": r.seconds, "rows_per_s": r.entries_per_s,
                "history": r.history} for r in results]
    metrics = {"done": True, "steps_total": sum(r.steps for r in results), "best_val": results[-1].best_val}

    metrics["steps_run"] = sum(steps_run)  # this attempt's steps: fewer than steps_total after a resume

    def write_final(tmp):
        save_adapter(adapter.cpu(), Path(tmp) / "adapter", config["adapter_meta"])
        (Path(tmp) / FINAL).write_text(json.dumps({"metrics": metrics, "results": summary, "world_size": world}))

    _report(metrics, write_final, rank)


def run_train_stage(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True,
                    fault=None, run_name: str = "train") -> dict:
    """Train the adapter on Ray Train from ``output_dir/{head,memory/train,memory/dev}``; writes ``adapter/`` and
    ``train_history.json``; returns the phase summaries, the steps run and the seconds taken."""
    out = Path(output_dir).resolve()
    _, head_meta, train_reader, _ = open_bundles(out)  # fail fast, before the workers start
    t = cfg.train
    use_gpu = t.device.startswith("cuda")
    config = {"cfg": to_dict(cfg), "output_dir": str(out), "adapter_meta": adapter_meta(cfg, head_meta, train_reader),
              "progress": progress}
    if fault is not None:
        config["fault"] = fault
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=str(out / "ray_train"),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    start = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        final = json.loads((Path(d) / FINAL).read_text())
        staging = out / "adapter.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(d) / "adapter", staging)
    load_adapter(staging, head_meta)  # refuse a damaged bundle before it replaces a good one
    shutil.rmtree(out / "adapter", ignore_errors=True)
    os.replace(staging, out / "adapter")
    (out / "train_history.json").write_text(json.dumps([h for r in final["results"] for h in r["history"]], indent=2))
    return {"phases": [{k: v for k, v in r.items() if k != "history"} for r in final["results"]],
            "steps_run": final["metrics"]["steps_run"], "steps_total": final["metrics"]["steps_total"],
            "workers": final["world_size"],
            "seconds": round(time.perf_counter() - start, 2)}
