"""tune_spaces/*.yaml: every key is a config field, every value gives a valid config; bad spaces are refused."""
from pathlib import Path

import pytest

from pema.errors import ConfigError
from pema.integrations.search_space import load_space, to_tune

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load_against_the_default_config(path):
    space = load_space(path, ROOT / "jobs/configs/default.yaml")
    assert space and all(key.count(".") >= 1 for key in space)
    assert set(to_tune(space)) == set(space)


def test_the_spaces_cover_what_the_search_varies():
    train = load_space(ROOT / "tune_spaces/train.yaml")
    decode = load_space(ROOT / "tune_spaces/decode.yaml")
    assert {"adapter.rank", "train.kappa", "train.lr", "train.epochs", "train.phase2_init_A"} <= set(train)
    assert {"decode.gu.lam_max", "decode.gu.floor", "decode.gu.kind"} <= set(decode)
    assert set(decode["decode.gu.kind"][1]) == {"constant", "gu_quadratic", "gu_linear"}


@pytest.mark.parametrize("text, match", [
    ("train.kapa: {choice: [0.1]}", "not a config field"),
    ("kappa: {uniform: [0.1, 0.5]}", "not a config field"),
    ("train.kappa: {uniform: [0.1, 1.5]}", "train.kappa=1.5"),
    ("train.kappa: {uniform: [0.5, 0.1]}", "low < high"),
    ("train.lr: {loguniform: [0, 0.1]}", "low > 0"),
    ("adapter.rank: {choice: []}", "non-empty"),
    ("adapter.rank: {gaussian: [1, 2]}", "kind in"),
    ("decode.gu.kind: {choice: [cosine]}", "schedule.kind"),
    ("- adapter.rank", "mapping"),
])
def test_bad_spaces_are_refused(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_space(path)
