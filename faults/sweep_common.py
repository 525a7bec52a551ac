"""What the kill sweep (:mod:`faults.kill_sweep`) and the checks of :mod:`faults.user_sweep` share: the jobs and
their command lines, the environment that tags a job's processes, running a job, a fresh copy of a base folder, the
processes and MLflow runs a job left behind, and the tally of one instant or trial. It imports neither of them (no
import cycle).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "configs" / "smoke.yaml")
PY = sys.executable
TOKENS = {"acme": "t-faults-0123456789"}


@dataclass
class Job:
    name: str
    argv: list[str]  # after the script; {out} is the output folder
    needs: str | None = None  # the base folder the job starts from: None, "built" or "trained"
    outputs: tuple[str, ...] = ()
    timeout_s: float = 900
    extra: dict = field(default_factory=dict)

    def command(self, out: Path, port: int | None = None) -> list[str]:
        script = {"build": "build_memory", "owner": "serve_owner"}.get(self.name, self.name)
        args = [a.format(out=out, port=port, tokens=out / "tokens.json") for a in self.argv]
        return [PY, str(ROOT / "jobs" / f"{script}.py"), *args]


COMMON = ["--config", SMOKE, "--output-dir", "{out}", "--no-progress"]
JOBS = {
    "build": Job("build", COMMON, outputs=("memory", "head")),
    "train": Job("train", COMMON, needs="built", outputs=("adapter",)),
    "evaluate": Job("evaluate", COMMON, needs="trained", outputs=("predictions",)),
    "pipeline": Job("pipeline", COMMON, outputs=("memory", "head", "adapter", "predictions", "summary")),
    "register": Job("register", COMMON + ["--name", "pema-faults"], needs="trained", outputs=("champion",)),
    "tune": Job("tune", COMMON + ["--num-samples", "2", "--decode-samples", "1", "--name", "pema-faults-tune",
                                  "train.epochs=1"], needs="built", outputs=("adapter", "champion"), timeout_s=1500),
    "compare": Job("compare", COMMON + ["--systems", "zero_shot,knn_lm,pema_const"], needs="built",
                   outputs=("predictions",)),
    "owner": Job("owner", COMMON[:4] + ["--tokens", "{tokens}", "--port", "{port}", "--audit", "{out}/audit.jsonl",
                                        "--once"], outputs=("service",)),
}


def job_env(cluster, tag: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PEMA_OWNER"))}
    return {**env, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PEMA_FAULT_TAG": tag, "PYTHONUNBUFFERED": "1"}


def tagged_processes(tag: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if f"PEMA_FAULT_TAG={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def kill_tagged(tag: str) -> int:
    pids = tagged_processes(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


def run(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, float]:
    start = time.monotonic()
    with open(log, "ab") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - start


STRAYS_WAIT_S = 30  # how long a stopped job's processes may take to go (Ray's, a few seconds)


def running_runs(out: Path) -> list[str]:
    """The runs of ``out``'s MLflow store left RUNNING (none when there is no store yet)."""
    import sqlite3

    if not (out / "mlflow.db").is_file():
        return []
    with sqlite3.connect(out / "mlflow.db") as con:
        return [r[0] for r in con.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]


def strays(tag: str, wait_s: float | None = None) -> int:
    """Processes of the job that are still there ``wait_s`` seconds after it exited (Ray's own take a few seconds
    to go); they are killed and counted."""
    deadline = time.monotonic() + (STRAYS_WAIT_S if wait_s is None else wait_s)
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(1)
    return kill_tagged(tag)


def fresh(base: Path | None, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    if base is None:
        dest.mkdir(parents=True)
    else:
        shutil.copytree(base, dest, symlinks=True)
    (dest / "tokens.json").write_text(json.dumps(TOKENS))
    return dest


def tally(result: dict, ok: str, problems: list[str], failure: dict, folder: Path, line: str) -> None:
    """Count one instant or trial in ``result``: a failure keeps its folder, a pass removes it; one console line."""
    result["tried"] += 1
    if problems:
        result["failures"].append({**failure, "problems": problems, "folder": str(folder)})
    else:
        result[ok] += 1
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{line}: {'ok' if not problems else 'FAILED ' + '; '.join(problems)[:300]}", flush=True)
