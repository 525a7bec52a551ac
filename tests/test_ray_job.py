"""`ray job submit` of the smoke pipeline to a real local cluster, and every job's bad-input exit code."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pema.formats.memory import MemoryReader, verify_memory
from pema.stages.decode import SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("pipeline", "build_memory", "train", "evaluate", "register", "tune", "compare")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_smoke_pipeline(ray_cluster, tmp_path):
    out = tmp_path / "run"
    job_id = f"pema-smoke-{uuid.uuid4().hex[:8]}"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard,
           "--submission-id", job_id, "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"),
           "--", sys.executable, "-m", "pema", "run", "--config", "jobs/configs/smoke.yaml", "--output-dir", str(out),
           "--no-progress", "resources.train_workers=2", "resources.memory_actors=2"]
    deadline = time.monotonic() + 300  # a loaded 2-core machine: the agent has been seen to take over 2 min
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
    assert summary["executor"] == {"name": "ray", "train_workers": 2} and [t["phase"] for t in summary["train"]] == ["rct", "rct_pd"]
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


def _submit(ray_cluster, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``ray job submit ... -- <args>``, retried while the node's job agent is not up yet."""
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"), "--", *args]
    deadline = time.monotonic() + 300
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, env=ray_cluster.env(), cwd=cwd)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(5)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_memory_append_and_delete_run_as_ray_jobs(ray_cluster, tmp_path):
    """`pema memory append`, `pema memory delete` and the retraining, submitted as one `ray job submit`: the
    memory gets versions 2 and 3, and the train run logs version 3 as its dataset input."""
    from mlflow.tracking import MlflowClient

    from pema.config import load_config, with_absolute_data
    from pema.executors.inline import InlineExecutor
    from pema.formats.versions import pair_hash, read_examples, version_of
    from pema.stages.build import run_build
    from pema.stages.inputs import pairs_of_file, split_pairs

    out, smoke = tmp_path / "run", "jobs/configs/smoke.yaml"
    rows = [json.loads(x) for x in (ROOT / "data" / "nc" / "train.jsonl").read_text().splitlines()[:40]]
    cfg = with_absolute_data(load_config(ROOT / smoke))
    run_build(cfg, out, InlineExecutor(), progress=False)
    gone = [{"en": p.source, "du": p.target} for p in split_pairs(cfg, "train")[1:3]]  # two pairs it holds
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:33]))
    (tmp_path / "gone.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gone))
    new = pairs_of_file(cfg, tmp_path / "new.jsonl", held_out=True)[0]
    common = f"--config {ROOT / smoke} --output-dir {out} --no-progress"
    # one job running the three commands in turn: separate submits of the same working dir race Ray's deletion of
    # the uploaded package when the job before ends ("Failed to download runtime_env file package")
    steps = [f"memory append {common} --pairs {tmp_path / 'new.jsonl'}",
             f"memory delete {common} --pairs {tmp_path / 'gone.jsonl'}", f"train {common}"]
    script = " && ".join(f"{sys.executable} -m pema {step}" for step in steps)
    proc = _submit(ray_cluster, tmp_path, "bash", "-c", script)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[memory] 2 pairs asked, 2 found and deleted" in proc.stdout, proc.stdout[-3000:]
    mem = out / "memory" / "train"
    hashes = set(read_examples(mem)["hash"].tolist())
    assert version_of(verify_memory(mem)) == 3 and new and {pair_hash(p.source, p.target) for p in new} <= hashes
    assert not {pair_hash(r["en"], r["du"]) for r in gone} & hashes
    assert json.loads((out / "adapter" / "adapter.json").read_text())["memory"]["version"] == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pema").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"memory_append", "memory_delete", "train"} <= names
    train = next(r for r in runs if r.info.run_name == "train")
    assert train.data.tags["pema.memory_version"] == "train v3, dev v1"  # nothing withdrawn was in dev
    assert {d.dataset.name for d in train.inputs.dataset_inputs} >= {"memory/train@v3", "memory/dev@v1"}


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


SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
MISSING_MODEL = "/nonexistent/model"
# (job, the flag that points at a JSONL file the job reads): the train job reads no JSONL (memory and head only)
DATA_FLAG = {"pipeline": "--test", "build_memory": "--dev", "evaluate": "--test", "register": "--dev",
             "tune": "--train", "compare": "--test"}


def latin1_file(folder: Path) -> Path:
    path = folder / "latin1.jsonl"
    path.write_bytes('{"en": "Hello", "du": "Hallo"}\n'.encode() + b'{"en": "Gr\xfc\xdfe", "du": "Gr\xfc\xdfe"}\n')
    return path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bad_inputs(job: str, folder: Path) -> list[tuple[list[str], str]]:
    """(extra arguments, what the error line must name) for each bad input the job reads."""
    cases = [(["adapter.rank=true"], "error: adapter.rank=True is invalid"),
             (["decode.gu.lam_max=1.5"], "error: decode.gu.lam_max=1.5 is invalid")]
    if job in DATA_FLAG:
        bad = latin1_file(folder)
        cases.append(([DATA_FLAG[job], str(bad)], f"error: {bad}:2: not valid UTF-8 (byte 0xfc at byte offset 41"))
    if job != "train":  # the data owner's training never loads the PLM
        cases.append(([f"model.model_id={MISSING_MODEL}"],
                      f"error: model.model_id={MISSING_MODEL!r}: no such file or folder"))
    if job in ("train", "evaluate"):  # their inputs are bundles of earlier stages
        cases.append(([], "lacks ["))
    return cases


@pytest.mark.parametrize("job", JOBS)
def test_jobs_refuse_bad_input_before_ray_and_leave_the_folder_as_it_was(job, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a job whose input is wrong")

    monkeypatch.setattr("pema.executors.ray_runtime.init_ray", no_ray)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)  # the smoke config's data paths are relative to the repository
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    before = snapshot(out)
    main = load_job(job).main
    base = ["--config", str(SMOKE), "--output-dir", str(out), "--no-progress"]
    base += ["--name", "m"] if job == "register" else []
    for extra, named in bad_inputs(job, tmp_path):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert named in err, (extra, err)
        assert snapshot(out) == before, extra  # no config.json, no mlflow.db, nothing
    assert {p.name for p in tmp_path.iterdir()} <= {"latin1.jsonl", "o"}  # nothing beside the folder either


@pytest.mark.parametrize("extra, named", [
    (["--train", "LATIN1"], "LATIN1:2: not valid UTF-8"),
    ([f"model.model_id={MISSING_MODEL}"], f"model.model_id={MISSING_MODEL!r}: no such file or folder"),
])
def test_pipeline_job_exits_2_on_the_issues_bad_inputs_and_writes_nothing(extra, named, tmp_path):
    bad = str(latin1_file(tmp_path))
    extra, named = [a.replace("LATIN1", bad) for a in extra], named.replace("LATIN1", bad)
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-m", "pema", "run", "--config", str(SMOKE), "--output-dir", str(out),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {named}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["latin1.jsonl"]


