"""Where a sqlite tracking store keeps its artifacts, and ending a run in a store whose disk is full.

- :func:`artifact_root`: a ``sqlite:///`` store's artifacts go to ``mlartifacts/`` beside its file (for the embedded
  store, ``<output-dir>/mlartifacts``), never to ``./mlruns`` of the folder the job started from.
- :func:`follow_store`: MLflow records that place as an absolute URI, in the experiment and in every run, logged
  model and model version; a run folder copied or moved elsewhere is pointed back at its own ``mlartifacts/``.
- :func:`end_in_place`: a disk that filled under the store leaves sqlite no room for its journal, so MLflow cannot
  end the run; its row is rewritten in place instead, so no run is left RUNNING.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import urllib.parse
import urllib.request
from pathlib import Path

EXPERIMENT = "pema"


def store_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI, absolute; None for a server or an in-memory store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path).resolve()


def artifact_root(uri: str) -> Path | None:
    """Where a sqlite store's artifacts go: ``mlartifacts/`` beside its file (``<output-dir>/mlartifacts`` for the
    embedded store), not ``./mlruns`` of whatever folder the job started from; None for a server (it has its own)."""
    db = store_file(uri)
    return None if db is None else db.parent / "mlartifacts"


MOVED_WITH_THE_FOLDER = (("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                         ("model_versions", "storage_location"), ("model_versions", "source"))


def _local_path(location: str) -> Path | None:
    """The folder of a local artifact location (``file://`` URI or plain path); None for any other scheme."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(location) if parsed.scheme == "" else None


def follow_store(db: str | os.PathLike, name: str = EXPERIMENT) -> None:
    """Point the experiment ``name`` of the sqlite store ``db`` at ``mlartifacts/`` beside ``db``.

    MLflow records where artifacts go as an absolute URI, in the experiment and in each run, logged model and model
    version. A run folder that is copied or moved (``mlflow.db`` with its ``mlartifacts/``) then goes on writing
    into the original folder, or fails once it is gone; an experiment an older job made keeps ``./mlruns`` of the
    folder it started from. Here the experiment is pointed beside ``db``; and when it pointed at another folder's
    ``mlartifacts/`` (a copy or a move) and this folder has one, the records under the old one are rewritten to the
    same place under the new one, so the old runs read (and a reopened run writes) this folder's copies. One
    transaction; a location that is not a local folder (a server's, a bucket's) is left alone."""
    db = Path(db)
    new = (db.resolve().parent / "mlartifacts").as_uri()
    with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as con:
        row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (name,)).fetchone()
        if row is None or not row[0] or row[0].rstrip("/") == new or (old_root := _local_path(row[0])) is None:
            return
        old = row[0].rstrip("/")
        try:
            with con:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE name = ?", (new, name))
                if old_root.name != "mlartifacts" or not (db.parent / "mlartifacts").is_dir():
                    return
                for table, column in MOVED_WITH_THE_FOLDER:
                    if column in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                        con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE "
                                    f"substr({column}, 1, ?) = ? AND substr({column}, ?, 1) IN ('', '/')",
                                    (new, len(old) + 1, len(old), old, len(old) + 1))
        except sqlite3.OperationalError:  # a read-only store (nothing is written through it) or a full disk (the
            return  # job's first write names it)


def end_in_place(db: str | os.PathLike, run_id: str, status: str) -> bool:
    """End ``run_id`` in the sqlite store ``db`` when MLflow could not for want of disk space (sqlite needs room
    for its rollback journal): the run's row is rewritten in place, the journal kept in memory, which needs no new
    room unless the row grows (then the status alone is written, which shrinks it). True when the run is ended."""
    now = int(time.time() * 1000)
    for sql, args in (("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?", (status, now, run_id)),
                      ("UPDATE runs SET status = ? WHERE run_uuid = ?", (status, run_id))):
        try:
            with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as con:
                con.execute("PRAGMA journal_mode = MEMORY")
                if con.execute(sql, args).rowcount == 1:
                    con.commit()
                    return True
        except sqlite3.Error:
            continue
    return False


class _Reraised(logging.Filter):
    """MLflow logs a sqlite error with its traceback, then raises it as an MlflowException; the job handles that
    (a full disk is named, exit 2; a broken store is a TrackingError), so the logged copy is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


_RERAISED = _Reraised()


def drop_reraised_logs() -> None:
    """Drop MLflow's logged copy of the sqlite errors it raises (:class:`_Reraised`); once per process is enough."""
    logging.getLogger("mlflow.store.db.utils").addFilter(_RERAISED)
