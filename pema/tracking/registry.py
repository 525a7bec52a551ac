"""The register step: log the trained adapter as an MLflow pyfunc model, register a new version, and move the alias
``champion`` to it only when it beats the current champion on dev BLEU.

The model is "models from code" (:mod:`pema.tracking.pyfunc_model`) with plain-file artifacts: the adapter
bundle, the head bundle and the run's config (which names the base model and holds the decoding settings and the
lambda schedule, ``decode.pema``: the recommended PEMA configuration, the ``pema`` row). Every version carries the
tags ``dev_bleu``, ``schedule`` (:func:`schedule_tag`) and ``base_model``.

The model carries its own code: the ``pema`` package travels with it (``code_paths``), and its pip requirements
are the project's pinned dependencies minus Ray. So ``mlflow models serve`` builds a working environment with its
default manager (a new virtualenv from those requirements). That environment holds no model package: with
``resources.owner_url`` in the config (the PLM owner's service) it needs none; without, it has no PLM to load, and
the registered model is served from an environment that has it (``--env-manager local``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from pema.config import PipelineConfig, to_dict
from pema.formats.layout import RunLayout
from pema.tracking.runs import ROOT

ALIAS = "champion"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))


def requirements() -> list[str]:
    """The project's pinned runtime dependencies (pyproject.toml) minus Ray, for the model's environment."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if not d.startswith("ray")]


def champion(name: str) -> tuple[str | None, float | None]:
    """(version, dev BLEU) of the current champion, or (None, None)."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None, None
    return str(mv.version), float(mv.tags.get("dev_bleu", "-inf"))


def schedule_tag(cfg: PipelineConfig) -> str:
    """The registered schedule, ``decode.pema``, as ``"<kind> lam=.. lam_max=.. floor=.. stop_lam=.."``: every value a
    YAML scalar (``stop_lam=null``: the stop decision uses the schedule's lambda, as for any token)."""
    p = cfg.decode.pema
    values = {"lam": p.lam, "lam_max": p.lam_max, "floor": p.floor, "stop_lam": p.stop_lam}
    return " ".join([p.kind] + [f"{k}={'null' if v is None else v}" for k, v in values.items()])


def adapter_digest(output_dir) -> str:
    """sha256 over the adapter bundle's files and the head bundle's metadata: what a version is made of."""
    layout, h = RunLayout(output_dir), hashlib.sha256()
    for path in sorted(layout.adapter.iterdir()) + [layout.head / "head.json"]:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def lock_path(name: str, uri: str | None = None) -> Path:
    """The lock file of ``name``'s champion: next to the tracking store (a sqlite database's folder, a file store's
    folder), or for a tracking server in this host's temporary folder, keyed by the server's URI."""
    uri = uri or mlflow.get_tracking_uri()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else Path("mlflow.db")
        return db.parent / f"{db.name}.{safe}.champion.lock"
    if parsed.scheme in ("", "file"):
        store = Path(parsed.path or uri).resolve()
        return store.parent / f"{store.name}.{safe}.champion.lock"
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "pema-locks" / f"{key}.{safe}.champion.lock"


@contextmanager
def champion_lock(name: str):
    """Hold an exclusive lock (``fcntl.flock``) on ``name``'s :func:`lock_path` for the body: registers of one model
    name run one at a time, so each reads the champion after the last one moved it. The kernel drops the lock when
    its holder dies (a killed register never blocks the next). With a tracking server the lock file is on this
    host: registers of one name from two hosts are not serialised (run them from one host)."""
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _version_of(name: str, tags: dict):
    """The version of ``name`` already registered with these tags: this adapter, schedule and dev BLEU (a rerun of
    the same job), or None."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for mv in versions:
        if all(mv.tags.get(k) == v for k, v in tags.items()):
            return mv
    return None


def register_adapter(cfg: PipelineConfig, output_dir, name: str, *, dev_bleu: float) -> dict:
    """In the active run: log ``output_dir/adapter`` (with ``head/`` and the config) as a pyfunc model, register it
    as a new version of ``name`` and move the champion alias to it when its dev BLEU beats the champion's. Returns
    the version, its dev BLEU and whether it became the champion.

    A version is registered with its tags in one call, among them ``adapter_sha256`` (:func:`adapter_digest`): the
    same adapter registered again with the same schedule and dev BLEU (a job rerun after a kill) gets that version
    back instead of a second one.

    All of it runs under :func:`champion_lock`: of two registers of ``name`` at once, the second reads the champion
    the first left, so the better dev BLEU ends as champion and only a version that beats the one before it
    reports ``champion: true``."""
    layout = RunLayout(output_dir)
    mlflow.log_metric("dev_bleu", dev_bleu)
    digest = adapter_digest(output_dir)
    tags = {"dev_bleu": str(dev_bleu), "schedule": schedule_tag(cfg), "base_model": cfg.model.model_id,
            "adapter_sha256": digest}
    memory = json.loads((layout.adapter / "adapter.json").read_text()).get("memory")
    if isinstance(memory, dict):  # the memory version the adapter was trained on (pema.formats.versions)
        tags.update({"memory_path": str(memory.get("path")), "memory_version": str(memory.get("version")),
                     "memory_manifest_sha256": str(memory.get("manifest_sha256"))})
    with champion_lock(name):  # the version check, the register and the champion's read-compare-move, as one
        return _register_locked(cfg, layout, name, dev_bleu, tags)


def _register_locked(cfg: PipelineConfig, layout: RunLayout, name: str, dev_bleu: float, tags: dict) -> dict:
    mv = _version_of(name, tags)
    if mv is None:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            code = Path(tmp) / "pema"  # the package, without caches
            shutil.copytree(ROOT / "pema", code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), signature=SIGNATURE,
                artifacts={"adapter": str(layout.adapter), "head": str(layout.head), "config": str(config)},
                pip_requirements=requirements(), code_paths=[str(code)])
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    version = str(mv.version)
    client = MlflowClient()
    previous, previous_bleu = champion(name)  # read under the lock: another register's move is seen here
    promoted = previous is None or previous == version or dev_bleu > previous_bleu
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version)
    mlflow.set_tags({"pema.registered_model": name, "pema.model_version": version,
                     "pema.champion": str(promoted).lower()})
    return {"name": name, "version": version, "dev_bleu": dev_bleu, "champion": promoted,
            "previous_champion": previous, "previous_dev_bleu": previous_bleu, "model_uri": f"models:/{name}/{version}"}


def memory_versions_in_use(mem_dir) -> dict[int, list[str]]:
    """The versions of the memory at ``mem_dir`` that registered model versions were trained on:
    ``{version: ["name/3", ...]}`` (from their ``memory_path`` and ``memory_version`` tags)."""
    path, used = str(Path(mem_dir).resolve()), {}
    for mv in MlflowClient().search_model_versions(max_results=10000):
        tags = mv.tags or {}
        if tags.get("memory_path") == path and str(tags.get("memory_version", "")).isdigit():
            used.setdefault(int(tags["memory_version"]), []).append(f"{mv.name}/{mv.version}")
    return used
