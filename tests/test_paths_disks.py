"""Paths and disks (issue 21, item 6): a run folder's MLflow artifacts follow the folder when it is copied or moved,
a sqlite store's sit beside it, and a read-only output folder exits 2 naming the path, before Ray starts.

The read-only folder and the full disk are real: a tmpfs mounted read-only, or small, in a private user and mount
namespace (``unshare -rm``), where even root gets EROFS and ENOSPC; skipped where the kernel allows no such
namespace."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pema.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=1m none /tmp"], capture_output=True, timeout=60)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="no user+mount namespace here (unshare -rm)")


def sandbox(script: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """bash ``script`` (``set -eu``) in a new user and mount namespace, where it may mount a tmpfs; ``$PY`` is this
    Python, the working directory the repository."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return subprocess.run(["unshare", "-rm", "bash", "-euc", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PY": sys.executable, **env})


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
    with pytest.raises(ConfigError, match="--output-dir /proc/pema-no-such/out cannot be made: /proc cannot be written"):  # even root cannot make a folder in /proc
        check_output_dir("/proc/pema-no-such/out")


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
