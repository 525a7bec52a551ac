"""A real local Ray cluster for tests: ``ray start --head --block`` in its own process group.

Token auth is set explicitly (``RAY_AUTH_MODE=disabled``) for the cluster, the test process and every job it
submits, because a local ``ray.init()`` otherwise turns it on and later submissions fail (DESIGN.md section 4).
``ray start`` exits 0 even when the dashboard port is taken, so the dashboard's ``/api/version`` is polled before
the cluster is handed out. Teardown kills only this cluster's process group, never other sessions' clusters.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

AUTH_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    address: str  # GCS address for ray.init / RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:PORT for `ray job submit --address`
    proc: subprocess.Popen
    log: Path

    def env(self, **extra) -> dict:
        """Environment for a subprocess that should use this cluster (MLflow settings only from ``extra``: an
        in-process ``mlflow.set_tracking_uri`` must not leak into jobs)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        return {**base, **AUTH_ENV, "RAY_ADDRESS": self.address, **extra}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_cluster(tmp: Path, num_cpus: int = 4, timeout: float = 120.0) -> LocalCluster:
    os.environ.update(AUTH_ENV)  # this test process's own ray.init() must agree with the cluster
    port, dash = free_port(), free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    log = tmp / "ray_start.log"
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats",
           "--include-dashboard=true", "--node-ip-address=127.0.0.1",
           # the agent's default port (52365) is taken by any other cluster on this machine (another session's,
           # the kill sweep's): its job agent would then never come up ("No available agent to submit job")
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    with open(log, "wb") as f:
        # jobs inherit the cluster's environment: no MLflow setting of an earlier in-process test may leak into it
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**env, **AUTH_ENV},
                                start_new_session=True)
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(cluster.dashboard + "/api/version", timeout=2) as r:
                if r.status == 200:
                    return cluster
        except OSError:
            time.sleep(1)
    cluster.stop()
    raise RuntimeError(f"the Ray dashboard at {cluster.dashboard} did not answer within {timeout} s:\n"
                       f"{log.read_text()[-3000:]}")
