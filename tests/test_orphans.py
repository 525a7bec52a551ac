"""Runs left RUNNING by a killed job are ended as KILLED by the next job on the store, and only those: a live
process's run, another host's run and a reused pid are told apart (pema/tracking/orphans.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


@pytest.fixture
def client(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pema.tracking.runs import connect, experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    connect(tmp_path)
    yield MlflowClient(), experiment_id(output_dir=tmp_path)
    mlflow.set_tracking_uri(None)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_only_runs_of_gone_processes_of_this_host_are_ended(client):
    from pema.tracking.orphans import STARTED, end_orphaned_runs, process_tags

    client, exp = client
    mine = process_tags()
    runs = {
        "killed": {**mine, "pema.pid": str(dead_pid()), STARTED: "1"},
        "alive": mine,
        "reused_pid": {**mine, STARTED: str(int(mine[STARTED]) + 1)},  # this pid, but not the process that ran it
        "other_host": {**mine, "pema.host": "another-machine", "pema.pid": str(dead_pid())},
        "untagged": {},
    }
    ids = {name: client.create_run(exp, run_name=name, tags=tags).info.run_id for name, tags in runs.items()}
    ended = end_orphaned_runs(exp, client)
    assert sorted(ended) == sorted([ids["killed"], ids["reused_pid"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"killed": "KILLED", "alive": "RUNNING", "reused_pid": "KILLED", "other_host": "RUNNING",
                      "untagged": "RUNNING"}
    assert "pema.ended_by" in client.get_run(ids["killed"]).data.tags
    assert end_orphaned_runs(exp, client) == []  # nothing left to end


def test_a_killed_stage_run_is_ended_by_the_next_stage_run(tmp_path, monkeypatch):
    """A stage run held by a process killed with SIGKILL stays RUNNING until the next job's first stage run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pema.config import load_config
    from pema.tracking.runs import connect, experiment_id, stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pema.config import load_config; "
            "from pema.tracking.runs import stage_run\n"
            "with stage_run('train', load_config(None), sys.argv[1]):\n"
            "    print('running', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), os.getcwd()], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    connect(tmp_path)
    client, exp = MlflowClient(), experiment_id(output_dir=tmp_path)
    [killed] = client.search_runs([exp])
    assert killed.info.status == "RUNNING"
    with stage_run("train", load_config(None), tmp_path):
        pass
    runs = {r.info.run_id: r.info.status for r in client.search_runs([exp])}
    assert runs[killed.info.run_id] == "KILLED" and sorted(runs.values()) == ["FINISHED", "KILLED"]
    mlflow.set_tracking_uri(None)
