"""Tests of pema.config: YAML loading, validation, dotted overrides and flatten()."""

import dataclasses
import typing
from pathlib import Path

import pytest

from pema.config import (DecodeConfig, PipelineConfig, ScheduleConfig, TrainConfig, config_from_dict, flatten,
                         load_config, parse_overrides, to_dict)
from pema.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))


def test_there_are_configs():
    assert CONFIGS, f"no YAML files in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_job_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    # round trip: the loaded config rebuilt from its own dict is identical
    assert config_from_dict(to_dict(cfg)) == cfg


def test_defaults_without_a_file():
    assert load_config(None) == PipelineConfig()


def test_smoke_config_values():
    path = CONFIG_DIR / "smoke.yaml"
    if not path.exists():
        pytest.skip("no smoke.yaml")
    cfg = load_config(path)
    assert cfg.model.model_id.startswith("tiny://")


def test_yaml_values_are_applied(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  kappa: 0.4\n  epochs: 3\ndecode:\n  gu:\n    lam_max: 0.7\n")
    cfg = load_config(p)
    assert cfg.train.kappa == 0.4 and cfg.train.epochs == 3 and cfg.decode.gu.lam_max == 0.7
    assert cfg.decode.gu.kind == "gu_quadratic"  # untouched defaults remain


# ----------------------------------------------------------------------------------------------------------------
# unknown keys
# ----------------------------------------------------------------------------------------------------------------

def test_unknown_top_level_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  kappa: 0.3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(p)


def test_unknown_top_level_key_as_override():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(None, ["bogus=1"])


def test_unknown_nested_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"train\.kapa"):
        load_config(None, ["train.kapa=1"])


def test_unknown_deeply_nested_key():
    with pytest.raises(ConfigError, match=r"decode\.gu\.lam_mx"):
        load_config(None, ["decode.gu.lam_mx=0.5"])


def test_unknown_key_in_yaml_file_nested(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("adapter:\n  rank: 8\n  ranks: 9\n")
    with pytest.raises(ConfigError, match=r"adapter\.ranks"):
        load_config(p)


def test_section_must_be_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError):
        load_config(p)


def test_override_through_a_scalar_is_rejected():
    with pytest.raises(ConfigError):
        load_config(None, ["train=3", "train.kappa=0.1"])


# ----------------------------------------------------------------------------------------------------------------
# ranges and choices
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, name", [
    ("decode.gu.lam_max=1.5", "lam_max"),
    ("decode.gu.lam_max=-0.2", "lam_max"),
    ("decode.const.lam=-0.1", "lam"),
    ("decode.const.lam=1.01", "lam"),
    ("decode.gu.floor=2", "floor"),
    ("decode.gu.lam_max=.nan", "lam_max"),
    ("train.kappa=1.5", "kappa"),
    ("train.kappa=-0.5", "kappa"),
])
def test_lambda_and_kappa_outside_unit_interval(override, name):
    with pytest.raises(ConfigError, match=name):
        load_config(None, [override])


@pytest.mark.parametrize("override, name", [
    ("train.method=foo", "train.method"),
    ("train.pd_vocab=some", "train.pd_vocab"),
    ("train.phase2_init_A=keep", "train.phase2_init_A"),
    ("decode.strategy=topk", "decode.strategy"),
    ("decode.gu.kind=cosine", "decode.gu.kind"),
    ("model.dtype=int8", "model.dtype"),
    ("memory.dtype=bfloat16", "memory.dtype"),
])
def test_bad_choices(override, name):
    with pytest.raises(ConfigError, match=name):
        load_config(None, [override])


@pytest.mark.parametrize("override", [
    "adapter.rank=0", "adapter.rank=2.5", "adapter.dropout=1.0", "adapter.alpha=0",
    "train.epochs=-1", "train.lr=0", "train.batch_size=0", "train.evals_per_epoch=0",
    "data.train_limit=0", "data.dev_limit=abc", "decode.top_p=0", "decode.temperature=0",
    "decode.num_beams=0", "decode.max_new_tokens=0", "memory.rows_per_part=0",
])
def test_out_of_range_values(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def number_fields(cls=PipelineConfig, prefix=""):
    """Dotted keys of every int / float field (``int | None`` too), through the nested sections."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from number_fields(hint, f"{prefix}{f.name}.")
        elif {t for t in typing.get_args(hint) or (hint,) if t is not type(None)} & {int, float}:
            yield f"{prefix}{f.name}"


def test_number_fields_cover_every_section():
    keys = set(number_fields())
    assert {"adapter.rank", "adapter.alpha", "memory.rows_per_part", "memory.batch_tokens", "train.rct_epochs",
            "train.lr", "train.seed", "decode.num_beams", "decode.gu.lam_max", "decode.pema.stop_lam",
            "knn.k", "lora.seed", "resources.eval_cpus", "data.train_limit"} <= keys
    assert not {k for k in keys if k.endswith((".kind", ".device", ".method", ".resident", ".postprocess"))}


@pytest.mark.parametrize("key", sorted(number_fields()))
def test_bool_is_not_a_number(key):
    # YAML `true` is a Python bool, and bool is an int subclass: it must not pass as 1 (adapter.rank=true)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=true"])
    assert str(info.value).startswith(f"{key}=True is invalid"), str(info.value)


@pytest.mark.parametrize("override", [
    "decode.gu.lam_max=1.5", "decode.gu.floor=-1", "decode.gu.kind=cosine", "decode.const.lam=2",
    "decode.pema.stop_lam=1.5", "decode.pema.lam_max=-0.5", "train.kappa=1.5", "train.batch_size=0",
    "adapter.rank=0", "resources.memory_actors=-1", "knn.lam=2", "lora.rank=0", "resources.eval_cpus=0", "decode.top_p=0",
])
def test_range_errors_name_the_full_dotted_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    # exactly the key the user typed: not the leaf (lam_max=...), nor a doubled prefix (train.train.kappa=...)
    assert str(info.value).startswith(f"{key}="), str(info.value)


def test_schedule_errors_name_their_section_from_yaml_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("decode:\n  pema:\n    stop_lam: 3\n")
    with pytest.raises(ConfigError, match=r"^decode\.pema\.stop_lam=3 is invalid"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^lam=-1\.0 is invalid"):  # built directly, there is no path to name
        ScheduleConfig(lam=-1.0)


def test_wrong_type_becomes_config_error():
    with pytest.raises(ConfigError):
        load_config(None, ["train.kappa=abc"])


def test_b_pd_from_rct_needs_rct_pd_method():
    with pytest.raises(ConfigError, match="b_pd_init"):
        load_config(None, ["train.method=pd"])
    cfg = load_config(None, ["train.method=pd", "train.b_pd_init=zeros"])
    assert cfg.train.method == "pd"


def test_dataclasses_validate_directly():
    with pytest.raises(ConfigError):
        TrainConfig(kappa=2.0)
    with pytest.raises(ConfigError):
        ScheduleConfig(lam=-1.0)
    with pytest.raises(ConfigError):
        DecodeConfig(strategy="nope")


# ----------------------------------------------------------------------------------------------------------------
# overrides and YAML types
# ----------------------------------------------------------------------------------------------------------------

def test_parse_overrides_types():
    parsed = dict(parse_overrides(["train.kappa=0.3", "data.train_limit=null", "train.epochs=4",
                                   "decode.strategy=beam", "eval.postprocess=true", "model.revision=",
                                   "model.model_id=a=b"]))
    assert parsed["train.kappa"] == 0.3 and type(parsed["train.kappa"]) is float
    assert parsed["data.train_limit"] is None
    assert parsed["train.epochs"] == 4 and type(parsed["train.epochs"]) is int
    assert parsed["decode.strategy"] == "beam"
    assert parsed["eval.postprocess"] is True
    assert parsed["model.revision"] is None
    assert parsed["model.model_id"] == "a=b"  # only the first '=' splits


@pytest.mark.parametrize("bad", ["train.kappa", "=3", " =3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_overrides_are_applied_with_yaml_types():
    cfg = load_config(CONFIG_DIR / "default.yaml" if (CONFIG_DIR / "default.yaml").exists() else None,
                      ["train.kappa=0.3", "data.train_limit=null", "decode.gu.lam_max=1", "train.epochs=2"])
    assert cfg.train.kappa == 0.3 and type(cfg.train.kappa) is float
    assert cfg.data.train_limit is None
    assert cfg.decode.gu.lam_max == 1.0 and type(cfg.decode.gu.lam_max) is float  # int -> float for float fields
    assert cfg.train.epochs == 2 and type(cfg.train.epochs) is int


def test_override_wins_over_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  kappa: 0.4\n")
    assert load_config(p, ["train.kappa=0.9"]).train.kappa == 0.9
    assert load_config(p).train.kappa == 0.4  # the file itself is untouched


def test_int_for_float_field_becomes_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("adapter:\n  alpha: 16\n")
    cfg = load_config(p)
    assert cfg.adapter.alpha == 16.0 and type(cfg.adapter.alpha) is float


# ----------------------------------------------------------------------------------------------------------------
# flatten
# ----------------------------------------------------------------------------------------------------------------

def test_flatten_gives_dotted_keys():
    cfg = load_config(None, ["train.kappa=0.3"])
    flat = flatten(cfg)
    assert flat["train.kappa"] == 0.3
    assert flat["decode.gu.lam_max"] == 0.9
    assert flat["decode.const.kind"] == "constant"
    assert flat["model.model_id"] == cfg.model.model_id
    assert flat["data.train_limit"] is None
    assert all(not isinstance(v, dict) for v in flat.values())
    # every leaf field of every section is there, and nothing else
    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"
    assert set(flat) == set(leaves(to_dict(cfg)))
    assert "decode.gu" not in flat and "train" not in flat


def test_flatten_prefix_and_plain_dict():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}, "p.") == {"p.a.b": 1, "p.a.c.d": 2, "p.e": 3}


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.train.kappa = 0.5  # type: ignore[misc]
