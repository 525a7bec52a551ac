"""Runs whose process was killed: a job killed with SIGKILL (or a lost machine) never ends its MLflow run, which
would stay RUNNING forever. Every run this package opens is tagged with the host and the process that holds it
(``pema.host``, ``pema.pid`` and the process's start time, so that a reused pid is not taken for the same
process); the next job on that store ends such runs as KILLED, tagged ``pema.ended_by``.

Only runs of this host are judged: a run held by another machine of a cluster may be alive.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from mlflow.tracking import MlflowClient

HOST, PID, STARTED = "pema.host", "pema.pid", "pema.pid_started"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None when there is
    no such process (or no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "pid (comm)": state is field 3, starttime field 22


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name the process holding a run (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return {HOST: socket.gethostname(), PID: str(pid), STARTED: _start_time(pid) or ""}


def is_orphaned(tags: dict[str, str]) -> bool:
    """True when the tags name a process of this host that no longer runs."""
    if tags.get(HOST) != socket.gethostname() or not tags.get(PID, "").isdigit():
        return False
    started = _start_time(int(tags[PID]))
    return started is None or (bool(tags.get(STARTED)) and started != tags[STARTED])


def end_orphaned_runs(experiment_id: str, client: MlflowClient | None = None) -> list[str]:
    """End as KILLED the runs of ``experiment_id`` left RUNNING by a process of this host that is gone; returns
    their ids."""
    client = client or MlflowClient()
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if is_orphaned(run.data.tags):
            client.set_tag(run.info.run_id, "pema.ended_by", "a later job: the process that held the run was gone")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def finish_recorded_runs(run_ids, client: MlflowClient | None = None) -> list[str]:
    """End as FINISHED the runs whose stage recorded its result (``pema.stages.ledger``) but that a kill left open
    (RUNNING) or that :func:`end_orphaned_runs` ended as KILLED: the stage's work was done. Returns their ids."""
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    finished = []
    for run_id in run_ids:
        try:
            status = client.get_run(run_id).info.status
        except MlflowException:  # another store, or the run was deleted
            continue
        if status in ("RUNNING", "KILLED"):
            client.set_tag(run_id, "pema.ended_by", "a later job: the stage had recorded its result")
            client.set_terminated(run_id, status="FINISHED")
            finished.append(run_id)
    return finished


def finished_children(run_id: str, tag: str, client: MlflowClient | None = None) -> set[str]:
    """The values of ``tag`` on the FINISHED child runs of ``run_id`` (MlflowException when the store lacks that
    run): a job that resumes a killed job's run logs only the children still missing, so each keeps one."""
    client = client or MlflowClient()
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], max_results=1000, filter_string=(
        f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'FINISHED'"))
    return {c.data.tags.get(tag) for c in children} - {None}
