"""`ray job submit` of the smoke pipeline to a real local cluster, and every job's bad-input exit code."""
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pema.memory import MemoryReader, verify_memory
from pema.pipeline import SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("pipeline", "build_memory", "train", "evaluate", "register", "tune", "compare")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_smoke_pipeline(ray_cluster, tmp_path):
    out = tmp_path / "run"
    job_id = f"pema-smoke-{uuid.uuid4().hex[:8]}"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard,
           "--submission-id", job_id, "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"),
           "--", sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml", "--output-dir", str(out),
           "--no-progress", "train.num_workers=2", "memory.num_actors=2"]
    deadline = time.monotonic() + 120
    while True:  # right after `ray start` the dashboard answers before the node's job agent has registered
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, env=ray_cluster.env(), cwd=tmp_path)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    with urllib.request.urlopen(f"{ray_cluster.dashboard}/api/jobs/{job_id}", timeout=10) as r:
        assert json.load(r)["status"] == "SUCCEEDED"
    assert "pema_gu" in proc.stdout  # the job's own table, streamed back by `ray job submit`

    summary = json.loads((out / "summary.json").read_text())
    assert set(SYSTEMS) <= set(summary) and {"timings_s", "train", "memory_rows"} <= set(summary)
    for system in SYSTEMS:
        assert {"bleu", "chrf", "ter"} <= set(summary[system])
        assert len((out / "predictions" / f"{system}.jsonl").read_text().splitlines()) == 6  # smoke: test_limit 6
    assert summary["ray"]["train_workers"] == 2 and [t["phase"] for t in summary["train"]] == ["rct", "rct_pd"]
    manifest = verify_memory(out / "memory" / "train")
    rows = MemoryReader(out / "memory" / "train").read_all()
    assert summary["memory_rows"] == manifest.total_rows == len(rows["token"])
    pairs = set(zip(rows["example"].tolist(), rows["position"].tolist()))
    assert len(pairs) == manifest.total_rows and manifest.num_examples == 16  # smoke: train_limit 16
    assert (out / "adapter" / "adapter.json").is_file() and (out / "head" / "head.json").is_file()

    from mlflow.tracking import MlflowClient  # no MLFLOW_TRACKING_URI: the embedded store in the output folder

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pema").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"build_memory", "train", "evaluate"} and summary["mlflow"]["run_id"] == parent.info.run_id


@pytest.mark.parametrize("job", JOBS)
def test_jobs_reject_bad_input_with_exit_code_2(job, tmp_path):
    base = [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--output-dir", str(tmp_path / "o")]
    base += ["--name", "m"] if job == "register" else []
    bad_override = subprocess.run(base + ["--config", str(ROOT / "jobs/configs/smoke.yaml"), "train.kappa=2"],
                                  capture_output=True, text=True, timeout=120)
    assert bad_override.returncode == 2 and "train.kappa=2" in bad_override.stderr
    missing = subprocess.run(base + ["--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    assert not (tmp_path / "o").exists()
