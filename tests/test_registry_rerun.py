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
