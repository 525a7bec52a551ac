"""jobs/runtime_env.yaml: what `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` uploads.

The tests go through Ray's own code: the CLI's ``parse_runtime_env_args``, then
``JobSubmissionClient._upload_working_dir_if_needed`` with the HTTP calls stubbed out, which zips the
repository with ``create_package`` exactly as a real submission does. No cluster is needed.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_YAML = ROOT / "jobs" / "runtime_env.yaml"
FORBIDDEN_TOP = (".git", ".venv", "venv", "outputs", "mlruns", "mlflow.db", "bench_out", ".pytest_cache")


def _cli_runtime_env(working_dir: Path) -> dict:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_YAML), working_dir=str(working_dir))


def _submitted_zip(working_dir: Path, monkeypatch) -> tuple[bytes, dict]:
    """The bytes `ray job submit` would PUT to /api/packages, and the runtime_env it would POST."""
    from ray.dashboard.modules.job.sdk import JobSubmissionClient
    from ray.runtime_env import RuntimeEnv

    puts: list[bytes] = []

    class _Ok:
        status_code = 200

    def fake_request(method, endpoint, *, data=None, **kwargs):
        assert (method, endpoint.split("/")[2]) == ("PUT", "packages"), (method, endpoint)
        puts.append(data)
        return _Ok()

    client = JobSubmissionClient.__new__(JobSubmissionClient)  # no HTTP connection
    monkeypatch.setattr(client, "_package_exists", lambda uri: False, raising=False)
    monkeypatch.setattr(client, "_do_request", fake_request, raising=False)
    runtime_env = _cli_runtime_env(working_dir)
    client._upload_working_dir_if_needed(runtime_env)
    assert len(puts) == 1
    RuntimeEnv(**runtime_env)  # what submit_job does next: valid, working_dir now a gcs:// URI
    assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
    return puts[0], runtime_env


def _names(data: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(data)).namelist()


def _offenders(names: list[str]) -> list[str]:
    return [
        n
        for n in names
        if n.split("/")[0] in FORBIDDEN_TOP or "__pycache__/" in n or ".egg-info/" in n or n.endswith(".pyc")
    ]


def test_yaml_is_a_runtime_env_with_excludes():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV_YAML.read_text())
    assert set(env) == {"excludes"}, "working_dir comes from --working-dir"
    for pattern in (".git", ".venv", "/outputs", "/mlruns", "/mlflow.db", "/bench_out", "__pycache__", ".pytest_cache"):
        assert pattern in env["excludes"]
    RuntimeEnv(**env)


def test_cli_sets_working_dir_from_flag():
    env = _cli_runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT)
    assert env["excludes"] == yaml.safe_load(RUNTIME_ENV_YAML.read_text())["excludes"]


def test_real_repo_upload_has_code_and_no_junk(monkeypatch):
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE

    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    data, _ = _submitted_zip(ROOT, monkeypatch)
    names = _names(data)
    assert "jobs/pipeline.py" in names
    assert "pema/__init__.py" in names
    assert "jobs/configs/default.yaml" in names
    assert any(n.startswith("data/") for n in names), "the shipped sample data travels with the job"
    assert not _offenders(names), _offenders(names)[:10]
    assert DASHBOARD_CLIENT_MAX_SIZE == 100 * 1024**2
    assert len(data) < DASHBOARD_CLIENT_MAX_SIZE, f"{len(data) / 2**20:.1f} MiB"


def test_yaml_excludes_alone_suffice(tmp_path):
    """Without .gitignore and without Ray's default excludes, the YAML still keeps junk out."""
    from ray._private.runtime_env.packaging import create_package

    (tmp_path / "pema" / "sub" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pema" / "__init__.py").write_text("")
    (tmp_path / "pema" / "sub" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / "pema" / "outputs.py").write_text("")  # only the top-level outputs/ is excluded
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "pipeline.py").write_text("")
    (tmp_path / "pema.egg-info").mkdir()
    (tmp_path / "pema.egg-info" / "PKG-INFO").write_text("")
    for junk in (".git/objects/ab", ".venv/lib/python3.11/site-packages", "outputs/run", "mlruns/0",
                 "bench_out", ".pytest_cache/v"):
        (tmp_path / junk).mkdir(parents=True)
        (tmp_path / junk / "f").write_bytes(b"x" * 1024)
    (tmp_path / "mlflow.db").write_bytes(b"x")
    (tmp_path / "owner_tokens.json").write_text('{"acme": "secret"}')  # a secret: never uploaded

    excludes = yaml.safe_load(RUNTIME_ENV_YAML.read_text())["excludes"]
    target = tmp_path.parent / f"{tmp_path.name}.zip"
    create_package(str(tmp_path), target, include_gitignore=False, excludes=excludes)
    names = _names(target.read_bytes())
    assert sorted(names) == ["jobs/pipeline.py", "pema/__init__.py", "pema/outputs.py"], names


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_real_repo_yaml_excludes_alone_suffice(tmp_path, monkeypatch):
    """The real repository, .gitignore and Ray's defaults switched off: still no .git/ or .venv/."""
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    data, _ = _submitted_zip(ROOT, monkeypatch)
    names = _names(data)
    assert "jobs/pipeline.py" in names and "pema/__init__.py" in names
    assert not _offenders(names), _offenders(names)[:10]
