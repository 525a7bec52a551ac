"""A real MLflow tracking server for tests, started by the project's own ``mlflow/server.sh`` in its own process
group on 127.0.0.1 (sqlite store, artifacts folder), so that a test can kill it and start it again on the same
port and store."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(folder: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    """``mlflow/server.sh`` on ``port`` with its store and artifacts in ``folder``; returns once ``/health``
    answers. The log is appended to ``folder/server.log``."""
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_STORE": str(folder / "store" / "mlflow.db"),
           "MLFLOW_ARTIFACTS": str(folder / "artifacts"), "MLFLOW_WORKERS": "1"}
    with open(folder / "server.log", "ab") as log:
        proc = subprocess.Popen([str(ROOT / "mlflow" / "server.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the server's whole process group (SIGKILL: the server dies as on a lost machine)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
