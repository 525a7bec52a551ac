"""What a training worker trains from: its share of the memory held resident, or streamed from disk.

``train.streaming`` chooses: ``off`` holds the share as a :class:`~pema.adapter.resident.ResidentMemory` (in RAM as
float32, or on the device with ``train.resident``, bfloat16 on a GPU); ``on`` streams it through a shuffle buffer of
``train.stream_buffer_rows`` rows (:class:`~pema.adapter.streaming.StreamingMemory`), so RAM holds the buffer and a
few parts whatever the memory's size; ``auto`` (the default) streams when the share's float32 keys
(``rows * d * 4`` bytes) exceed ``train.resident_max_bytes``, or, when that is 0, a quarter of this host's RAM
divided by the workers (all of them, as if they shared this host: a safe side to err on). Both paths give an epoch
of seed ``s`` the same batches when the buffer holds the whole share. The dev memory follows the same path, read in
stored order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from pema.adapter.resident import ResidentMemory
from pema.adapter.streaming import StreamingMemory
from pema.config import PipelineConfig, TrainConfig
from pema.formats.memory import MemoryReader
from pema.formats.memory_stream import MemoryShare
from pema.stages.neighbours import distill_targets

DEV_BATCH = 4096


def host_ram_bytes() -> int:
    """This host's physical memory, from ``sysconf`` (Linux, macOS)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_memory_path(t: TrainConfig, share_rows: int, d: int, world: int, ram_bytes: int | None = None) -> str:
    """``"streaming"`` or ``"resident"`` for a worker's share of ``share_rows`` rows of width ``d``."""
    if t.streaming != "auto":
        return "streaming" if t.streaming == "on" else "resident"
    budget = t.resident_max_bytes or (ram_bytes if ram_bytes is not None else host_ram_bytes()) // 4 // max(1, world)
    return "resident" if share_rows * d * 4 <= budget else "streaming"


@dataclass
class TrainingMemory:
    path: str  # "resident" or "streaming"
    rows: int
    train_batches: Callable[[int], Iterable[dict]]  # epoch -> batches of the worker's share
    dev_batches: Callable[[], Iterable[dict]]


def training_memory(cfg: PipelineConfig, train_reader: MemoryReader, dev_reader: MemoryReader, *, rank: int,
                    world: int, device: torch.device, batch_size: int) -> TrainingMemory:
    """Rows ``[rank * share, (rank + 1) * share)`` of the training memory (``share = N // world``) in batches of
    ``batch_size`` (epoch ``e`` shuffled with seed ``train.seed * 1000 + e``), the dev memory in batches of 4096,
    and, with ``train.distill_beta`` > 0, the stored neighbours of the share's rows carried by every batch."""
    t = cfg.train
    share = len(train_reader) // world
    lo, hi = rank * share, (rank + 1) * share
    path = choose_memory_path(t, share, int(train_reader.manifest.d), world)
    if path == "resident":
        dtype = torch.bfloat16 if t.resident and device.type == "cuda" else torch.float32
        mem_device = device if t.resident else torch.device("cpu")
        train = ResidentMemory.from_reader(train_reader.rows(lo, hi), mem_device, dtype)
        dev = ResidentMemory.from_reader(dev_reader, mem_device, dtype)
    else:
        mem_device = torch.device("cpu")
        train = StreamingMemory(MemoryShare(train_reader, lo, hi), t.stream_buffer_rows)
        dev = StreamingMemory(MemoryShare(dev_reader, 0, len(dev_reader)), t.stream_buffer_rows)
    if t.distill_beta > 0:  # the stored neighbours of this worker's rows (ensure_neighbours ran on the driver)
        train = train.with_extra(**distill_targets(cfg, train_reader.mem_dir, lo, hi, mem_device))
    return TrainingMemory(path, len(train),
                          lambda epoch: train.batches(batch_size, seed=t.seed * 1000 + epoch),
                          lambda: dev.batches(DEV_BATCH, shuffle=False))
