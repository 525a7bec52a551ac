"""Helpers shared by the benchmarks: repo import path, logging to stderr, device choice, timing, peak memory.

Imports only the standard library, torch and `pema.profiling` (standard library + torch itself), so a machine
with just torch + transformers can run the benchmarks.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/x.py` from anywhere, without installing the package
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import pema.profiling  # noqa: E402  (standard library and torch only)


def log(*args) -> None:
    """Progress goes to stderr; stdout carries only the final JSON line."""
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def pick_device(gpu: bool) -> torch.device:
    if not gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--gpu was given but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a CUDA machine "
                         "or drop --gpu for the CPU benchmark")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time between device-synchronized points."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    @contextmanager
    def measure(self):
        sync(self.device)
        start = time.perf_counter()
        try:
            yield self
        finally:
            sync(self.device)
            self.seconds += time.perf_counter() - start


def timed_steps(step, *, warmup: int, steps: int, device: torch.device) -> tuple[int, float]:
    """Run ``step()`` (which returns rows done) ``warmup`` times untimed, then ``steps`` times timed.

    Returns (rows, seconds) of the timed part, measured between device-synchronized points.
    """
    for _ in range(warmup):
        step()
    watch, rows = Stopwatch(device), 0
    with watch.measure():
        for _ in range(steps):
            rows += step()
    return rows, watch.seconds


class PeakMemory(pema.profiling.PeakMemory):
    """:class:`pema.profiling.PeakMemory` sampling every 5 ms, reported in MiB as ``peak_mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (absolute: includes every live tensor on the device).
    CPU: peak resident set size of THIS process above its size at entry (child processes, e.g. DataLoader workers,
    are not included).
    """

    def __init__(self, device: torch.device):
        super().__init__(device, interval_s=0.005)
        self.peak_mb = float("nan")

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        absolute = self.peak_bytes + (self.baseline_bytes if self.kind == "cuda_allocated" else 0)
        self.peak_mb = absolute / 2**20


def free_device_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("nan")
