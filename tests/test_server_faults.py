"""Servers and workers lost during a job: the MLflow server killed mid-run and started again, and a Ray Data
encode actor killed mid-build. Nothing may be lost: the job fails fast naming the URI (or finishes), the rerun
ends with the uninterrupted run's outputs, and no MLflow run is left RUNNING."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pema.config import load_config, with_absolute_data

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def job(name, out, env, *args):
    cmd = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--config", str(SMOKE), "--output-dir", str(out),
           "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finished(proc, timeout=600):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout + stderr


def train_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pema")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_mlflow_server_killed_mid_run_then_restarted(ray_cluster, tmp_path):
    from local_mlflow import start_server, stop_server
    from local_ray import free_port

    from pema.adapter.io import load_adapter

    port, folder = free_port(), tmp_path / "server"
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    env = ray_cluster.env(MLFLOW_TRACKING_URI=uri)
    out, ref = tmp_path / "run", tmp_path / "ref"
    rc, log = finished(job("build_memory", out, env))
    assert rc == 0, log[-3000:]
    shutil.copytree(out, ref, ignore=shutil.ignore_patterns("mlflow*", "mlartifacts"))
    rc, log = finished(job("train", ref, ray_cluster.env()))  # the reference, on its own embedded store
    assert rc == 0, log[-3000:]

    proc = job("train", out, env)
    deadline = time.monotonic() + 300
    while not any(r.data.tags.get("pema.stage") == "train" and r.info.status == "RUNNING" for r in train_runs(uri)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    stop_server(server, signal.SIGKILL)  # the server dies while the train run is open
    killed_at = time.monotonic()
    rc, log = finished(proc)
    assert rc == 2 and uri in log, log[-3000:]  # fails fast, naming the URI
    assert time.monotonic() - killed_at < 120
    assert (out / "memory" / "train" / "manifest.json").is_file() and (out / "head" / "head.json").is_file()

    server = start_server(folder, port)  # the same store, the same port
    try:
        rc, log = finished(job("train", out, env))
        assert rc == 0, log[-3000:]
        runs = [r for r in train_runs(uri) if r.data.tags.get("pema.stage") == "train"]
        assert sorted(r.info.status for r in runs) in (["FINISHED", "KILLED"], ["FAILED", "FINISHED"])
        assert not [r for r in train_runs(uri) if r.info.status == "RUNNING"]
    finally:
        stop_server(server)
    a, _ = load_adapter(ref / "adapter")
    b, _ = load_adapter(out / "adapter")
    for name, value in a.state_dict().items():  # same memory, same seed: the same adapter
        assert np.array_equal(b.state_dict()[name].numpy(), value.numpy()), name


def test_a_ray_data_actor_killed_mid_build_is_replaced(ray_client, tmp_path):
    from ray.util.state import list_actors

    from pema.executors.inline import InlineExecutor
    from pema.executors.ray_executor import RayExecutor
    from pema.formats.memory import MemoryReader
    from pema.stages.build import run_build

    overrides = ["data.train_limit=300", "data.dev_limit=4", "memory.rows_per_part=64", "memory.batch_tokens=512"]
    cfg = with_absolute_data(load_config(SMOKE, overrides))
    out, outcome = tmp_path / "ray", {}

    def build():
        try:
            outcome["result"] = run_build(cfg, out, RayExecutor(False), progress=False)
        except BaseException as exc:  # noqa: BLE001  (re-raised below, in the test's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=build)
    thread.start()
    victim, deadline = None, time.monotonic() + 300
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        actors = [a for a in list_actors(address=ray_client.dashboard, filters=[("state", "=", "ALIVE")],
                                         raise_on_missing_output=False)  # this cluster, not another one here
                  if "_EncodeActor" in a.class_name and a.pid]
        staged = out / "memory" / "train.partial"
        if actors and staged.is_dir() and list(staged.glob("part-*.parquet.json")):  # mid-build: a part is done
            victim = actors[0].pid
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(600)
    assert victim is not None, "no encode actor was seen mid-build: the test proves nothing"
    assert "error" not in outcome, outcome.get("error")
    local = tmp_path / "inline"
    run_build(cfg, local, InlineExecutor(), progress=False)
    for split in ("train", "dev"):
        a, b = MemoryReader(local / "memory" / split).read_all(), MemoryReader(out / "memory" / split).read_all()
        for column in ("token", "example", "position"):
            np.testing.assert_array_equal(a[column], b[column])
        np.testing.assert_allclose(b["key"], a["key"], rtol=2 ** -10, atol=1e-6)
