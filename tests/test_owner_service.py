"""The PLM owner's service without HTTP (OwnerService.handle, the body Ray Serve runs): what crosses, access, size
limits, sessions and the audit log, against the in-process owner code as the reference."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_numpy

from pema.adapter.decode import GenerationSettings, generate
from pema.owner.encode import EncodeExample, MemoryEncoder
from pema.owner.export import export_head
from pema.owner.plm import tiny_model
from pema.owner.service import Limits, OwnerService, load_tokens

VOCAB, STOP, PAD = 120, 2, 0
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", VOCAB, seed=5).eval()


def service(model, tmp_path, **limits) -> OwnerService:
    export_head(model, tmp_path / "head", model_id="tiny")
    return OwnerService(model, tmp_path / "head", {"s3cret": "acme", "other": "beta"},
                        audit_path=tmp_path / "audit.jsonl", limits=Limits(**limits), pad_id=PAD)


def call(svc, method, path, body=None, headers=AUTH):
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return svc.handle(method, path, headers, raw)


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EncodeExample(i, tuple(torch.randint(3, VOCAB, (4 + i % 3,), generator=g).tolist()),
                          tuple(torch.randint(3, VOCAB, (3 + i % 2,), generator=g).tolist())) for i in range(n)]


def as_body(exs, dtype="float32"):
    return {"dtype": dtype, "examples": [{"example": e.example, "prompt_ids": list(e.prompt_ids),
                                          "target_ids": list(e.target_ids)} for e in exs]}


def test_context_answers_the_memory_rows_of_the_in_process_encoder(model, tmp_path):
    svc = service(model, tmp_path)
    exs = examples(5)
    status, ctype, body = call(svc, "POST", "/context", as_body(exs))
    assert (status, ctype) == (200, "application/octet-stream")
    rows, reference = load_numpy(body), MemoryEncoder(model, pad_id=PAD, key_dtype="float32")(exs)
    for column in ("token", "example", "position"):
        np.testing.assert_array_equal(rows[column], reference[column])
    np.testing.assert_array_equal(rows["key"], reference["key"])  # the same forward: exactly the same keys
    header = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])["__metadata__"]
    assert header["head_fingerprint"] == svc.fingerprint and header["d"] == "64"


def test_greedy_decoding_through_sessions_equals_generate(model, tmp_path):
    """Only keys cross; the head the data owner holds turns them into the PLM's logits, and greedy decoding on them
    chooses generate()'s tokens. Rows that stopped leave the session (``rows``) and get no more keys."""
    from pema.adapter.io import load_head

    svc = service(model, tmp_path)
    head, _ = load_head(tmp_path / "head")
    prompts = [list(e.prompt_ids) for e in examples(3, seed=1)]
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    reference = generate(model, prompts, stop_token_id=STOP, pad_token_id=PAD, settings=settings, progress=False)
    status, _, body = call(svc, "POST", "/sessions", {"prompts": prompts})
    assert status == 200
    out = load_numpy(body)
    sid = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])["__metadata__"]["session"]
    assert set(out) == {"key"} and out["key"].shape == (3, 64)  # no distribution on the wire
    tokens, live = [[] for _ in prompts], [0, 1, 2]
    for _ in range(settings.max_new_tokens):
        chosen = head.from_key(torch.from_numpy(out["key"])).argmax(-1).tolist()
        for r, t in zip(live, chosen):
            tokens[r].append(t)
        going = [i for i, (r, t) in enumerate(zip(live, chosen)) if t != STOP]
        if not going:
            break
        body = {"tokens": [chosen[i] for i in going]}
        if len(going) < len(live):
            body["rows"] = going
        status, _, answer = call(svc, "POST", f"/sessions/{sid}/step", body)
        assert status == 200
        out, live = load_numpy(answer), [live[i] for i in going]
        assert out["key"].shape == (len(live), 64)
    assert tokens == [list(t) for t in reference.token_ids]
    assert call(svc, "DELETE", f"/sessions/{sid}")[0] == 200
    assert call(svc, "POST", f"/sessions/{sid}/step", {"tokens": [3, 3, 3]})[0] == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}])
def test_missing_or_wrong_token_is_401(model, tmp_path, headers):
    status, _, body = call(service(model, tmp_path), "GET", "/health", headers=headers)
    assert status == 401 and b"bearer token" in body


def test_size_limits_unknown_sessions_and_malformed_bodies(model, tmp_path):
    svc = service(model, tmp_path, max_rows=4, max_tokens=40, max_body_bytes=4000)
    assert call(svc, "POST", "/context", as_body(examples(5)))[0] == 413  # 5 rows > 4
    long = [EncodeExample(0, tuple([5] * 30), tuple([6] * 20))]
    assert call(svc, "POST", "/context", as_body(long))[0] == 413  # 50 ids > 40
    assert call(svc, "POST", "/context", b"{" + b" " * 5000 + b"}")[0] == 413  # the body itself
    assert call(svc, "POST", "/sessions/feedbeef/step", {"tokens": [3]})[0] == 404
    assert call(svc, "DELETE", "/sessions/feedbeef")[0] == 404
    for body, field in [(b"not json", "not JSON"), ({"examples": []}, "examples"),
                        ({"examples": [{"example": 0, "prompt_ids": [1], "target_ids": "x"}]}, "examples[0].target_ids"),
                        ({"examples": [{"example": 0, "prompt_ids": [1, VOCAB], "target_ids": [2]}]},
                         "examples[0].prompt_ids"), ({"examples": [{"prompt_ids": [1], "target_ids": [2]}]},
                                                     "examples[0].example"),
                        ({"dtype": "int8", "examples": [{"example": 0, "prompt_ids": [1], "target_ids": [2]}]},
                         "dtype")]:
        status, _, answer = call(svc, "POST", "/context", body)
        assert status == 400 and field in json.loads(answer)["error"], (body, answer)
    status, _, answer = call(svc, "POST", "/sessions", {"prompts": [[3, True]]})
    assert status == 400 and "prompts[0]" in json.loads(answer)["error"]


def test_session_ttl_and_cap(model, tmp_path):
    svc = service(model, tmp_path, max_sessions=1, session_ttl_s=0.3)
    status, _, body = call(svc, "POST", "/sessions", {"prompts": [[3, 4, 5]]})
    sid = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])["__metadata__"]["session"]
    assert status == 200 and call(svc, "POST", "/sessions", {"prompts": [[3]]})[0] == 429  # the cap
    assert call(svc, "POST", f"/sessions/{sid}/step", {"tokens": [7, 8]})[0] == 400  # one id per row
    time.sleep(0.5)
    assert call(svc, "POST", f"/sessions/{sid}/step", {"tokens": [7]})[0] == 404  # idle past the TTL: dropped
    assert call(svc, "POST", "/sessions", {"prompts": [[3]]})[0] == 200  # and its slot is free again


def test_audit_lines_match_the_requests_and_hold_no_ids(model, tmp_path):
    svc = service(model, tmp_path)
    exs = examples(2)
    call(svc, "POST", "/context", as_body(exs))
    call(svc, "GET", "/head", headers={"Authorization": "Bearer other"})
    call(svc, "GET", "/health", headers={})
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(x["tenant"], x["endpoint"], x["status"]) for x in lines] == [
        ("acme", "POST /context", 200), ("beta", "GET /head", 200), (None, "GET /health", 401)]
    ctx = lines[0]
    rows = sum(len(e.target_ids) for e in exs)
    assert ctx["rows"] == 2 and ctx["tokens_in"] == 2 * max(e.input_length for e in exs)  # padded cells
    assert ctx["out"]["keys"] == rows and "distributions" not in ctx["out"] and ctx["out"]["bytes"] > rows * 64 * 4
    assert len(ctx["ids_sha256"]) == 64 and ctx["latency_ms"] >= 0
    text = (tmp_path / "audit.jsonl").read_text()
    assert str(list(exs[0].prompt_ids))[1:-1] not in text  # the ids themselves never reach the log


def test_head_endpoint_serves_the_bundle(model, tmp_path):
    svc = service(model, tmp_path)
    status, _, body = call(svc, "GET", "/head")
    meta = json.loads(json.loads(body[8:8 + int.from_bytes(body[:8], "little")])["__metadata__"]["head.json"])
    assert status == 200 and meta["model_id"] == "tiny" and meta["d"] == 64
    served, on_disk = load_numpy(body), load_numpy((tmp_path / "head" / "head.safetensors").read_bytes())
    assert served.keys() == on_disk.keys()
    for name in on_disk:
        np.testing.assert_array_equal(served[name], on_disk[name])


def test_tokens_from_file_or_environment(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    t1, t2 = "t1-" + "a" * 16, "t2-" + "b" * 16
    path.write_text(json.dumps({"acme": t1, "beta": t2}))
    assert load_tokens(path) == {t1: "acme", t2: "beta"}
    monkeypatch.setenv("PEMA_OWNER_TOKENS", f"acme:{t1}, beta:{t2}")
    assert load_tokens() == {t1: "acme", t2: "beta"}
    for bad, named in [({"acme": "x"}, "not a usable secret"), ({"acme": " " * 20}, "not a usable secret"),
                       ({"acme": "a b" * 10}, "not a usable secret"), ({"acme": t1, "beta": t1}, "share one token")]:
        path.write_text(json.dumps(bad))  # before: accepted, and a shared token silently merged the two tenants
        with pytest.raises(ValueError, match=named):
            load_tokens(path)
    monkeypatch.setenv("PEMA_OWNER_TOKENS", "acme")
    with pytest.raises(ValueError, match="tenant:token"):
        load_tokens()
    monkeypatch.delenv("PEMA_OWNER_TOKENS")
    with pytest.raises(ValueError, match="no access tokens"):
        load_tokens()


class InProcessClient:
    """OwnerClient's session calls, answered by OwnerService.handle directly (no HTTP)."""

    def __init__(self, svc):
        self.svc = svc

    def _post(self, path, body):
        from pema.errors import OwnerRequestError

        status, _, raw = call(self.svc, "POST", path, body)
        if status != 200:
            raise OwnerRequestError(raw.decode(), status=status)
        meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
        return load_numpy(raw), meta

    def open_session(self, prompts, dtype="float32"):
        out, meta = self._post("/sessions", {"prompts": prompts, "dtype": dtype})
        return meta["session"], out["key"]

    def step(self, session, tokens, rows=None):
        out, _ = self._post(f"/sessions/{session}/step", {"tokens": tokens, **({"rows": rows} if rows else {})})
        return out["key"]

    def output_head(self):
        from pema.adapter.io import load_head

        return load_head(self.svc.head_dir)[0]

    def close(self, session):
        from pema.errors import OwnerRequestError

        status, _, raw = call(self.svc, "DELETE", f"/sessions/{session}")
        if status != 200:
            raise OwnerRequestError(raw.decode(), status=status)


class LosingClient(InProcessClient):
    """Drops the open session on the service before every ``every``-th step, as a replica scaled down would."""

    def __init__(self, svc, every=3):
        super().__init__(svc)
        self.every, self.steps = every, 0

    def step(self, session, tokens, rows=None):
        self.steps += 1
        if self.steps % self.every == 0:
            self.svc.sessions.pop(session)
        return super().step(session, tokens, rows)


@pytest.mark.parametrize("kind", ["zero_shot", "pema_gu", "pema_capped"])
def test_remote_decoding_chooses_the_in_process_tokens(model, tmp_path, kind):
    """generate_remote on the session steps against generate() on the PLM: the same mixing processors, the same
    greedy tokens, the same lambda traces."""
    from pema.adapter.io import load_head
    from pema.adapter.model import PemaAdapter
    from pema.adapter.remote_decode import generate_remote
    from pema.adapter.schedule import Schedule
    from pema.owner.respond import ContextTap

    svc = service(model, tmp_path)
    head, _ = load_head(tmp_path / "head")
    torch.manual_seed(0)
    adapter = PemaAdapter(64, 16, 16.0, 0.0)
    with torch.no_grad():
        adapter.B_pd.normal_(0, 0.5)  # a visible effect on the mixture
    prompts = [list(e.prompt_ids) for e in examples(5, seed=2)]
    settings = GenerationSettings(max_new_tokens=7, batch_size=3)
    kw = {}
    if kind != "zero_shot":
        kw = dict(adapter=adapter.eval(), head=head, schedule=Schedule("gu_quadratic", lam_max=0.9, floor=0.0),
                  horizons=torch.full((5,), 4.0))
    if kind == "pema_capped":
        kw["length_caps"] = torch.tensor([2, 3, 4, 5, 6])
    local = generate(model, prompts, stop_token_id=STOP, pad_token_id=PAD, settings=settings, progress=False,
                     **({**kw, "key_source": ContextTap(model)} if kw else {}))
    remote = generate_remote(InProcessClient(svc), prompts, stop_token_id=STOP, pad_token_id=PAD, settings=settings,
                             progress=False, **kw)
    assert remote.token_ids == local.token_ids and remote.generated_tokens == local.generated_tokens
    for a, b in zip(remote.lam_traces, local.lam_traces):
        assert a == pytest.approx(b)
    assert not svc.sessions  # every session closed
    losing = LosingClient(svc)
    lost = generate_remote(losing, prompts, stop_token_id=STOP, pad_token_id=PAD, settings=settings, progress=False,
                           **kw)
    assert losing.reopened >= 2 and lost.token_ids == local.token_ids  # reopened on prompt + tokens: same tokens
    for a, b in zip(lost.lam_traces, local.lam_traces):
        assert a == pytest.approx(b)
    assert not svc.sessions
    with pytest.raises(ValueError, match="greedy"):
        generate_remote(InProcessClient(svc), prompts, stop_token_id=STOP, pad_token_id=PAD, progress=False,
                        settings=GenerationSettings(strategy="beam"))


def test_tokenizer_endpoint_rebuilds_the_same_tokenization(model, tmp_path, smollm2_tokenizer):
    import base64

    from transformers import AutoTokenizer

    from pema.formats.tasks import tokenizer_hash

    export_head(model, tmp_path / "head", model_id="tiny")
    svc = OwnerService(model, tmp_path / "head", {"s3cret": "acme"}, tokenizer=smollm2_tokenizer)
    status, ctype, body = call(svc, "GET", "/tokenizer")
    assert (status, ctype) == (200, "application/json")
    for name, data in json.loads(body).items():
        (tmp_path / "tok").mkdir(exist_ok=True)
        (tmp_path / "tok" / name).write_bytes(base64.b64decode(data))
    rebuilt = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer_hash(rebuilt) == tokenizer_hash(smollm2_tokenizer)
    text = "The hotel is close to the station."
    assert rebuilt(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert call(service(model, tmp_path / "other"), "GET", "/tokenizer")[0] == 404  # started without one


def session_of(body: bytes) -> str:
    return json.loads(body[8:8 + int.from_bytes(body[:8], "little")])["__metadata__"]["session"]


def test_a_session_belongs_to_the_tenant_that_opened_it(model, tmp_path):
    """Tenant B can neither step nor close tenant A's session (before: 200 both, and A's next answer changed); B
    gets the 404 of an unknown id, the attempt is audited, and A's session answers as if B had never asked."""
    svc, other = service(model, tmp_path), {"Authorization": "Bearer other"}
    sid = session_of(call(svc, "POST", "/sessions", {"prompts": [[3, 4, 5]]})[2])
    twin = OwnerService(model, tmp_path / "head", {"s3cret": "acme"}, pad_id=PAD)  # the same steps, never touched
    twin_sid = session_of(call(twin, "POST", "/sessions", {"prompts": [[3, 4, 5]]})[2])
    for method, path, body in (("POST", f"/sessions/{sid}/step", {"tokens": [9]}), ("DELETE", f"/sessions/{sid}", None)):
        status, _, answer = call(svc, method, path, body, headers=other)
        unknown = call(svc, method, path.replace(sid, "0" * 32), body, headers=other)
        assert status == unknown[0] == 404 and json.loads(answer) == json.loads(unknown[2])  # nothing to probe
        assert sid not in answer.decode()
    mine = load_numpy(call(svc, "POST", f"/sessions/{sid}/step", {"tokens": [7]})[2])
    reference = load_numpy(call(twin, "POST", f"/sessions/{twin_sid}/step", {"tokens": [7]})[2])
    np.testing.assert_array_equal(mine["key"], reference["key"])
    assert call(svc, "DELETE", f"/sessions/{sid}")[0] == 200
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [x for x in lines if x.get("refused")]
    assert [(x["tenant"], x["endpoint"], x["status"]) for x in refused] == [
        ("beta", "POST /sessions/<id>/step", 404), ("beta", "DELETE /sessions/<id>", 404)]
    assert sid not in (tmp_path / "audit.jsonl").read_text()  # ids never reach the log


def test_each_tenant_has_its_own_session_quota(model, tmp_path):
    """B opening sessions up to its quota leaves A its own (before: B's 64 sessions got A refused with 429)."""
    svc = service(model, tmp_path, max_sessions=5, max_sessions_per_tenant=2)
    other = {"Authorization": "Bearer other"}
    assert [call(svc, "POST", "/sessions", {"prompts": [[3]]}, headers=other)[0] for _ in range(3)] == [200, 200, 429]
    assert "this tenant has 2 sessions open" in json.loads(
        call(svc, "POST", "/sessions", {"prompts": [[3]]}, headers=other)[2])["error"]
    assert [call(svc, "POST", "/sessions", {"prompts": [[3]]})[0] for _ in range(2)] == [200, 200]


def test_the_audit_log_takes_no_text_from_the_path(model, tmp_path):
    """An unauthenticated request's path used to be written verbatim: 200 requests added 3 MB in 2 s."""
    svc = service(model, tmp_path)
    path = "/" + "x" * 10_000 + "\n{\"forged\": true}"
    assert call(svc, "GET", path, headers={})[0] == 401 and call(svc, "GET", path)[0] == 404
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["endpoint"] for x in lines] == ["GET <other>", "GET <other>"]
    assert max(len(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()) < 400


def test_malformed_bodies_are_400_and_audited(model, tmp_path):
    """JSON nested 100k deep, dtype a list or a dict, an example id of 2**70: each used to be a bare 500 with no
    audit line."""
    svc = service(model, tmp_path)
    ex = [{"example": 0, "prompt_ids": [3, 4], "target_ids": [5]}]
    for body, named in [(b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
                        ({"dtype": ["float32"], "examples": ex}, "dtype="), ({"dtype": {"a": 1}, "examples": ex}, "dtype="),
                        ({"examples": [{**ex[0], "example": 2 ** 70}]}, "examples[0].example"),
                        ({"examples": [{**ex[0], "example": -1}]}, "examples[0].example")]:
        status, _, answer = call(svc, "POST", "/context", body)
        assert status == 400 and named in json.loads(answer)["error"], answer
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == [400] * 5



def test_label_private_context_sends_no_label_and_answers_the_owners_continuation(model, tmp_path, monkeypatch):
    """``keys: owner_greedy``: the body holds prompts and target lengths only; the keys are the owner's own greedy
    continuation's (FreeRunningEncoder is the reference); the client pairs them with its gold tokens locally."""
    from pema.adapter.remote import OwnerClient
    from pema.owner.encode import FreeRunningEncoder, FreeRunningRequest

    svc, sent = service(model, tmp_path), []

    def direct(self, method, path, body=None, session=None):  # OwnerClient over handle() instead of HTTP
        sent.append(body)
        status, _, raw = call(svc, method, path, body)
        assert status == 200, raw
        return raw

    monkeypatch.setattr(OwnerClient, "_request", direct)
    client, exs = OwnerClient("http://owner.invalid", "s3cret"), examples(4, seed=3)
    rows = client.context(exs, keys="owner_greedy")
    assert all("target_ids" not in e and e["target_length"] == len(x.target_ids)
               for e, x in zip(sent[0]["examples"], exs))  # no label crossed
    reference = FreeRunningEncoder(model, pad_id=PAD)([FreeRunningRequest(e.example, e.prompt_ids, len(e.target_ids))
                                                       for e in exs])
    np.testing.assert_allclose(rows["key"], reference["key"], atol=1e-6)
    np.testing.assert_array_equal(rows["token"], np.concatenate([e.target_ids for e in exs]))  # gold, paired here
    np.testing.assert_array_equal(rows["position"], reference["position"])
    assert client.greedy_agreement == [int((reference["greedy"] == rows["token"]).sum()), len(rows["token"])]
    status, _, answer = call(svc, "POST", "/context", {"keys": "owner_greedy", "examples": [
        {"example": 0, "prompt_ids": [3, 4], "target_length": 0}]})
    assert status == 400 and "examples[0].target_length" in json.loads(answer)["error"]
