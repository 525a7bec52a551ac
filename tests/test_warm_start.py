"""``train.warm_start``: retraining after an append starts from the adapter trained before and runs only the last
phase; without an adapter, or with one of other shapes, it is a ConfigError naming the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pema.config import load_config, with_absolute_data, with_overrides
from pema.errors import ConfigError
from pema.executors.inline import InlineExecutor

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from pema.stages.build import run_build

    out = tmp_path_factory.mktemp("warm") / "run"
    cfg = with_absolute_data(load_config(SMOKE))
    run_build(cfg, out, InlineExecutor(), progress=False)
    return cfg, out


def test_warm_start_continues_from_the_previous_adapter(built):
    from pema.stages.train import run_train

    cfg, out = built
    first = run_train(cfg, out, InlineExecutor(), progress=False)
    assert [p["phase"] for p in first.phases] == ["rct", "rct_pd"]
    warm = run_train(with_overrides(cfg, {"train.warm_start": True}), out, InlineExecutor(), progress=False)
    assert [p["phase"] for p in warm.phases] == ["rct_pd"]  # no RCT, no re-initialised B_pd
    # its first validation is where the last training ended: the joint loss of the adapter it started from
    start = warm.history[0]["val_loss"]
    assert start == pytest.approx(first.phases[-1]["best_val"], rel=0.05)
    scratch_first = first.history[[h["phase"] for h in first.history].index("rct_pd")]["val_loss"]
    assert start < scratch_first


def test_warm_start_without_an_adapter_is_named(tmp_path, built):
    import shutil

    from pema.stages.train import run_train

    cfg, out = built
    fresh = tmp_path / "fresh"
    shutil.copytree(out / "memory", fresh / "memory")
    shutil.copytree(out / "head", fresh / "head")
    with pytest.raises(ConfigError, match=r"train\.warm_start=true starts from .*adapter"):
        run_train(with_overrides(cfg, {"train.warm_start": True}), fresh, InlineExecutor(), progress=False)
    with pytest.raises(ConfigError, match="train.warm_start"):
        load_config(None, ["train.warm_start=maybe"])
    if (out / "adapter" / "adapter.json").is_file():
        meta = json.loads((out / "adapter" / "adapter.json").read_text())
        other = with_overrides(cfg, {"train.warm_start": True, "adapter.rank": meta["rank"] * 2})
        with pytest.raises(ConfigError, match="other shapes"):
            run_train(other, out, InlineExecutor(), progress=False)
