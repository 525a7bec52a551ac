"""Helpers shared by the benchmarks: repo import path, logging to stderr, device choice, timing, peak memory.

Imports only the standard library and torch, so a machine with just torch + transformers can run the benchmarks.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/x.py` from anywhere, without installing the package
    sys.path.insert(0, REPO)

import torch  # noqa: E402


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


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (absolute: includes every live tensor on the device).
    CPU: peak resident set size of THIS process above its size at entry, sampled every 5 ms by a thread (child
    processes, e.g. DataLoader workers, are not included).
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mb = (self._peak - self._base) / 2**20


def free_device_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("nan")
