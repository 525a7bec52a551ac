"""A resumed Tune search ends as an uninterrupted one (pema/executors/ray_tune.py), without a Ray cluster:
- a trial that had finished when the job was killed, before Tune saved that, reports its recorded result again
  from its final checkpoint: no training, no reopened MLflow run left RUNNING (found by the SIGKILL sweep);
- the best trial does not depend on the order trials ended in: ties in dev BLEU go to dev chrF, then to the trial
  drawn first (found by the sweep: both smoke trials at BLEU 0.0, the resume picked the other)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pema.executors.ray_tune as rt
from pema.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def trial(index: int, bleu: float, chrf: float, status: str = "completed", experiment: str = "4b717") -> dict:
    return {"trial_id": f"{experiment}_{index:05d}", "status": status, "dev_bleu": bleu, "dev_chrf": chrf}


def test_the_best_trial_breaks_ties_by_chrf_then_by_draw_order():
    a, b, c = trial(0, 0.0, 3.1), trial(1, 0.0, 7.3), trial(2, 0.0, 7.3)
    for order in ([a, b, c], [c, b, a], [b, c, a]):  # the order trials ended in
        assert rt.best_trial(order)["trial_id"] == "4b717_00001"
    assert rt.best_trial([a, trial(1, 0.5, 1.0)])["trial_id"] == "4b717_00001"  # BLEU first
    assert rt.best_trial([trial(0, 9.0, 9.0, "pruned"), a])["trial_id"] == "4b717_00000"  # completed only
    assert rt.best_trial([trial(0, 1.0, 1.0, "failed")]) is None
    assert [rt.sample_order(t)[1] for t in sorted([c, a, b], key=rt.sample_order)] == [0, 1, 2]


class FakeCheckpoint:
    def __init__(self, path: Path):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.path))


@pytest.mark.parametrize("final", [True, False])
def test_a_trial_finished_before_the_kill_reports_its_result_again(tmp_path, monkeypatch, final):
    ckpt = tmp_path / "checkpoint"
    (ckpt / rt.BUNDLE).mkdir(parents=True)
    (ckpt / rt.BUNDLE / "adapter.json").write_text("{}")
    result = {"mlflow_run_id": "run-1", "dev_bleu": 0.0, "dev_chrf": 3.1, "final": True, "pd_epoch": 3.0}
    meta = {"mlflow_run_id": "run-1", **({"final": True, "result": result} if final else {})}
    (ckpt / rt.TRIAL_META).write_text(json.dumps(meta))
    reports, opened = [], []

    class Context:
        def get_trial_id(self):
            return "4b717_00000"

    def report(metrics, checkpoint=None):
        reports.append((metrics, sorted(p.name for p in Path(checkpoint.path).iterdir())))

    class Runs:
        def open(self, *args):
            opened.append(args)
            raise RuntimeError("reopened")  # far enough: the trial would train again

    monkeypatch.setattr(rt.tune, "get_context", lambda: Context())
    monkeypatch.setattr(rt.tune, "get_checkpoint", lambda: FakeCheckpoint(ckpt))
    monkeypatch.setattr(rt.tune, "report", report)
    setup = {"trials_dir": str(tmp_path / "trials"), "cfg": to_dict(load_config(ROOT / "jobs/configs/smoke.yaml")),
             "output_dir": str(tmp_path), "trial_runs": Runs()}
    if final:
        rt.tune_trial({}, setup)
        assert reports == [(result, sorted([rt.BUNDLE, rt.TRIAL_META]))] and opened == []
    else:  # interrupted mid-training: the trial goes on in its own run
        with pytest.raises(RuntimeError, match="reopened"):
            rt.tune_trial({}, setup)
        assert opened and opened[0][-1] == "run-1" and reports == []
