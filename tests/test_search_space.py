"""tune_spaces/*.yaml: every key is a config field, every value gives a valid config; bad spaces are refused."""
from pathlib import Path

import pytest

from pema.errors import ConfigError
from pema.integrations.search_space import decode_grid, load_space, to_tune

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
    ("decode.gu.kind: {choice: [cosine]}", "decode.gu.kind=.cosine."),
    ("- adapter.rank", "mapping"),
])
def test_bad_spaces_are_refused(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_space(path)


def test_decode_grid_drops_what_a_schedule_kind_ignores():
    space = {"decode.gu.kind": ("choice", ["constant", "gu_quadratic", "gu_linear"]),
             "decode.gu.lam_max": ("choice", [0.8, 0.9]), "decode.gu.floor": ("choice", [0.0, 0.5]),
             "decode.gu.lam": ("choice", [0.5, 0.7])}
    grid = decode_grid(space)
    # constant: one point per lam; each GU kind: one per (lam_max, floor); no duplicates
    assert len(grid) == 2 + 2 * 2 * 2 and len({tuple(sorted(p.items())) for p in grid}) == len(grid)
    for point in grid:
        if point["decode.gu.kind"] == "constant":
            assert set(point) == {"decode.gu.kind", "decode.gu.lam"}
        else:
            assert set(point) == {"decode.gu.kind", "decode.gu.lam_max", "decode.gu.floor"}
    assert decode_grid(space, samples=3, seed=1) == decode_grid(space, samples=3, seed=1)  # seeded
    assert len(decode_grid(space, samples=3)) == 3 and all(p in grid for p in decode_grid(space, samples=3))


def test_decode_grid_samples_continuous_entries_and_refuses_a_full_grid_of_them():
    space = {"decode.gu.kind": ("choice", ["gu_linear"]), "decode.gu.lam_max": ("uniform", [0.5, 1.0])}
    points = decode_grid(space, samples=4, seed=0)
    assert len(points) == 4 and all(0.5 <= p["decode.gu.lam_max"] <= 1.0 for p in points)
    with pytest.raises(ConfigError, match="continuous"):
        decode_grid(space)


def test_max_epochs_is_the_largest_the_space_allows():
    from pema.config import PipelineConfig
    from pema.integrations.ray_tune import max_epochs

    cfg = PipelineConfig()
    assert max_epochs(cfg, {"train.epochs": ("choice", [2, 5, 3])}) == 5.0
    assert max_epochs(cfg, {"train.epochs": ("randint", [1, 4])}) == 3.0
    assert max_epochs(cfg, {}) == float(cfg.train.epochs)
