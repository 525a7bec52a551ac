"""The kill sweep (faults/kill_sweep.py): a seeded sample in make test (the full sweep is `make faults`), and
guards that its checks do catch a lost row, a changed tensor and a run left RUNNING."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faults.compare_outputs import compare, mlflow_problems  # noqa: E402
from faults.kill_sweep import instants  # noqa: E402


def test_instants_cover_the_run_from_its_first_second_to_its_last():
    ts = instants(40.0, 20, seed=0)
    assert ts == instants(40.0, 20, seed=0) and ts != instants(40.0, 20, seed=1)  # seeded
    assert all(2.0 * i <= t < 2.0 * (i + 1) for i, t in enumerate(ts))  # one per 2-s slice of [0, 40)


def test_the_checks_catch_lost_rows_changed_tensors_and_running_runs(tmp_path, monkeypatch):
    import mlflow
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient
    from safetensors.numpy import load_file, save_file

    from conftest import inline_build
    from pema.formats.tasks import load_pairs

    pairs = load_pairs(ROOT / "data" / "wmt22" / "train.jsonl", limit=6)
    ref = tmp_path / "ref"
    for split in ("train", "dev"):
        inline_build(pairs, ref / "memory" / split, rows_per_part=64)
    (ref / "adapter").mkdir()
    save_file({"A": __import__("numpy").ones((2, 2), "float32")}, ref / "adapter" / "adapter.safetensors")
    same = tmp_path / "same"
    shutil.copytree(ref, same)
    assert compare(("memory", "adapter"), ref, same) == []

    bad = tmp_path / "bad"
    shutil.copytree(ref, bad)
    part = sorted((bad / "memory" / "train").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)  # one row lost
    tensors = load_file(bad / "adapter" / "adapter.safetensors")
    tensors["A"][0, 0] = 2.0
    save_file(tensors, bad / "adapter" / "adapter.safetensors")
    problems = compare(("memory", "adapter"), ref, bad)
    assert any("memory/train" in p for p in problems) and any("adapter.safetensors[A]" in p for p in problems)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pema.tracking.runs import connect, experiment_id

    connect(bad)
    client = MlflowClient()
    exp = experiment_id(output_dir=bad)
    client.set_terminated(client.create_run(exp, tags={"pema.stage": "train"}).info.run_id, "FINISHED")
    assert mlflow_problems(bad, killed=True)["problems"] == []
    client.create_run(exp, tags={"pema.stage": "evaluate"})  # left RUNNING, and evaluate never finished
    problems = mlflow_problems(bad, killed=True)["problems"]
    assert any("RUNNING" in p for p in problems) and any("stage evaluate" in p for p in problems)
    mlflow.set_tracking_uri(None)


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_a_seeded_sample_of_kills_is_survived(tmp_path):
    """Two seeded instants for the build and the train job (`make faults` runs 20 per job, every job)."""
    from faults.kill_sweep import main

    report = tmp_path / "report.json"
    rc = main(["--jobs", "build,train", "--kills", "2", "--seed", "7", "--workdir", str(tmp_path / "work"),
               "--report", str(report)])
    jobs = json.loads(report.read_text())["jobs"]
    assert [j["job"] for j in jobs] == ["build", "train"]
    for job in jobs:
        assert job["tried"] == 2 and job["survived"] == 2, job["failures"]
    assert rc == 0


# ------------------------------------------------- issue 21: Ctrl+C and SIGTERM, a changed file, two jobs at once

FAKE_JOB = """import os, signal, subprocess, sys, time
mode, out = sys.argv[1], sys.argv[sys.argv.index("--output-dir") + 1]
def stop(signum, frame):
    if mode == "traceback":
        raise RuntimeError("boom")
    if mode != "silent":
        print("interrupted: rerun the same command to resume", file=sys.stderr, flush=True)
    if mode == "running":
        import sqlite3
        with sqlite3.connect(os.path.join(out, "mlflow.db")) as con:
            con.execute("CREATE TABLE runs (run_uuid TEXT, status TEXT)")
            con.execute("INSERT INTO runs VALUES ('r1', 'RUNNING')")
    sys.exit({"exit1": 1}.get(mode, 128 + signum))
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN if mode == "ignore" else stop)
if mode == "orphan":  # a child that ignores the signal and outlives the job
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"])
time.sleep(30)
"""


@pytest.mark.parametrize("mode, sig, problem", [
    ("clean", "INT", None), ("clean", "TERM", None), ("silent", "INT", "no 'rerun the same command' line"),
    ("traceback", "TERM", "a traceback"), ("exit1", "INT", "exit 1 after SIGINT, not 130"),
    ("ignore", "TERM", "still running 2 s after SIGTERM"), ("running", "INT", "left RUNNING after SIGINT"),
    ("orphan", "TERM", "1 process(es) left behind after SIGTERM")])
def test_the_signal_checks_catch_a_job_that_does_not_stop_cleanly(tmp_path, monkeypatch, mode, sig, problem):
    import os
    import uuid

    import faults.kill_sweep as sweep

    monkeypatch.setattr(sweep, "STOP_WITHIN_S", 2)
    monkeypatch.setattr(sweep, "STRAYS_WAIT_S", 1)
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PEMA_FAULT_TAG": uuid.uuid4().hex}
    cmd = [sys.executable, "-c", FAKE_JOB, mode, "--output-dir", str(tmp_path / "out")]
    result = sweep.kill_at(cmd, env, 1.0, tmp_path / "job.log", sig)
    assert result["killed"]
    if problem is None:
        assert result["problems"] == [] and result["rc"] == (130 if sig == "INT" else 143), result
    else:
        assert any(problem in p for p in result["problems"]), result["problems"]
    assert sweep.tagged_processes(env["PEMA_FAULT_TAG"]) == []  # whatever it left is gone


def test_a_data_change_drops_or_swaps_pairs_among_those_the_config_reads(tmp_path):
    import random

    from faults.user_sweep import change_pairs

    lines = [f'{{"en": "s{i}", "du": "t{i}"}}\n' for i in range(10)]
    seen = set()
    for seed in range(12):
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(lines[:2]) + "\n" + "".join(lines[2:]))  # a blank line among them
        what = change_pairs(path, 4, random.Random(seed))
        after = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
        if len(after) == 9:  # one of the first 4 pairs dropped
            assert after[3:] == lines[4:] and set(after[:3]) < set(lines[:4]), what
        else:  # two of the first 4 swapped
            assert after != lines and after[4:] == lines[4:] and sorted(after) == sorted(lines), what
        seen.add(what.split(":")[1].split()[0])
    assert seen == {"dropped", "swapped"}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ctrl_c_and_two_jobs_at_once_on_the_build_job(tmp_path, ray_cluster):
    """One seeded Ctrl+C instant of the build job, then two copies of it on one folder (the full figures:
    `faults/kill_sweep.py --signal INT|TERM`, `--check two_jobs`, `--check data_changed`)."""
    from faults.kill_sweep import JOBS, sweep_job
    from faults.user_sweep import two_jobs_job

    swept = sweep_job(JOBS["build"], {}, tmp_path, ray_cluster, 1, 23, tmp_path, sig="INT")  # at 51% of T
    assert swept["tried"] == 1 and swept["survived"] == 1, swept
    assert set(swept["exit_codes"]) <= {"130", "0"} and swept["stray_processes"] == 0, swept
    two = two_jobs_job(JOBS["build"], {}, tmp_path, ray_cluster, 1, 23, tmp_path,
                       reference=tmp_path / "build" / "reference")
    assert two["tried"] == 1 and two["passed"] == 1, two
