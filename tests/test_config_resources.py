"""The ``resources`` section: where the work runs, set once for every stage (validated in __post_init__), and the
keys it replaced in the method sections refused with a pointer to their new name."""

import pytest

from pema.config import MOVED, ResourcesConfig, load_config
from pema.errors import ConfigError


def test_defaults_and_good_values():
    r = ResourcesConfig()
    assert (r.device, r.memory_actors, r.gpus_per_actor, r.cpus_per_actor) == ("cpu", 0, 1, 1.0)
    assert (r.train_workers, r.cpus_per_worker, r.eval_cpus) == (1, 1.0, 1.0)
    r = load_config(None, ["resources.memory_actors=3", "resources.gpus_per_actor=2", "resources.cpus_per_actor=2",
                           "resources.train_workers=4", "resources.device=cuda:1"]).resources
    assert (r.memory_actors, r.gpus_per_actor, r.cpus_per_actor, r.train_workers, r.device) == (3, 2, 2.0, 4, "cuda:1")
    assert isinstance(r.cpus_per_actor, float)  # a YAML int is widened to the field's float
    assert ResourcesConfig(cpus_per_actor=0.25).cpus_per_actor == 0.25


@pytest.mark.parametrize("field,value,allowed", [
    ("memory_actors", -1, ">= 0"), ("memory_actors", 1.5, ">= 0"), ("memory_actors", True, ">= 0"),
    ("memory_actors", "2", ">= 0"), ("gpus_per_actor", 0, ">= 1"), ("gpus_per_actor", -2, ">= 1"),
    ("gpus_per_actor", 1.5, ">= 1"), ("train_workers", 0, ">= 1"), ("train_workers", True, ">= 1"),
    ("cpus_per_actor", 0, "> 0"), ("cpus_per_actor", -0.5, "> 0"), ("cpus_per_actor", "1", "> 0"),
    ("cpus_per_actor", True, "> 0"), ("cpus_per_worker", False, "> 0"), ("eval_cpus", 0, "> 0"),
    ("device", "tpu", "'cpu', 'cuda' or 'cuda:N'"), ("device", 0, "'cpu'"),
])
def test_bad_values_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        ResourcesConfig(**{field: value})
    message = str(info.value)
    assert f"resources.{field}={value!r}" in message and allowed in message


def test_bad_value_as_override():
    with pytest.raises(ConfigError, match=r"resources\.memory_actors=-3"):
        load_config(None, ["resources.memory_actors=-3"])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_keys_name_their_new_place(old):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{old}=1"])
    assert f"unknown config key(s) ['{old}']" in str(info.value) and f"{old} is now {MOVED[old]}" in str(info.value)


def test_method_sections_hold_no_resources():
    cfg = load_config(None)
    for section in ("model", "memory", "train", "eval", "lora"):
        fields = set(getattr(cfg, section).__dataclass_fields__)
        assert not fields & {"device", "num_workers", "cpus_per_worker", "num_actors", "gpus_per_actor",
                             "cpus_per_actor", "num_cpus"}, section
