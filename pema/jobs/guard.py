"""What holds a job together from its edge: one job per output folder, and signals that stop it cleanly.

- :class:`FolderLock`: an exclusive ``flock`` on ``<output-dir>/.pema.lock`` for the job's life. A second job on
  the same folder gets a :class:`~pema.errors.ConfigError` (exit 2) naming the holder (host, pid, command, since
  when). The kernel releases the lock when its holder dies, so a lock left by a killed job is taken over, never
  obeyed forever; the file stays (removing a lock file races with the next job opening it).
- :func:`stop_on_signals`: SIGINT (Ctrl+C) and SIGTERM raise :class:`Interrupted` in the main thread, whatever
  Ray installed before (Ray's C++ SIGTERM handler dumps a banner and aborts). The job then unwinds: its MLflow
  run ends KILLED, Ray is shut down with its workers, and the command exits 130 (SIGINT) or 143 (SIGTERM) with a
  line that says to rerun the same command.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from pema.errors import ConfigError

LOCK_NAME = ".pema.lock"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """A job stopped by a signal; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class FolderLock:
    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return (f"pid {info['pid']} on host {info['host']} (since {info['since']}): "
                    f"{' '.join(info.get('argv', []))[:200]}")
        except (OSError, ValueError, KeyError, TypeError):
            return "a job that has not written its name yet"

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"--output-dir {self.path.parent}: another job holds it, {self.holder()}; wait for "
                              "it to finish or stop it, or give another --output-dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


RECEIVED: list[int] = []  # the signals received, in order: Ray may catch Interrupted and raise a bare KeyboardInterrupt


def _raise(signum, frame):
    RECEIVED.append(signum)
    raise Interrupted(signum)


def interruption(exc: KeyboardInterrupt) -> Interrupted:
    """The :class:`Interrupted` behind ``exc``: itself, or, when something between (Ray's ``ray.get``) replaced it
    by a plain KeyboardInterrupt, one for the last signal received (SIGINT when none was: a Ctrl+C before the
    handlers were installed)."""
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(RECEIVED[-1] if RECEIVED else signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise :class:`Interrupted` while the block runs (main thread only); the previous
    handlers come back after it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    for s in EXIT_CODES:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
