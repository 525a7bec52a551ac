"""What a user does to a running job (pema/jobs/guard.py): a second job on the same folder is refused, naming the
holder, and a killed holder's lock is taken over; Ctrl+C (SIGINT) and SIGTERM stop a job within its stage, with
exit 130 / 143, one line saying to rerun, no traceback, no run left RUNNING and no process left behind; the rerun
finishes from where it stopped."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pema.errors import ConfigError
from pema.jobs.guard import LOCK_NAME, FolderLock

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pema.jobs.guard import FolderLock\n"
        "with FolderLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")


def hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_on_the_folder_is_refused_until_the_holder_dies(tmp_path):
    holder = hold(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=rf"another job holds it, pid {holder.pid} on host "):
            with FolderLock(tmp_path / "run"):
                pass
        job = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_memory.py"), "--config", str(SMOKE),
                              "--output-dir", str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert job.returncode == 2 and f"another job holds it, pid {holder.pid}" in job.stderr, job.stderr[-2000:]
        assert "Traceback" not in job.stderr
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path / "run") as lock:  # SIGKILLed: the kernel released it, the next job takes it over
        assert f"pid {os.getpid()} " in lock.holder()


def signal_on_line(script: str, args: list[str], marker: str, sig: int, tag: str) -> subprocess.CompletedProcess:
    """Start ``jobs/<script>.py args`` in its own process group (no MLflow or Ray address from this process), wait
    for a console line holding ``marker``, send ``sig`` to the group (as a terminal's Ctrl+C does) and wait for the
    job to end."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "PEMA_OWNER"))},
           "PYTHONUNBUFFERED": "1", "PEMA_FAULT_TAG": tag}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{script}.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                os.killpg(proc.pid, sig)
                break
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + stdout, stderr)


def no_process_left(tag: str) -> bool:
    """True once no process carries ``tag`` (Ray's teardown takes a few seconds)."""
    for _ in range(30):
        if not tagged_processes(tag):
            return True
        time.sleep(1)
    return False


def tagged_processes(tag: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PEMA_FAULT_TAG={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def run_statuses(out: Path) -> list[str]:
    with sqlite3.connect(out / "mlflow.db") as con:
        return [r[0] for r in con.execute("SELECT status FROM runs")]


@pytest.mark.parametrize("sig, stage_line, code", [(signal.SIGINT, "[evaluate] started", 130),
                                                   (signal.SIGTERM, "[train] started", 143)])
def test_a_signal_stops_the_job_and_the_rerun_finishes(tmp_path, sig, stage_line, code):
    """Ctrl+C once training has run (Ray Train's own SIGINT handler used to outlive fit(): the job ran on and
    exited 0) and SIGTERM during training (Ray's C++ handler used to abort with a banner)."""
    out, tag = tmp_path / "run", uuid.uuid4().hex
    stopped = signal_on_line("pipeline", ["--config", str(SMOKE), "--output-dir", str(out), "--no-progress"],
                             stage_line, sig, tag)
    assert stopped.returncode == code, (stopped.stdout[-2000:], stopped.stderr[-3000:])
    assert "rerun the same command" in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "SIGTERM received" not in stopped.stderr
    assert "RUNNING" not in run_statuses(out) and {"KILLED", "FAILED"} & set(run_statuses(out))
    assert no_process_left(tag)  # Ray's processes of this job go with it
    again = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(SMOKE),
                            "--output-dir", str(out), "--no-progress"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[build_memory] skipped: done earlier" in again.stdout
    assert "RUNNING" not in run_statuses(out)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_owner_service_stops_the_same_way(tmp_path, sig, code):
    """The service runs until Ctrl+C or SIGTERM: then it exits 130 / 143 with one calm "stopped" line, without a
    traceback or Ray's "SIGTERM received" banner, and its processes go with it."""
    from local_ray import free_port

    tokens, tag = tmp_path / "tokens.json", uuid.uuid4().hex
    tokens.write_text('{"acme": "t-0123456789abcdef"}')
    stopped = signal_on_line("serve_owner", ["--config", str(SMOKE), "--output-dir", str(tmp_path / "run"),
                                             "--tokens", str(tokens), "--port", str(free_port()), "--audit",
                                             str(tmp_path / "audit.jsonl")], " at http://", sig, tag)
    stderr = stopped.stderr
    assert stopped.returncode == code, stderr[-3000:]
    assert "rerun the same command" in stderr and "Traceback" not in stderr and "SIGTERM received" not in stderr
    assert f"stopped ({signal.Signals(sig).name}); rerun the same command to start it again" in stderr
    assert "interrupted" not in stderr and "resume" not in stderr, stderr[-3000:]
    assert no_process_left(tag)


def test_a_bare_keyboard_interrupt_after_sigterm_still_exits_143(monkeypatch):
    """Ray's ray.get catches the job's Interrupted and raises a plain KeyboardInterrupt: the exit code and the line
    still follow the signal that was received."""
    import argparse

    from pema.jobs import cli, guard

    def stage_under_ray(args, *rest):
        with pytest.raises(guard.Interrupted):
            guard._raise(signal.SIGTERM, None)
        raise KeyboardInterrupt()  # what Ray raises in its place

    monkeypatch.setattr(cli, "_run_job", stage_under_ray)
    monkeypatch.setattr(guard, "RECEIVED", [])
    assert cli.run_job(argparse.Namespace(), lambda cfg: None) == 143
    monkeypatch.setattr(guard, "RECEIVED", [])
    monkeypatch.setattr(cli, "_run_job", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.run_job(argparse.Namespace(), lambda cfg: None) == 130
