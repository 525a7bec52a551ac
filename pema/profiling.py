"""Peak-memory meter for a block of work: ``with PeakMemory(device) as pm: ...; pm.peak_bytes``.

Two kinds of measurement, named in ``pm.kind``, and NOT comparable with each other:

- ``cuda_allocated`` (a CUDA device): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  the memory allocated at entry. Exact for tensors; excludes the caching allocator's reserved-but-free blocks, the
  CUDA context and other processes. Resetting the peak statistics is per device and process-wide: meters nested on
  the same device disturb each other's peak.
- ``cpu_rss`` (any other device): the process's resident set size (RSS), sampled every ``interval_s`` (default
  10 ms) by a daemon thread, plus one sample at entry and one at exit; the peak sample minus the RSS at entry. RSS
  counts the whole process (every thread, the Python heap, pages the allocator keeps cached after a free), and a
  spike shorter than the sampling interval can be missed, so read it as "about", to a few MB and ~10 ms.

``pm.baseline_bytes`` holds the memory at entry (allocated or RSS), ``pm.peak_bytes`` the increase (>= 0).
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process in bytes (``/proc/self/statm`` on Linux, psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """Context manager measuring the peak memory of the work inside it on ``device`` (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.01):
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r} must be > 0 (seconds between RSS samples)")
        self.device = torch.device(device)
        self.interval_s = float(interval_s)
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        self.baseline_bytes = 0
        self.peak_bytes: int | None = None  # set on exit
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self.peak_bytes = None
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline_bytes = self._max = rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
            peak = max(self._max, rss_bytes())
        self.peak_bytes = max(0, int(peak) - int(self.baseline_bytes))


class Timer:
    """Wall-clock seconds per named block: ``with timer.stage("train"): ...``; ``timer.timings`` maps names to
    seconds (rounded to 0.01 s)."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 2)
