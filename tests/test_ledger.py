"""The run folder's ledger of finished stages (pema/stages/ledger.py): a stage done with this config and with its
outputs in place is not run again; a changed config, a missing output or an unreadable ledger reruns it; a stage
that runs again drops the stages after it."""
from __future__ import annotations

import json
from pathlib import Path

from pema.config import load_config, with_absolute_data
from pema.executors.inline import InlineExecutor
from pema.stages.ledger import LEDGER, Ledger
from pema.stages.logger import RecordingLogger
from pema.stages.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def touch(root: Path, *paths: str) -> None:
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text("{}")


def test_done_needs_the_same_config_and_the_outputs(tmp_path):
    cfg = load_config(SMOKE)
    ledger = Ledger(tmp_path)
    assert ledger.done("train", cfg) is None
    touch(tmp_path, "head/head.json", "adapter/adapter.json")
    ledger.record("train", cfg, {"steps_run": 44}, "run-1")
    assert ledger.done("train", cfg)["result"] == {"steps_run": 44}
    assert ledger.done("train", load_config(SMOKE, ["resources.train_workers=2"])) is not None  # where, not what
    assert ledger.done("train", load_config(SMOKE, ["train.kappa=0.3"])) is None  # another config
    (tmp_path / "adapter" / "adapter.json").unlink()
    assert ledger.done("train", cfg) is None  # the output is gone
    (tmp_path / LEDGER).write_text("{not json")
    assert ledger.entries() == {} and ledger.done("train", cfg) is None


def test_a_stage_that_runs_again_drops_the_stages_after_it(tmp_path):
    cfg = load_config(SMOKE)
    ledger = Ledger(tmp_path)
    for stage in ("build_memory", "train", "evaluate"):
        ledger.record(stage, cfg, {}, stage)
    ledger.forget_after("train")
    assert set(ledger.entries()) == {"build_memory", "train"}
    ledger.record("build_memory", cfg, {}, "again")
    assert set(ledger.entries()) == {"build_memory"} and ledger.run_ids() == ["again"]


def test_a_rerun_pipeline_skips_the_stages_it_finished(tmp_path):
    cfg = with_absolute_data(load_config(SMOKE))
    first = RecordingLogger()
    summary = run_pipeline(cfg, tmp_path, InlineExecutor(), first, progress=False, log=lambda line: None,
                           ledger=Ledger(tmp_path))
    assert [c[1] for c in first.calls if c[0] == "stage"] == ["pipeline", "build_memory", "train", "evaluate"]
    entries = json.loads((tmp_path / LEDGER).read_text())
    assert set(entries) == {"build_memory", "train", "evaluate", "pipeline"}

    ledger = Ledger(tmp_path)  # killed after train: the evaluate and pipeline entries were never written
    ledger.forget_after("train")
    again, lines = RecordingLogger(), []
    rerun = run_pipeline(cfg, tmp_path, InlineExecutor(), again, progress=False, log=lines.append, ledger=ledger)
    assert [c[1] for c in again.calls if c[0] == "stage"] == ["pipeline", "evaluate"]  # build and train: done
    assert any(line.startswith("[build_memory] done earlier") for line in lines)
    for system in ("zero_shot", "pema"):
        assert rerun[system]["chrf"] == summary[system]["chrf"]
    assert rerun["memory_rows"] == summary["memory_rows"]
