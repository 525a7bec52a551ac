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
