"""MLflow tracking for every job: one run per stage, the pipeline as a parent run, lineage tags, fail-fast checks.

Where runs go: ``MLFLOW_TRACKING_URI`` when it is set (the project's server: ``mlflow/server.sh``), otherwise a
sqlite store in the job's output folder (``<output-dir>/mlflow.db``, the embedded default; MLflow's file store is
off in 3.x). The sqlite store is created atomically (:func:`ensure_sqlite_store`): MLflow migrates a temporary
file next to it, which replaces ``mlflow.db`` only when complete, so a job killed at any instant (even while the
tables are being made) never leaves a half-migrated store behind. A sqlite store keeps its artifacts beside it,
in ``mlartifacts/`` (:func:`follow_store`), wherever the job was started from, and when its folder is copied or
moved the artifacts follow. A tracking server that does not answer
``/health`` stops the job before any work, with a message that names the URI; a server that goes away mid-run
raises :class:`~pema.errors.TrackingError` naming it too, and the files the stages wrote stay where they are. A
full disk (under a stage, or under a sqlite store) comes out as the OSError naming the file, and the stage's run
still ends: in place in a full sqlite store (:func:`end_in_place`).

Runs nest: a stage started while another run is active (the pipeline's parent run, or a Ray Tune trial's run)
becomes its child (``mlflow.parentRunId``); otherwise it is a top-level run of the experiment ``pema``. Each stage
run carries the flattened config as params, the YAML config as an artifact and the lineage tags
(``pema.memory_sha256``, ``pema.base_model``, ``pema.base_model_revision``, ``pema.git_commit``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import subprocess
import uuid
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from pema.config import PipelineConfig, flatten, to_dict
from pema.errors import TrackingError, full_disk
from pema.formats.layout import RunLayout
from pema.formats.versions import memory_info
from pema.stages.inputs import split_pairs
from pema.tracking.orphans import end_orphaned_runs, process_tags
from pema.tracking.store import (EXPERIMENT, artifact_root, drop_reraised_logs, end_in_place, follow_store,
                                 store_file)

ROOT = Path(__file__).resolve().parents[2]
PARAM_MAX = 6000  # MLflow's limit on a param value
# The experiment's kind, as MLflow's UI would set it from its experiment-type selector. MLflow 3.17.2's UI does not
# act on it: its view follows its "GenAI | Model training" switch (the URL's ``workflowType`` parameter, else the
# browser's localStorage ``mlflow.workflowType_v1``, default ``genai``: the GenAI overview, no Model registry in the
# sidebar). A link with ``workflowType=machine_learning`` (:func:`runs_table_url`) opens the runs table.
EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
STAGE_SPLITS = {"build_memory": ("train", "dev"), "evaluate": ("test",), "pipeline": ("train", "dev", "test"),
                "compare": ("train", "test"), "tune": ("train", "dev"), "register": ("dev",)}
MEMORY_READERS = ("train", "evaluate", "compare", "register", "tune", "memory_append", "memory_delete")


def tracking_uri(output_dir: str | os.PathLike) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{RunLayout(output_dir).mlflow_db}"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError naming ``uri`` when an HTTP tracking server does not answer ``/health``."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(f"the MLflow tracking server at {uri} is not reachable ({problem}); start it with "
                        "mlflow/server.sh, or unset MLFLOW_TRACKING_URI to log to <output-dir>/mlflow.db")


def _check_complete(db: Path) -> None:
    """TrackingError naming ``db`` when MLflow's migration of it was interrupted (a store left by a killed job
    before stores were created atomically); every open would fail with ``table _alembic_tmp_... already exists``."""
    try:  # read-write, as MLflow opens it: a hot journal left by a killed writer is rolled back, not refused
        with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as con:
            names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    except sqlite3.Error:
        return  # not ours to judge: MLflow's own open reports it
    if half := sorted(n for n in names if n.startswith("_alembic_tmp_")):
        raise TrackingError(f"the MLflow store {db} was left half-migrated (tables {half}), by a job killed while "
                            "MLflow was creating it; delete or move it away and rerun (a new one is created)")


def ensure_sqlite_store(db: str | os.PathLike) -> None:
    """Create MLflow's sqlite store at ``db`` unless it exists, atomically: MLflow's own migration runs on a
    temporary file next to it (``<db>.init-*``), which is moved into place only when complete. A kill at any
    instant leaves either no ``db`` or a complete one; the next call removes a killed attempt's temporary file and
    starts again. An exclusive lock on the folder (released by the kernel when its holder dies) keeps concurrent
    jobs from replacing each other's store."""
    db = Path(db)
    if db.is_file():
        _check_complete(db)
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if db.is_file():  # another job made it while this one waited
            return
        for stale in db.parent.glob(f"{db.name}.init-*"):  # a killed attempt's file and its sqlite journal
            stale.unlink(missing_ok=True)
        tmp = db.with_name(f"{db.name}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp_uri = f"sqlite:///{tmp}"
        MlflowClient(tracking_uri=tmp_uri).search_experiments(max_results=1)  # creates and migrates the tables
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(tmp_uri, None)  # close it before the move
        if engine is not None:
            engine.dispose()
        _check_complete(tmp)
        os.replace(tmp, db)
    finally:
        os.close(fd)  # releases the lock


def _end_run(run_id: str, status: str, uri: str) -> Exception | None:
    """End the active run (``run_id``) as ``status``; when a full disk under a sqlite store refuses that, end it in
    place (:func:`end_in_place`). Returns the error that left the run unended, or None."""
    try:
        mlflow.end_run(status=status)
        return None
    except Exception as exc:
        db = store_file(uri)
        return None if full_disk(exc) is not None and db is not None and end_in_place(db, run_id, status) else exc


def _no_room(disk: OSError, uri: str) -> OSError:
    """The full-disk error of a write to the tracking store, naming the store's file (sqlite names none)."""
    return OSError(disk.errno, disk.strerror, disk.filename or str(store_file(uri) or uri))


def connect(output_dir: str | os.PathLike) -> str:
    """Point MLflow at this job's store (checked first; a fresh sqlite store is created atomically) and make sure
    the experiment exists; returns the URI."""
    uri = tracking_uri(output_dir)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not after minutes of backoff
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    check_server(uri)
    if uri.startswith("sqlite:///") and "?" not in uri:
        ensure_sqlite_store(uri[len("sqlite:///"):])
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    if (db := store_file(uri)) is not None and db.is_file():
        follow_store(db)
    drop_reraised_logs()
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str = EXPERIMENT, output_dir: str | os.PathLike | None = None) -> str:
    """The experiment's id, created if missing (not ``mlflow.set_experiment``: it exports an environment variable
    that Ray's MLflow callback would prefer over its own setting). With a sqlite store (the embedded one, or a
    ``sqlite:///`` ``MLFLOW_TRACKING_URI``) its artifacts live beside the store (:func:`artifact_root`), not in a
    ``./mlruns`` of whatever folder the job was started from. It is tagged as a model-development experiment (the
    pinned UI shows its runs table in its "Model training" view: :func:`runs_table_url`). ``output_dir`` is not
    needed any more (the store's URI says where the artifacts go); it is accepted for the callers that pass it."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(mlflow.get_tracking_uri())
        exp_id = client.create_experiment(name, artifact_location=root.as_uri() if root else None,
                                          tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
    else:
        exp_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND) is None:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
    return exp_id


def runs_table_url(ui: str, exp_id: str) -> str:
    """The MLflow UI's runs table of experiment ``exp_id`` in its "Model training" view, with the Model registry in
    the sidebar (``ui``: the server's address, such as ``http://127.0.0.1:5000``)."""
    return f"{ui.rstrip('/')}/#/experiments/{exp_id}/runs?{MODEL_TRAINING_VIEW}"


def git_commit() -> str:
    if os.environ.get("PEMA_GIT_COMMIT"):
        return os.environ["PEMA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown (no .git here; set PEMA_GIT_COMMIT)"


def memory_sha256(output_dir: str | os.PathLike) -> str | None:
    """sha256 over the train and dev manifests (each lists its parts' checksums): one id for the memory used."""
    h, found = hashlib.sha256(), False
    for split in ("train", "dev"):
        path = RunLayout(output_dir).memory(split) / "manifest.json"
        if path.is_file():
            h.update(split.encode() + path.read_bytes())
            found = True
    return h.hexdigest() if found else None


def lineage_tags(cfg: PipelineConfig, output_dir: str | os.PathLike) -> dict[str, str]:
    tags = {"pema.base_model": cfg.model.model_id, "pema.base_model_revision": cfg.model.revision or "default",
            "pema.git_commit": git_commit()}
    if (checksum := memory_sha256(output_dir)) is not None:
        tags["pema.memory_sha256"] = checksum
    return tags


def _params(cfg: PipelineConfig) -> dict[str, str]:
    return {k: str(v)[:PARAM_MAX] for k, v in flatten(cfg).items()}


@contextlib.contextmanager
def stage_run(stage: str, cfg: PipelineConfig, output_dir: str | os.PathLike, *, run_id: str | None = None):
    """An MLflow run for one stage (a child of the active run, if any). Ends FINISHED, or FAILED on an error;
    MLflow errors become TrackingError naming the URI. ``run_id`` reopens that run instead (a resumed job). A job's
    first run ends as KILLED the runs that killed jobs left RUNNING (:mod:`pema.tracking.orphans`)."""
    uri = connect(output_dir)
    parent = mlflow.active_run()
    try:
        if parent is None:  # a job's first run: end the runs that killed jobs left RUNNING on this store
            end_orphaned_runs(experiment_id(output_dir=output_dir))
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
        elif parent is not None:
            run = mlflow.start_run(run_name=stage, nested=True, experiment_id=parent.info.experiment_id)
        else:
            run = mlflow.start_run(run_name=stage, experiment_id=experiment_id(output_dir=output_dir))
        mlflow.set_tags({"pema.stage": stage, **lineage_tags(cfg, output_dir), **process_tags()})
        if run_id is None:
            mlflow.log_params(_params(cfg))
            mlflow.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
            log_datasets(cfg, STAGE_SPLITS.get(stage, ()))
            if stage in MEMORY_READERS:
                log_memory_inputs(output_dir)
    except KeyboardInterrupt:  # stopped while the run was being set up: a run already started ends KILLED
        if (active := mlflow.active_run()) is not None and (parent is None or
                                                              active.info.run_id != parent.info.run_id):
            mlflow.end_run(status="KILLED")
        raise
    except TrackingError:
        raise
    except Exception as exc:  # requests / MlflowException: the store went away or refused the run
        if (active := mlflow.active_run()) is not None and (parent is None or
                                                              active.info.run_id != parent.info.run_id):
            _end_run(active.info.run_id, "FAILED", uri)  # started, then refused its params or tags: not RUNNING
        if (disk := full_disk(exc)) is not None:
            raise _no_room(disk, uri) from exc
        raise TrackingError(f"MLflow at {uri} failed while starting the {stage!r} run: {exc}") from exc
    status = "FAILED"
    try:
        yield run
        if (checksum := memory_sha256(output_dir)) is not None:  # the build stage has just made the memory
            mlflow.set_tag("pema.memory_sha256", checksum)
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM (pema.jobs.guard): the user stopped it
        status = "KILLED"
        raise
    except Exception as exc:
        if _is_tracking_failure(exc):
            if (disk := full_disk(exc)) is not None:
                raise _no_room(disk, uri) from exc
            raise TrackingError(f"MLflow at {uri} failed during the {stage!r} run: {exc}; the stage's files in "
                                f"{output_dir} are kept") from exc
        raise
    finally:  # a dead server: the stage's own error (if any) is the one to show
        if (exc := _end_run(run.info.run_id, status, uri)) is not None and status == "FINISHED":
            if (disk := full_disk(exc)) is not None:  # the stage did its work, but its run could not be ended
                raise _no_room(disk, uri) from exc
            raise TrackingError(f"MLflow at {uri} failed while ending the {stage!r} run: {exc}; the stage's "
                                f"files in {output_dir} are kept, rerun the job once the server is back") from exc


def log_datasets(cfg: PipelineConfig, splits) -> None:
    """The pairs of each split as an MLflow dataset input of the active run: name ``<split>``, source the JSONL
    file, context the split, and MLflow's digest of the rows (the limit applied)."""
    import warnings

    import mlflow.data
    import pandas as pd

    for split in splits:
        pairs = split_pairs(cfg, split)
        frame = pd.DataFrame({"index": [p.index for p in pairs], "source": [p.source for p in pairs],
                              "target": [p.target for p in pairs]})
        path = Path(getattr(cfg.data, split)).resolve()
        with warnings.catch_warnings():  # MLflow's hints about schema inference and source types: not ours to act on
            warnings.simplefilter("ignore", UserWarning)
            mlflow.log_input(mlflow.data.from_pandas(frame, source=str(path), name=split), context=split)


def log_memory_inputs(output_dir: str | os.PathLike) -> None:
    """The memories the active run reads (``memory/train``, ``memory/dev``) as MLflow dataset inputs, named with
    their version (``memory/train@v3``), the manifest's sha256 as digest and the folder as source, and the tag
    ``pema.memory_version`` (``train v3, dev v1``): the runs table's Dataset column shows which memory trained
    what."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    found = {}
    for split, context in (("train", "training"), ("dev", "validation")):
        mem = RunLayout(output_dir).memory(split)
        if not (mem / "manifest.json").is_file():
            continue
        info = found[split] = memory_info(mem)
        with warnings.catch_warnings():  # MLflow's hint that a local folder is a guessed source type
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(info["path"])
        mlflow.log_input(MetaDataset(source, name=f"memory/{split}@v{info['version']}",
                                     digest=info["manifest_sha256"][:12]), context=context)
    if found:
        mlflow.set_tag("pema.memory_version", ", ".join(f"{s} v{i['version']}" for s, i in found.items()))


def _is_tracking_failure(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    names = {type(e).__module__.split(".")[0] for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return isinstance(exc, MlflowException) or bool(names & {"requests", "urllib3", "mlflow"})
