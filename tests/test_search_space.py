"""tune_spaces/*.yaml: every key is a config field, every value gives a valid config; bad spaces are refused."""
from pathlib import Path

import pytest

from pema.errors import ConfigError
from pema.executors.search_space import decode_grid, load_space, to_tune

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
    # the searched schedule is the recommended row's (decode.pema), not the Gradual Unrolling ablation's
    assert set(decode) == {"decode.pema.kind", "decode.pema.lam_max", "decode.pema.floor", "decode.pema.lam",
                           "decode.pema.stop_lam"}
    assert set(decode["decode.pema.kind"][1]) == {"constant", "gu_quadratic", "gu_linear"}
    assert decode["decode.pema.lam"] == ("choice", [0.3, 0.5, 0.6, 0.7])  # the constant schedule's lambda
    assert decode["decode.pema.stop_lam"] == ("choice", [None, 0.9])  # null: the schedule's lambda decides the stop


@pytest.mark.parametrize("text, match", [
    ("train.kapa: {choice: [0.1]}", "not a config field"),
    ("kappa: {uniform: [0.1, 0.5]}", "not a config field"),
    ("train.kappa: {uniform: [0.1, 1.5]}", "train.kappa=1.5"),
    ("train.kappa: {uniform: [0.5, 0.1]}", "low < high"),
    ("train.lr: {loguniform: [0, 0.1]}", "low > 0"),
    ("adapter.rank: {choice: []}", "non-empty"),
    ("adapter.rank: {gaussian: [1, 2]}", "kind in"),
    ("decode.pema.kind: {choice: [cosine]}", "decode.pema.kind=.cosine."),
    ("decode.pema.lam: {choice: [null, 0.5]}", r"decode\.pema\.lam=None"),  # null only where the field is optional
    ("decode.pema.stop_lam: {choice: [null, 1.5]}", r"decode\.pema\.stop_lam=1\.5"),
    ("- adapter.rank", "mapping"),
])
def test_bad_spaces_are_refused(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_space(path)


def test_decode_grid_drops_what_a_schedule_kind_ignores():
    space = {"decode.pema.kind": ("choice", ["constant", "gu_quadratic", "gu_linear"]),
             "decode.pema.lam_max": ("choice", [0.8, 0.9]), "decode.pema.floor": ("choice", [0.0, 0.5]),
             "decode.pema.lam": ("choice", [0.5, 0.7]), "decode.pema.stop_lam": ("choice", [None, 0.9])}
    grid = decode_grid(space)
    # constant: one point per lam; each GU kind: one per (lam_max, floor); stop_lam applies to every kind (x2);
    # no duplicates
    assert len(grid) == (2 + 2 * 2 * 2) * 2 and len({tuple(sorted(p.items())) for p in grid}) == len(grid)
    for point in grid:
        if point["decode.pema.kind"] == "constant":
            assert set(point) == {"decode.pema.kind", "decode.pema.lam", "decode.pema.stop_lam"}
        else:
            assert set(point) == {"decode.pema.kind", "decode.pema.lam_max", "decode.pema.floor",
                                  "decode.pema.stop_lam"}
    assert {p["decode.pema.stop_lam"] for p in grid} == {None, 0.9}
    assert decode_grid(space, samples=3, seed=1) == decode_grid(space, samples=3, seed=1)  # seeded
    assert len(decode_grid(space, samples=3)) == 3 and all(p in grid for p in decode_grid(space, samples=3))


def test_decode_grid_samples_continuous_entries_and_refuses_a_full_grid_of_them():
    space = {"decode.pema.kind": ("choice", ["gu_linear"]), "decode.pema.lam_max": ("uniform", [0.5, 1.0])}
    points = decode_grid(space, samples=4, seed=0)
    assert len(points) == 4 and all(0.5 <= p["decode.pema.lam_max"] <= 1.0 for p in points)
    with pytest.raises(ConfigError, match="continuous"):
        decode_grid(space)


@pytest.mark.parametrize("samples", [0, 2, 4])
def test_the_shipped_decoding_grid_gives_valid_configs_of_the_pema_schedule(samples):
    """Every setting decode_grid draws from tune_spaces/decode.yaml (the full grid, and the samples jobs/tune.py
    takes by default and in `make tune`) is a valid config on the smoke config, and it changes decode.pema only."""
    from pema.config import load_config, with_overrides

    smoke = ROOT / "jobs/configs/smoke.yaml"
    base = load_config(smoke)
    grid = decode_grid(load_space(ROOT / "tune_spaces/decode.yaml", smoke), samples, seed=0)
    # full grid: constant 4 lam x 2 stop_lam; each GU kind 4 lam_max x 3 floor x 2 stop_lam
    assert len(grid) == (samples or 4 * 2 + 2 * 4 * 3 * 2)
    for setting in grid:
        cfg = with_overrides(base, setting)  # raises ConfigError on an invalid setting
        for key, value in setting.items():
            assert getattr(cfg.decode.pema, key.removeprefix("decode.pema.")) == value, (key, setting)
        assert cfg.decode.gu == base.decode.gu and cfg.decode.const == base.decode.const
        assert cfg.train == base.train and cfg.adapter == base.adapter
    if not samples:
        constant = [p for p in grid if p["decode.pema.kind"] == "constant"]
        assert {p["decode.pema.lam"] for p in constant} == {0.3, 0.5, 0.6, 0.7}
        assert {p["decode.pema.stop_lam"] for p in grid} == {None, 0.9}


def test_max_epochs_is_the_largest_the_space_allows():
    from pema.config import PipelineConfig
    from pema.executors.ray_tune import max_epochs

    cfg = PipelineConfig()
    assert max_epochs(cfg, {"train.epochs": ("choice", [2, 5, 3])}) == 5.0
    assert max_epochs(cfg, {"train.epochs": ("randint", [1, 4])}) == 3.0
    assert max_epochs(cfg, {}) == float(cfg.train.epochs)
