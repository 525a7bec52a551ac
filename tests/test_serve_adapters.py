"""Registered adapters served on a real Ray Serve instance (pema/jobs/serve_adapters.py): two versions on one
base model, each answering as it does in-process; moving the alias changes the version that answers."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_two_registered_adapters_share_one_base_model(ray_client, tmp_path, monkeypatch):
    import mlflow
    from local_ray import free_port
    from mlflow.tracking import MlflowClient
    from ray import serve

    from pema.adapter.io import load_head, save_adapter
    from pema.adapter.model import PemaAdapter
    from pema.config import load_config, to_dict
    from pema.jobs.serve_adapters import start_adapters
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm
    from pema.stages.decode import translate
    from pema.tracking.registry import register_adapter
    from pema.tracking.runs import connect, experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE, ["decode.pema.kind=constant", "decode.pema.lam=0.6"])
    model, tokenizer = load_plm("tiny://llama")
    adapters = []
    for seed, bleu in ((1, 2.0), (2, 1.0)):
        out = tmp_path / f"run{seed}"
        export_head(model, out / "head", model_id="tiny://llama")
        head, head_meta = load_head(out / "head")
        torch.manual_seed(seed)
        adapter = PemaAdapter(head.d, 8, 8.0, 0.0)
        with torch.no_grad():
            adapter.B_pd.normal_(0, 1.0)  # two clearly different adapters
        save_adapter(adapter, out / "adapter", {"model_id": "tiny://llama", "config": to_dict(cfg.adapter),
                                                "target_source_ratio": 1.5})
        adapters.append((out, adapter.eval(), head))
    uri = connect(tmp_path / "store")
    versions = []
    for (out, _, _), bleu in zip(adapters, (2.0, 1.0)):
        with mlflow.start_run(experiment_id=experiment_id(output_dir=tmp_path / "store")):
            versions.append(register_adapter(cfg, out, "pema-serve", dev_bleu=bleu))
    assert [v["version"] for v in versions] == ["1", "2"] and versions[0]["champion"] and not versions[1]["champion"]

    url = start_adapters(uri, to_dict(cfg), port=free_port())
    try:
        texts = ["The hotel is close to the station.", "We will meet tomorrow."]
        for (_, adapter, head), version in zip(adapters, ("1", "2")):
            status, answer = post(url, {"adapter": f"pema-serve/{version}", "texts": texts})
            local, _ = translate(model, tokenizer, texts, cfg, adapter=adapter, head=head, schedule=cfg.decode.pema,
                                 ratio=1.5)
            assert status == 200 and answer == {"model": f"pema-serve/{version}", "texts": local}
        assert post(url, {"adapter": "pema-serve@champion", "texts": texts})[1]["model"] == "pema-serve/1"
        MlflowClient(tracking_uri=uri).set_registered_model_alias("pema-serve", "champion", "2")
        assert post(url, {"adapter": "pema-serve@champion", "texts": texts})[1]["model"] == "pema-serve/2"
        assert post(url, {"adapter": "pema-serve", "texts": texts})[0] == 400  # neither @ALIAS nor /VERSION
        assert post(url, {"texts": texts})[0] == 400
        assert post(url, {"adapter": "pema-serve@nope", "texts": texts})[0] == 404
    finally:
        serve.delete("pema_adapters")
