"""Paths and disks (issue 21, item 6): a run folder's MLflow artifacts follow the folder when it is copied or moved,
a sqlite store's sit beside it, and a read-only output folder or a disk that fills during a stage exits 2 naming
the path with no run left RUNNING.

The read-only folder and the full disk are real: a tmpfs mounted read-only, or small, in a private user and mount
namespace (``unshare -rm``), where even root gets EROFS and ENOSPC; skipped where the kernel allows no such
namespace."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pema.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
RUNS = """
import json, sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(json.dumps(con.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()))
"""


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=1m none /tmp"], capture_output=True, timeout=60)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="no user+mount namespace here (unshare -rm)")


def sandbox(script: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """bash ``script`` (``set -eu``) in a new user and mount namespace, where it may mount a tmpfs; ``$PY`` is this
    Python, the working directory and the first import path this repository."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return subprocess.run(["unshare", "-rm", "bash", "-euc", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PY": sys.executable, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture
def store_env(monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------------------------------------
# artifacts follow the folder and the store
# ------------------------------------------------------------------------------------------------------------------

def next_job() -> None:
    """What a new job process starts with: no tracking URI (``mlflow.set_tracking_uri`` exports
    MLFLOW_TRACKING_URI, which this process would otherwise keep) and no artifact store cached per run."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    mlflow.set_tracking_uri(None)
    utils._artifact_repos_cache.clear()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_a_copied_or_moved_run_folder_writes_its_artifacts_into_itself(tmp_path, store_env):
    """The experiment and its runs named the first folder's mlartifacts/, absolute: a copy (or the folder moved
    elsewhere) that ran the next job wrote into the original, or into a folder that no longer existed. Now a rerun,
    a new run and a reopened run of the copy write into the copy, its old runs read the copy's artifacts, and the
    original is untouched."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pema.tracking.runs import stage_run

    cfg = load_config(SMOKE)
    first = tmp_path / "first"
    with stage_run("build_memory", cfg, first) as run:
        mlflow.log_text("one", "note.txt")
    old_id = run.info.run_id
    original = _files(first / "mlartifacts")
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    next_job()
    with stage_run("train", cfg, copy) as new:
        mlflow.log_text("two", "note.txt")
    with stage_run("build_memory", cfg, copy, run_id=old_id):  # a resumed job reopens its run
        mlflow.log_text("three", "again.txt")
    assert _files(first / "mlartifacts") == original  # the original folder got nothing
    mine = copy / "mlartifacts"
    assert (mine / new.info.run_id / "artifacts" / "note.txt").read_text() == "two"
    assert (mine / old_id / "artifacts" / "again.txt").read_text() == "three"
    client = MlflowClient()
    assert client.get_run(old_id).info.artifact_uri == (mine / old_id / "artifacts").resolve().as_uri()
    assert client.get_experiment(new.info.experiment_id).artifact_location == mine.resolve().as_uri()
    assert Path(mlflow.artifacts.download_artifacts(run_id=old_id, artifact_path="note.txt",
                                                    dst_path=str(tmp_path / "dl"))).read_text() == "one"

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(copy), str(moved))  # the folder moved away: the old path no longer exists
    next_job()
    with stage_run("evaluate", cfg, moved) as last:
        mlflow.log_text("four", "note.txt")
    assert (moved / "mlartifacts" / last.info.run_id / "artifacts" / "note.txt").read_text() == "four"
    assert not copy.exists()
    assert MlflowClient().get_run(new.info.run_id).info.artifact_uri.startswith(moved.resolve().as_uri() + "/")


def test_a_sqlite_tracking_uri_keeps_artifacts_beside_the_store(tmp_path, monkeypatch, store_env):
    """MLFLOW_TRACKING_URI=sqlite:///.../x.db put the artifacts in ./mlruns of whatever folder the job started
    from. Now they go to mlartifacts/ beside x.db, for a new store and for one whose experiment an older job made
    pointing at ./mlruns."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pema.tracking.runs import stage_run

    cfg = load_config(SMOKE, [f"data.{s}={ROOT / 'data' / 'wmt22' / (s + '.jsonl')}" for s in ("train", "dev", "test")])
    for name, old_style in (("fresh", False), ("older", True)):
        store = tmp_path / name / "store" / "x.db"
        cwd = tmp_path / name / "cwd"
        cwd.mkdir(parents=True)
        monkeypatch.chdir(cwd)
        next_job()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        if old_style:  # the experiment as the old code made it: artifacts in the working directory's ./mlruns
            store.parent.mkdir(parents=True)
            MlflowClient(tracking_uri=f"sqlite:///{store}").create_experiment("pema")
        with stage_run("build_memory", cfg, tmp_path / name / "out") as run:
            mlflow.log_text("x", "probe.txt")
        beside = store.parent / "mlartifacts" / run.info.run_id / "artifacts"
        assert (beside / "probe.txt").read_text() == "x" and (beside / "config.yaml").is_file()
        assert not (cwd / "mlruns").exists() and not (tmp_path / name / "out" / "mlartifacts").exists()


# ------------------------------------------------------------------------------------------------------------------
# a read-only output folder
# ------------------------------------------------------------------------------------------------------------------

def test_check_output_dir_names_a_folder_that_cannot_be_made(tmp_path):
    from pema.errors import ConfigError
    from pema.jobs.cli import check_output_dir

    check_output_dir(str(tmp_path / "a" / "b"))  # writable: fine, and nothing is left behind
    assert list(tmp_path.iterdir()) == []
    check_output_dir(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    made = "--output-dir /proc/pema-no-such/out cannot be made: /proc cannot be written"
    with pytest.raises(ConfigError, match=made):  # even root cannot make a folder in /proc
        check_output_dir("/proc/pema-no-such/out")
    check_output_dir("/proc/pema-no-such/out", write=False)  # a service only reads the folder: not probed


@needs_mount
def test_a_read_only_output_dir_exits_2_naming_it_before_ray(tmp_path):
    """A read-only --output-dir, and one that cannot be made under a read-only folder: exit 2 naming the path, no
    traceback, before Ray starts (RAY_ADDRESS names no cluster: a job that got as far as Ray would fail on it,
    not with exit 2) and before any MLflow run opens."""
    mnt, res = tmp_path / "ro", tmp_path / "res"
    mnt.mkdir(), res.mkdir()
    store = tmp_path / "store" / "x.db"
    script = f"""
mount -t tmpfs -o ro,size=1m none {mnt}
for name in ro new; do
  out={mnt}; [ $name = new ] && out={mnt}/runs/a
  set +e
  $PY jobs/build_memory.py --config {SMOKE} --output-dir $out --no-progress >{res}/$name.out 2>{res}/$name.err
  echo $? >{res}/$name.rc
  set -e
done
"""
    proc = sandbox(script, timeout=300, RAY_ADDRESS="127.0.0.1:9", MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    assert proc.returncode == 0, proc.stderr
    for name, path in (("ro", mnt), ("new", mnt / "runs" / "a")):
        err = (res / f"{name}.err").read_text()
        assert (res / f"{name}.rc").read_text().strip() == "2", err
        assert f"error: --output-dir {path} cannot be" in err and "Read-only file system" in err, err
        assert "Traceback" not in err and "ray" not in err.lower(), err
    assert not store.exists()  # no run was opened (the store is not even made)


# ------------------------------------------------------------------------------------------------------------------
# a disk that fills
# ------------------------------------------------------------------------------------------------------------------

FILL_IN_STAGE = """
import errno, json, sys
from pema.config import load_config
from pema.tracking.runs import stage_run
out = sys.argv[2]
try:
    with stage_run("build_memory", load_config(sys.argv[1]), out) as run:
        with open(f"{out}/big.bin", "wb") as f:  # a stage that fills the disk: the store's disk too
            while True:
                f.write(b"\\0" * (1 << 16))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "filename": exc.filename, "run": run.info.run_id}))
"""


@needs_mount
def test_a_disk_that_fills_inside_a_stage_ends_its_run_failed(tmp_path):
    """The stage fills the disk that holds mlflow.db: MLflow could not write FAILED (sqlite needs room for its
    journal), so the run stayed RUNNING. It ends FAILED now (the row is rewritten in place, which needs no new
    room), and the stage's OSError comes out as it was."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    (tmp_path / "fill.py").write_text(FILL_IN_STAGE)
    (tmp_path / "runs.py").write_text(RUNS)
    script = f"""
mount -t tmpfs -o size=4m none {mnt}
$PY {tmp_path}/fill.py {SMOKE} {mnt}/out
$PY {tmp_path}/runs.py {mnt}/out/mlflow.db
"""
    proc = sandbox(script, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raised, runs = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert raised["errno"] == errno.ENOSPC
    assert runs == [["build_memory", "FAILED"]], proc.stderr[-3000:]


@needs_mount
def test_a_disk_that_fills_during_ray_train_exits_2_naming_the_file(tmp_path):
    """The issue's case: the memory built, then the output folder's disk fills while Ray Train writes its
    checkpoints (a ray.train ControllerError or WorkerGroupError around an ENOSPC). The train job exits 2 naming
    what it could not write, with no traceback, and no run is left RUNNING: the train run ends FAILED."""
    mnt, res = tmp_path / "disk", tmp_path / "res"
    mnt.mkdir(), res.mkdir()
    out = mnt / "out"
    (tmp_path / "runs.py").write_text(RUNS)
    script = f"""
mount -t tmpfs -o size=24m none {mnt}
$PY jobs/build_memory.py --config {SMOKE} --output-dir {out} --no-progress >{res}/build.log 2>&1
free_kb=$(df -k --output=avail {mnt} | tail -1)
dd if=/dev/zero of={mnt}/filler bs=1K count=$((free_kb - 96)) 2>/dev/null
set +e
$PY jobs/train.py --config {SMOKE} --output-dir {out} --no-progress >{res}/train.out 2>{res}/train.err
echo $? >{res}/train.rc
set -e
$PY {tmp_path}/runs.py {out}/mlflow.db >{res}/runs.json
"""
    proc = sandbox(script, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + (res / "build.log").read_text()[-3000:]
    err = (res / "train.err").read_text()
    assert (res / "train.rc").read_text().strip() == "2", err[-5000:]
    assert "Traceback" not in err and "No space left on device" in err and str(out) in err, err[-5000:]
    runs = json.loads((res / "runs.json").read_text())
    assert ["train", "FAILED"] in runs and all(status != "RUNNING" for _, status in runs), runs


# ------------------------------------------------------------------------------------------------------------------
# a full disk behind Ray's errors
# ------------------------------------------------------------------------------------------------------------------

def _ray_wrapped(inner: OSError) -> list[BaseException]:
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    task = RayTaskError("decode", "Traceback ...", inner).as_instanceof_cause()
    return [ControllerError(inner), task,
            WorkerGroupError("worker 1 failed", {0: RuntimeError("other"),
                                                 1: UserExceptionWithTraceback(inner, "Traceback ...")})]


def test_full_disk_is_found_behind_ray_and_sqlite_errors():
    import sqlite3

    from pema.errors import full_disk

    inner = OSError(errno.ENOSPC, "No space left on device", "/runs/a/ray_train/checkpoint/x.pt")
    for wrapped in _ray_wrapped(inner):
        assert full_disk(wrapped) is inner, type(wrapped)
    con = sqlite3.connect(":memory:")
    try:
        con.execute("PRAGMA max_page_count = 1")
        con.execute("CREATE TABLE t (x)")
        con.execute("INSERT INTO t VALUES (randomblob(100000))")
    except sqlite3.OperationalError as exc:
        assert full_disk(exc).errno == errno.ENOSPC
    else:
        pytest.fail("sqlite did not report a full database")
    assert full_disk(RuntimeError("no")) is None and full_disk(OSError(errno.EACCES, "denied")) is None


def test_a_job_whose_ray_train_workers_fill_the_disk_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    import argparse

    import pema.executors.ray_runtime as ray_runtime
    from pema.jobs.cli import run_job

    target = str(tmp_path / "out" / "ray_train" / "train" / "checkpoint_0" / "adapter.safetensors")
    inner = OSError(errno.ENOSPC, "No space left on device", target)
    monkeypatch.setattr(ray_runtime, "init_ray", lambda *a, **k: {})
    for wrapped in _ray_wrapped(inner):
        def stage(cfg, wrapped=wrapped):
            raise wrapped

        args = argparse.Namespace(config=str(SMOKE), output_dir=str(tmp_path / "out"), overrides=[],
                                  input_splits=(), address=None, verbose=False)
        code = run_job(args, stage, model=False)
        err = capsys.readouterr().err
        assert code == 2 and target in err and "free some space" in err and "Traceback" not in err, err


def test_ray_train_names_its_folder_and_does_not_retry_a_full_disk(tmp_path, monkeypatch):
    """A controller error is retried (a lost worker group), but not one from a full disk: it comes out at once as
    the OSError, naming Ray Train's folder when the error names no file (pyarrow's does not); whether Ray Train
    raises it from fit() (as 2.x does) or returns it in the result."""
    from types import SimpleNamespace

    from ray.train import ControllerError

    import pema.executors.ray_train as ray_train
    from pema.formats.layout import RunLayout

    cfg, layout = load_config(SMOKE), RunLayout(tmp_path)
    for raises in (True, False):
        fits = []

        class Trainer:
            def __init__(self, *a, **k):
                pass

            def fit(self):
                fits.append(1)
                error = ControllerError(OSError(
                    errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"))
                if raises:
                    raise error
                return SimpleNamespace(error=error)

        monkeypatch.setattr(ray_train, "TorchTrainer", Trainer)
        with pytest.raises(OSError) as got:
            next(ray_train._fit(lambda *a: None, {}, cfg.train, cfg.resources, False, layout, "train"))
        assert got.value.errno == errno.ENOSPC and got.value.filename == str(layout.ray_train) and fits == [1]


@pytest.mark.ray
def test_a_write_that_fails_for_want_of_space_in_a_ray_train_worker_is_named(ray_client, tmp_path):
    """A Ray Train worker whose write fails for want of space (a real EFBIG: the worker's file size limit, as a
    full disk gives ENOSPC), on every attempt. Ray Train restarts the worker group (train.max_failures=1) and may
    end on another error (a restart that lost its placement group); either way the stage gets the OSError, naming
    Ray Train's folder (Python's own write error names no file)."""
    from pema.executors.ray_train import train_on_ray
    from pema.formats.layout import RunLayout

    def body(config, ctx):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            with open(config["target"], "wb") as f:
                f.write(b"\0" * 65536)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    cfg = load_config(SMOKE, ["train.max_failures=1", "resources.train_workers=1", "resources.cpus_per_worker=1"])
    layout = RunLayout(tmp_path / "out")
    with pytest.raises(OSError) as got:
        with train_on_ray(body, {"target": str(tmp_path / "big.bin")}, cfg=cfg, layout=layout, progress=False):
            pass
    assert got.value.errno == errno.EFBIG and got.value.filename == str(layout.ray_train), got.value
