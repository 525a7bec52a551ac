"""The run folder's ledger of finished stages (pema/stages/ledger.py): a stage done with this config and with its
outputs in place is not run again; a changed config, a missing output or an unreadable ledger reruns it; a stage
that runs again drops the stages after it."""
from __future__ import annotations

import json
from pathlib import Path

from pema.config import load_config, with_absolute_data
from pema.executors.inline import InlineExecutor
from pema.formats.layout import source_of
from pema.stages.ledger import LEDGER, Ledger, snapshot_inputs, stage_inputs
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
    assert {k for k, e in ledger.entries().items() if "result" in e} == {"build_memory", "train"}
    assert ledger.verdict("evaluate", cfg)[1] == "train, whose outputs it reads, ran again"
    ledger.record("build_memory", cfg, {}, "again")
    assert {k for k, e in ledger.entries().items() if "result" in e} == {"build_memory"}
    assert ledger.run_ids() == ["again"] and ledger.done("train", cfg) is None


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
    assert any(line.startswith("[build_memory] skipped: done earlier with the same config and inputs") for line in lines)
    for system in ("zero_shot", "pema"):
        assert rerun[system]["chrf"] == summary[system]["chrf"]
    assert rerun["memory_rows"] == summary["memory_rows"]

    # the same command after the test file changed under the same path: build and train are skipped, evaluate
    # runs again and says why (before the gate knew the data, the old table came back in seconds)
    data = tmp_path / "data"
    data.mkdir()
    lines_of = {s: Path(getattr(cfg.data, s)).read_text(encoding="utf-8").splitlines(keepends=True)
                for s in ("train", "dev", "test")}
    for split, text in lines_of.items():
        (data / f"{split}.jsonl").write_text("".join(text), encoding="utf-8")
    moved = with_absolute_data(load_config(SMOKE, [f"data.{s}={data / s}.jsonl" for s in lines_of]))
    same, lines = RecordingLogger(), []  # other paths, the same bytes: nothing runs
    run_pipeline(moved, tmp_path, InlineExecutor(), same, progress=False, log=lines.append, ledger=Ledger(tmp_path))
    assert [c[1] for c in same.calls if c[0] == "stage"] == []
    assert any(line.startswith("[pipeline] skipped") for line in lines)
    # a rerun names every stage it skipped, why, and where that is recorded; the old table is said to be old
    recorded = json.loads((tmp_path / LEDGER).read_text())
    for stage in ("build_memory", "train", "evaluate", "pipeline"):
        assert any(line.startswith(f"[{stage}] skipped: done earlier with the same config and inputs "
                                   f"({LEDGER}, run {recorded[stage]['run_id']})") for line in lines), lines
    assert lines[-1].startswith("[pipeline] skipped") and lines[-1].endswith("nothing ran now; the scores and "
                                                                             "timings are that run's"), lines
    (data / "test.jsonl").write_text("".join(lines_of["test"][::-1]), encoding="utf-8")  # other pairs' order
    changed, lines = RecordingLogger(), []
    run_pipeline(moved, tmp_path, InlineExecutor(), changed, progress=False, log=lines.append, ledger=Ledger(tmp_path))
    assert [c[1] for c in changed.calls if c[0] == "stage"] == ["pipeline", "evaluate"]
    assert any(line.startswith("[evaluate] redone: data.test changed (sha256 ") for line in lines), lines
    (data / "train.jsonl").write_text("".join(lines_of["train"][1:]), encoding="utf-8")  # one pair fewer
    changed, lines = RecordingLogger(), []
    run_pipeline(moved, tmp_path, InlineExecutor(), changed, progress=False, log=lines.append, ledger=Ledger(tmp_path))
    assert [c[1] for c in changed.calls if c[0] == "stage"] == ["pipeline", "build_memory", "train", "evaluate"]
    assert any(line.startswith("[build_memory] redone: data.train changed") for line in lines), lines
    assert "[train] redone: build_memory, whose outputs it reads, ran again" in lines, lines


def test_the_verdict_names_what_changed(tmp_path):
    cfg = load_config(SMOKE)
    ledger = Ledger(tmp_path)
    touch(tmp_path, "head/head.json", "adapter/adapter.json")
    ledger.record("train", cfg, {}, "run-1", inputs={"memory/train/manifest.json": "a" * 64})
    assert ledger.verdict("train", load_config(SMOKE, ["train.kappa=0.3"]))[1] == \
        "the config changed (train.kappa 0.2 -> 0.3)"
    assert ledger.verdict("train", cfg, {"memory/train/manifest.json": "b" * 64})[1] == \
        f"memory/train/manifest.json changed (sha256 {'a' * 12} -> {'b' * 12})"
    assert ledger.verdict("train", cfg, {"memory/train/manifest.json": "a" * 64})[0] is not None
    assert ledger.verdict("evaluate", cfg)[1] == "not done before in this folder"


def test_the_inputs_are_read_once_into_the_folder(tmp_path):
    """The job's edge copies each split it reads into <output-dir>/inputs/, named by its content: a file replaced
    while the job runs changes nothing the job reads, and the digests the gate records are of those copies."""
    cfg = load_config(SMOKE)
    snap = snapshot_inputs(cfg, tmp_path / "out", ("train", "dev"))
    copy = Path(snap.data.train)
    assert copy.parent == tmp_path / "out" / "inputs" and copy.read_bytes() == Path(cfg.data.train).read_bytes()
    assert snap.data.test == cfg.data.test  # not read by this job: not copied
    digests = stage_inputs(snap, tmp_path / "out", "build_memory")
    assert copy.name == f"train-{digests['data.train'][:16]}.jsonl" and set(digests) == {"data.train", "data.dev",
                                                                                           "model"}
    assert source_of(snap.data.train) == cfg.data.train  # what the tables and messages show
    again = snapshot_inputs(cfg, tmp_path / "out", ("train",))  # the dev copy is no longer named: removed
    assert sorted(p.name for p in (tmp_path / "out" / "inputs").iterdir()) == sorted([Path(again.data.train).name,
                                                                                    "sources.json"])
