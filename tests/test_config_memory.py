"""MemoryConfig's Ray build fields: num_actors, gpus_per_actor, cpus_per_actor (validated in __post_init__)."""

import pytest

from pema.config import MemoryConfig, load_config
from pema.errors import ConfigError


def test_defaults_and_good_values():
    m = MemoryConfig()
    assert (m.num_actors, m.gpus_per_actor, m.cpus_per_actor) == (0, 1, 1.0)
    m = load_config(None, ["memory.num_actors=3", "memory.gpus_per_actor=2", "memory.cpus_per_actor=2"]).memory
    assert (m.num_actors, m.gpus_per_actor, m.cpus_per_actor) == (3, 2, 2.0)
    assert isinstance(m.cpus_per_actor, float)  # a YAML int is widened to the field's float
    assert MemoryConfig(cpus_per_actor=0.25).cpus_per_actor == 0.25


@pytest.mark.parametrize("field,value,allowed", [
    ("num_actors", -1, ">= 0"), ("num_actors", 1.5, ">= 0"), ("num_actors", True, ">= 0"), ("num_actors", "2", ">= 0"),
    ("gpus_per_actor", 0, ">= 1"), ("gpus_per_actor", -2, ">= 1"), ("gpus_per_actor", 1.5, ">= 1"),
    ("cpus_per_actor", 0, "> 0"), ("cpus_per_actor", -0.5, "> 0"), ("cpus_per_actor", "1", "> 0"),
    ("cpus_per_actor", True, "> 0"),
])
def test_bad_values_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        MemoryConfig(**{field: value})
    message = str(info.value)
    assert f"memory.{field}={value!r}" in message and allowed in message


def test_bad_value_as_override():
    with pytest.raises(ConfigError, match=r"memory\.num_actors=-3"):
        load_config(None, ["memory.num_actors=-3"])
