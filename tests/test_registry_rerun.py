"""Registering is safe to rerun: the same adapter, schedule and dev BLEU registered again (a register job rerun
after a kill) gets its version back, not a second one; a changed adapter or dev BLEU is a new version."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def test_the_same_adapter_registered_again_is_the_same_version(tmp_path, monkeypatch):
    import mlflow

    from pema.adapter.io import load_head, save_adapter
    from pema.adapter.model import PemaAdapter
    from pema.config import load_config, to_dict
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm
    from pema.tracking.registry import register_adapter
    from pema.tracking.runs import connect, experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE)
    model, _ = load_plm("tiny://llama")
    out = tmp_path / "run"
    export_head(model, out / "head", model_id="tiny://llama")
    head, _ = load_head(out / "head")

    def adapter(seed):
        torch.manual_seed(seed)
        save_adapter(PemaAdapter(head.d, 8, 8.0, 0.0), out / "adapter",
                     {"model_id": "tiny://llama", "config": to_dict(cfg.adapter), "target_source_ratio": 1.5})

    connect(tmp_path / "store")
    exp = experiment_id(output_dir=tmp_path / "store")

    def register(bleu):
        with mlflow.start_run(experiment_id=exp):
            return register_adapter(cfg, out, "pema-rerun", dev_bleu=bleu)

    adapter(1)
    first = register(2.0)
    again = register(2.0)  # the job rerun after a kill
    assert (first["version"], again["version"]) == ("1", "1") and again["champion"]
    assert register(1.0)["version"] == "2"  # another dev BLEU: a new version, not the champion
    adapter(2)
    newer = register(3.0)
    assert newer["version"] == "3" and newer["champion"]
    mlflow.set_tracking_uri(None)


def test_the_register_job_rerun_keeps_one_finished_run(tmp_path, monkeypatch):
    """The register job is gated by the run folder's ledger: run again (a kill after the version was registered),
    it returns the recorded version without a second register run; a new adapter registers a new version."""
    from mlflow.tracking import MlflowClient

    import pema.jobs.stages as stages
    from pema.adapter.io import load_head, save_adapter
    from pema.adapter.model import PemaAdapter
    from pema.config import load_config, to_dict
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE, ["model.model_id=tiny://llama"])
    model, _ = load_plm("tiny://llama")
    out = tmp_path / "run"
    export_head(model, out / "head", model_id="tiny://llama")
    head, _ = load_head(out / "head")
    calls = []
    real = stages.register_adapter
    monkeypatch.setattr(stages, "register_adapter", lambda *a, **k: calls.append(1) or real(*a, **k))

    def adapter(seed):
        torch.manual_seed(seed)
        save_adapter(PemaAdapter(head.d, 8, 8.0, 0.0), out / "adapter",
                     {"model_id": "tiny://llama", "config": to_dict(cfg.adapter), "target_source_ratio": 1.5})

    def finished_register_runs():
        client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return sum(r.data.tags.get("pema.stage") == "register" and r.info.status == "FINISHED" for r in runs)

    adapter(1)
    first = stages.register(cfg, out, "pema-rerun", dev_bleu=2.0, progress=False)
    again = stages.register(cfg, out, "pema-rerun", dev_bleu=2.0, progress=False)
    assert first == again and first["version"] == "1" and len(calls) == 1 and finished_register_runs() == 1
    assert stages.register(cfg, out, "pema-other", dev_bleu=2.0, progress=False)["version"] == "1"  # another name
    adapter(2)
    newer = stages.register(cfg, out, "pema-rerun", dev_bleu=2.0, progress=False)
    assert newer["version"] == "2" and len(calls) == 3 and finished_register_runs() == 3
    import mlflow

    mlflow.set_tracking_uri(None)
