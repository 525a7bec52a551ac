"""Registered adapters served on a real Ray Serve instance (pema/jobs/serve_adapters.py), over HTTP: two versions on
one base model, each answering as it does in-process; moving the alias changes the version that answers; bearer
tokens (401, audited); unknown, deleted and artifact-less versions answer 404 naming them, a deleted version at
once even when it was loaded before; the body, text-count and per-text token caps (413 naming the text), or the
truncation the config chose, stated in the answer."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
TOKEN = "tok-acme-123456789"
CAP = 24  # data.max_tokens of the served config
TEXTS = ["The hotel is close to the station.", "We will meet tomorrow."]


def post(url, body, token: str | None = TOKEN, raw: bytes | None = None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def make_run(out: Path, seed: int, cfg, model):
    """A run folder with ``head/`` and a random ``adapter/`` (clearly different per seed); returns
    ``(out, adapter, head)``."""
    from pema.adapter.io import load_head, save_adapter
    from pema.adapter.model import PemaAdapter
    from pema.config import to_dict
    from pema.owner.export import export_head

    export_head(model, out / "head", model_id="tiny://llama")
    head, _ = load_head(out / "head")
    torch.manual_seed(seed)
    adapter = PemaAdapter(head.d, 8, 8.0, 0.0)
    with torch.no_grad():
        adapter.B_pd.normal_(0, 1.0)
    save_adapter(adapter, out / "adapter", {"model_id": "tiny://llama", "config": to_dict(cfg.adapter),
                                            "target_source_ratio": 1.5})
    return out, adapter.eval(), head


def register(cfg, run: Path, store: Path, name: str, bleu: float) -> dict:
    import mlflow

    from pema.tracking.registry import register_adapter
    from pema.tracking.runs import experiment_id

    with mlflow.start_run(experiment_id=experiment_id(output_dir=store)):
        return register_adapter(cfg, run, name, dev_bleu=bleu)


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def served(ray_client, tmp_path_factory):
    from local_ray import free_port
    from ray import serve

    from pema.config import load_config, to_dict
    from pema.jobs.serve_adapters import TOKENS_ENV, start_adapters
    from pema.owner.plm import load_plm
    from pema.tracking.runs import connect

    tmp = tmp_path_factory.mktemp("serve_adapters")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(TOKENS_ENV, raising=False)
        cfg = load_config(SMOKE, ["decode.pema.kind=constant", "decode.pema.lam=0.6", f"data.max_tokens={CAP}"])
        model, tokenizer = load_plm("tiny://llama")
        store = tmp / "store"
        uri = connect(store)
        runs = [make_run(tmp / f"run{seed}", seed, cfg, model) for seed in (1, 2)]
        versions = [register(cfg, out, store, "pema-serve", bleu) for (out, _, _), bleu in zip(runs, (2.0, 1.0))]
        tokens, audit = tmp / "tokens.json", tmp / "audit.jsonl"
        tokens.write_text(json.dumps({"acme": TOKEN}))
        port = free_port()

        def deploy(config):
            return start_adapters(uri, to_dict(config), port=port, tokens_file=str(tokens), audit_path=str(audit))

        url = deploy(cfg)
        try:
            yield SimpleNamespace(url=url, uri=uri, cfg=cfg, model=model, tokenizer=tokenizer, runs=runs,
                                  versions=versions, store=store, tmp=tmp, audit=audit, deploy=deploy)
        finally:
            serve.delete("pema_adapters")


def test_two_registered_adapters_share_one_base_model(served):
    from mlflow.tracking import MlflowClient

    from pema.stages.decode import translate

    v = served.versions
    assert [x["version"] for x in v] == ["1", "2"] and v[0]["champion"] and not v[1]["champion"]
    cfg = served.cfg
    for (_, adapter, head), version in zip(served.runs, ("1", "2")):
        status, answer = post(served.url, {"adapter": f"pema-serve/{version}", "texts": TEXTS})
        local, _ = translate(served.model, served.tokenizer, TEXTS, cfg, adapter=adapter, head=head,
                             schedule=cfg.decode.pema, ratio=1.5)
        assert status == 200 and answer == {"model": f"pema-serve/{version}", "texts": local}
    assert post(served.url, {"adapter": "pema-serve@champion", "texts": TEXTS})[1]["model"] == "pema-serve/1"
    MlflowClient(tracking_uri=served.uri).set_registered_model_alias("pema-serve", "champion", "2")
    assert post(served.url, {"adapter": "pema-serve@champion", "texts": TEXTS})[1]["model"] == "pema-serve/2"
    for body, field in (({"adapter": "pema-serve", "texts": TEXTS}, "NAME@ALIAS"), ({"texts": TEXTS}, "adapter"),
                        ({"adapter": "pema-serve/1", "texts": "one"}, "texts"), ([1, 2], "JSON object")):
        status, answer = post(served.url, body)
        assert status == 400 and field in answer["error"], answer
    assert post(served.url, None, raw=b"{not json")[0] == 400


def test_bearer_token_is_required_and_every_request_is_audited(served):
    before = len(audit_lines(served.audit))
    body = {"adapter": "pema-serve/1", "texts": TEXTS}
    for token in (None, "wrong", ""):
        status, answer = post(served.url, body, token=token)
        assert status == 401 and "bearer token" in answer["error"], answer
    assert post(served.url, body)[0] == 200
    lines = audit_lines(served.audit)[before:]
    assert [(x["status"], x["tenant"]) for x in lines] == [(401, None)] * 3 + [(200, "acme")]
    assert lines[-1]["model"] == "pema-serve/1" and lines[-1]["texts"] == 2 and lines[-1]["tokens_in"] > 0
    assert lines[-1]["endpoint"] == "POST /adapters" and lines[0]["model"] is None
    assert TEXTS[0] not in served.audit.read_text()  # never the text


def test_unknown_references_answer_404_naming_them(served):
    for ref in ("pema-serve/99", "nobody/1", "pema-serve@nope", "nobody@champion"):
        status, answer = post(served.url, {"adapter": ref, "texts": TEXTS})
        assert status == 404 and repr(ref) in answer["error"], (ref, status, answer)
    assert [x["status"] for x in audit_lines(served.audit)[-4:]] == [404] * 4


def test_a_deleted_version_stops_answering_at_once(served):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=served.uri)
    for (out, _, _), bleu in zip(served.runs, (2.0, 1.0)):
        register(served.cfg, out, served.store, "pema-gone", bleu)
    assert post(served.url, {"adapter": "pema-gone/1", "texts": TEXTS})[0] == 200  # loaded: kept by multiplexed
    client.delete_model_version("pema-gone", "1")  # also drops the champion alias that pointed at it
    client.delete_model_version("pema-gone", "2")  # never loaded
    for ref in ("pema-gone/1", "pema-gone/2", "pema-gone@champion"):
        status, answer = post(served.url, {"adapter": ref, "texts": TEXTS})
        assert status == 404 and repr(ref) in answer["error"], (ref, status, answer)


def test_an_alias_on_a_version_whose_artifacts_are_gone_answers_404(served):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=served.uri)
    register(served.cfg, served.runs[1][0], served.store, "pema-broken", 1.0)
    mv = client.get_model_version("pema-broken", "1")
    location = Path(client.get_model_version_download_uri("pema-broken", "1").removeprefix("file://"))
    assert location.is_dir(), mv.source
    shutil.rmtree(location)
    status, answer = post(served.url, {"adapter": "pema-broken@champion", "texts": TEXTS})
    assert status == 404 and "'pema-broken@champion'" in answer["error"] and "pema-broken/1" in answer["error"]


def words(tokenizer, n_tokens: int) -> str:
    """A text of exactly ``n_tokens`` tokens."""
    text = " ".join(["house"] * n_tokens)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == n_tokens, len(ids)
    return text


def test_caps_on_texts_tokens_and_body_bound_a_request(served):
    from pema.jobs.serve_adapters import MAX_BODY_BYTES, MAX_TEXTS

    long_text = "The hotel is close to the station. " * 12_000  # about 400 KB, as in the issue
    n_long = len(served.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    status, answer = post(served.url, {"adapter": "pema-serve/1", "texts": [TEXTS[0], long_text]})
    assert status == 413 and f"texts[1] has {n_long} tokens" in answer["error"] and f"cap of {CAP}" in answer["error"]
    refused = audit_lines(served.audit)[-1]
    assert refused["status"] == 413 and refused["model"] is None  # refused before the registry or a decode
    status, answer = post(served.url, {"adapter": "pema-serve/1", "texts": TEXTS[:1] * (MAX_TEXTS + 1)})
    assert status == 413 and f"{MAX_TEXTS + 1} texts" in answer["error"] and str(MAX_TEXTS) in answer["error"]
    status, answer = post(served.url, None, raw=json.dumps({"adapter": "pema-serve/1",
                                                            "texts": ["x" * MAX_BODY_BYTES]}).encode())
    assert status == 413 and f"limit of {MAX_BODY_BYTES}" in answer["error"]
    # the largest request there is: MAX_TEXTS texts of CAP tokens each, decoded in full and no more
    status, answer = post(served.url, {"adapter": "pema-serve/1", "texts": [words(served.tokenizer, CAP)] * MAX_TEXTS})
    assert status == 200 and len(answer["texts"]) == MAX_TEXTS and "truncated" not in answer
    assert audit_lines(served.audit)[-1]["tokens_in"] == MAX_TEXTS * CAP


def test_overlength_truncate_cuts_to_the_cap_and_says_so(served):
    from pema.config import with_overrides

    served.deploy(with_overrides(served.cfg, {"data.overlength": "truncate"}))
    try:
        long_text = words(served.tokenizer, 3 * CAP)
        status, answer = post(served.url, {"adapter": "pema-serve/1", "texts": [TEXTS[0], long_text]})
        assert status == 200 and len(answer["texts"]) == 2
        assert answer["truncated"] == [{"index": 1, "tokens": 3 * CAP, "max_tokens": CAP}]
        assert audit_lines(served.audit)[-1]["truncated"] == 1
    finally:
        served.deploy(served.cfg)


def test_pure_parts_refuse_bad_input():
    from pema.jobs.serve_adapters import cap_texts, parse_request
    from pema.formats.access import RequestError
    from pema.owner.plm import load_plm

    _, tokenizer = load_plm("tiny://llama")
    text = words(tokenizer, 5)
    assert cap_texts([text], tokenizer, 5, "error") == ([text], [], 5)
    with pytest.raises(RequestError, match=r"texts\[0\] has 5 tokens, over the cap of 4") as exc:
        cap_texts([text], tokenizer, 4, "error")
    assert exc.value.status == 413
    cut, truncated, _ = cap_texts([text], tokenizer, 4, "truncate")
    assert len(tokenizer(cut[0], add_special_tokens=False)["input_ids"]) == 4 and truncated[0]["tokens"] == 5
    emoji = "Grüße 🙂🙂🙂 日本"  # a cut by token ids alone can end inside a character, and count longer again
    for cap in range(1, len(tokenizer(emoji, add_special_tokens=False)["input_ids"])):
        try:
            cut, _, _ = cap_texts([emoji], tokenizer, cap, "truncate")
        except RequestError as exc:  # no visible prefix fits: named, never a longer text
            assert exc.status == 413
            continue
        assert len(tokenizer(cut[0], add_special_tokens=False)["input_ids"]) <= cap and emoji.startswith(cut[0])
    for body in (b"", b"[]", b'{"adapter": 3, "texts": []}', b'{"adapter": "a/1", "texts": [1]}'):
        with pytest.raises(RequestError) as exc:
            parse_request(body)
        assert exc.value.status == 400


def test_service_and_job_refuse_to_start_without_tokens(ray_client, tmp_path, monkeypatch, capsys):
    from pema.errors import ConfigError
    from pema.jobs.serve_adapters import TOKENS_ENV, start_adapters

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKENS_ENV):
        start_adapters("sqlite:///unused.db", {}, port=1)
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_adapters_job", ROOT / "jobs" / "serve_adapters.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(SMOKE), "--output-dir", str(tmp_path / "out"), "--once"]) == 2
    assert "no access tokens" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert job.main(["--config", str(SMOKE), "--output-dir", str(tmp_path / "out"), "--once",
                     "--tokens", str(tmp_path / "bad.json")]) == 2
    assert "not JSON" in capsys.readouterr().err
