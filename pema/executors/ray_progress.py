"""Progress bars from Ray workers on the driver's console, without Ray's log forwarding.

A stage body draws its bars with tqdm wherever it runs. In a Ray task or a Ray Train worker those lines would reach
the driver only with ``log_to_driver`` (off unless ``--verbose``: it also forwards every line Ray itself prints,
prefixed with the worker's pid). Here the worker's tqdm output goes instead to :class:`BarRelay`, a zero-CPU actor,
and a driver thread redraws the latest bar in place: one live line per bar, as in a single process.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import ray


@ray.remote(num_cpus=0)
class BarRelay:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def put(self, key: str, line: str) -> None:
        self.lines.append((key, line))

    def take(self) -> list[tuple[str, str]]:
        out, self.lines = self.lines, []
        return out

    def sync(self) -> None:
        """Answers once every line the caller sent before has been put (one caller's calls run in order)."""


class _RelayStream:
    """Stands in for ``sys.stderr`` in a worker: tqdm's redraws (``\\r...``) go to the relay, the rest to stderr."""

    def __init__(self, relay, key: str, fallback):
        self.relay, self.key, self.fallback = relay, key, fallback

    def write(self, text: str) -> int:
        if text.startswith("\r"):  # tqdm draws every refresh as "\r" + the bar
            line = text.replace("\r", "").strip()
            if line:
                self.relay.put.remote(self.key, line)
            return len(text)
        return self.fallback.write(text)

    def flush(self) -> None:
        self.fallback.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def relayed_bars(relay, key: str):
    """In a worker: tqdm bars drawn inside the block go to ``relay`` (nothing changes when ``relay`` is None)."""
    if relay is None:
        yield
        return
    saved = sys.stderr
    sys.stderr = _RelayStream(relay, key, saved)
    try:
        yield
    finally:
        sys.stderr = saved
        # the puts are sent without waiting: before the task returns, wait until the relay has them all, or the
        # driver's last take (a call of another caller, not ordered with them) may miss a bar's final frame
        with contextlib.suppress(Exception):
            ray.get(relay.sync.remote(), timeout=10)


@contextlib.contextmanager
def bars_on_driver(enabled: bool = True, interval_s: float = 0.3):
    """On the driver: yields a relay (None when not ``enabled``) whose bars are redrawn on stderr until the block
    ends; a bar of another key (or another description) starts a new line."""
    if not enabled:
        yield None
        return
    relay = BarRelay.remote()
    stop, shown = threading.Event(), {"key": None, "desc": None}

    def draw(batch):
        for key, line in batch:
            desc = line.split(":")[0]
            if shown["key"] is not None and (key, desc) != (shown["key"], shown["desc"]):
                sys.stderr.write("\n")
            sys.stderr.write("\r" + line + "\033[K")
            shown.update(key=key, desc=desc)
        sys.stderr.flush()

    def poll():
        while not stop.wait(interval_s):
            with contextlib.suppress(Exception):
                draw(ray.get(relay.take.remote(), timeout=5))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            draw(ray.get(relay.take.remote(), timeout=5))
        if shown["key"] is not None:
            sys.stderr.write("\n")
        ray.kill(relay)
