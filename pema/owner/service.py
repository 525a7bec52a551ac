"""The PLM owner's service, framework-free: requests in, responses out, the owner's weights never leave.

What crosses (PEMA's boundary; every answer carries the fingerprint of the owner's head bundle, so a client can
refuse a mismatch):

- ``POST /context``: JSON ``{"examples": [{"example": i, "prompt_ids": [...], "target_ids": [...]}, ...]}`` ->
  the keys at the target positions (the memory's key definition, :mod:`pema.formats.keys`) as safetensors:
  ``key`` (n, d) float16 or float32 (``"dtype"``), ``token``, ``example``, ``position`` (n,).
- ``POST /sessions``: ``{"prompts": [[ids], ...]}`` opens a decoding session (the owner keeps its KV cache) and
  answers the first step; ``POST /sessions/<id>/step``: ``{"tokens": [t, ...]}`` (one per row) -> per row the key
  of the new context and the PLM's next-token log-probabilities, safetensors ``key`` (rows, d) and ``log_probs``
  (rows, vocab), float32; ``DELETE /sessions/<id>`` closes it. Sessions idle for ``session_ttl_s`` are dropped;
  at most ``max_sessions`` are open, at most ``max_sessions_per_tenant`` of one tenant (429 beyond). A session
  belongs to the tenant that opened it: any other tenant's step or close gets the same 404 as an unknown id, and
  the attempt is audited (``refused``). Session ids never reach the audit log or an error message.
- ``GET /head``: the output-head bundle (head.safetensors, with head.json as its metadata); ``GET /tokenizer``: the
  tokenizer's files (JSON ``{name: base64}``: vocabulary, merges, chat template; no weights); ``GET /health``.

Access: ``Authorization: Bearer <token>``, tokens per tenant from a JSON file ``{"tenant": "token"}`` or the
environment (``PEMA_OWNER_TOKENS="tenant:token,..."``); a missing or wrong token gets 401. Over the size limits:
413; an unknown session: 404; a malformed body: 400 naming the field. One JSONL audit line per request: time,
tenant, endpoint, status, rows, tokens in, what went out (keys, distributions, bytes), the sha256 of the token ids
and the latency. Never the text, never the ids themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as save_numpy

# load_tokens is named here too: the owner's jobs and tests import it from this module
from pema.formats.access import RequestError, bearer_tenant, json_object, load_tokens  # noqa: F401
from pema.owner.encode import EncodeExample, MemoryEncoder
from pema.owner.plm import head_modules


@dataclass(frozen=True)
class Limits:
    max_rows: int = 256  # rows (examples or decoding rows) per request
    max_tokens: int = 262_144  # token ids per request
    max_body_bytes: int = 16 << 20
    max_sessions: int = 64
    max_sessions_per_tenant: int = 16  # each tenant's own quota, below the global cap: one cannot take every slot
    session_ttl_s: float = 300.0


def _ids(body: dict, field: str, where: str, vocab: int) -> list[int]:
    value = body.get(field)
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value):
        raise RequestError(400, f"{where}{field} must be a non-empty list of integer token ids")
    if min(value) < 0 or max(value) >= vocab:
        raise RequestError(400, f"{where}{field} holds ids outside [0, {vocab})")
    return value


def _tokenizer_files(tokenizer) -> bytes:
    import base64
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return json.dumps(files).encode()


class _Session:
    def __init__(self, past, mask: torch.Tensor, rows: int, tenant: str):
        self.past, self.mask, self.rows, self.used = past, mask, rows, time.monotonic()
        self.tenant = tenant  # the tenant that opened it: the only one that may step or close it


ROUTES = ("/health", "/tokenizer", "/head", "/context", "/sessions", "/sessions/<id>", "/sessions/<id>/step")


def _redacted(path: str) -> str:
    """``path`` as the audit log keeps it: a session id (the handle on its KV cache) replaced by ``<id>``, and any
    path that is not one of :data:`ROUTES` by ``<other>`` (a caller, authenticated or not, cannot write text of
    its choosing into the log, nor grow it by more than a line of bounded size per request)."""
    parts = path.rstrip("/").strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "sessions":
        parts[1] = "<id>"
    shown = "/" + "/".join(parts)
    return shown if shown in ROUTES else "<other>"


class OwnerService:
    """The owner's side of every request (see the module docstring). ``handle(method, path, headers, body)`` ->
    ``(status, content_type, body_bytes)``; one lock serialises the model's forwards."""

    def __init__(self, model, head_dir: str | os.PathLike, tokens: dict[str, str], *, audit_path=None,
                 limits: Limits = Limits(), pad_id: int = 0, tokenizer=None, session_prefix: str = ""):
        self.model, self.limits, self.tokens, self.pad_id = model.eval(), limits, tokens, pad_id
        self.session_prefix = session_prefix  # names the replica that holds a session's KV cache (Serve's router)
        self.heads = head_modules(model)
        self.vocab = int(self.heads.lm_head.weight.shape[0])
        self.device = next(model.parameters()).device
        head_dir = Path(head_dir)
        self.head_meta = json.loads((head_dir / "head.json").read_text())
        self.head_bytes = (head_dir / "head.safetensors").read_bytes()
        self.fingerprint = hashlib.sha256(self.head_bytes).hexdigest()
        self.encoders = {dt: MemoryEncoder(model, pad_id=pad_id, key_dtype=dt) for dt in ("float16", "float32")}
        self.audit_path = Path(audit_path) if audit_path else None
        self.sessions: dict[str, _Session] = {}
        self.tokenizer_files = _tokenizer_files(tokenizer) if tokenizer is not None else None
        self.lock = threading.Lock()

    # ---- the dispatcher -------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        start, tenant, record = time.perf_counter(), None, {"rows": 0, "tokens_in": 0, "ids_sha256": None}
        try:
            tenant = bearer_tenant(headers, self.tokens)
            if len(body) > self.limits.max_body_bytes:
                raise RequestError(413, f"body of {len(body)} bytes is over the limit of "
                                        f"{self.limits.max_body_bytes}")
            status, ctype, out, sent = self._route(method, path.rstrip("/") or "/", body, record, tenant)
        except RequestError as exc:
            status, ctype, out, sent = exc.status, "application/json", json.dumps({"error": str(exc)}).encode(), {}
        self._audit(tenant, method, _redacted(path), status, record, sent, len(out), time.perf_counter() - start)
        return status, ctype, out

    def _route(self, method, path, body, record, tenant):
        if method == "GET" and path == "/health":
            return 200, "application/json", json.dumps({"status": "ok", "model_id": self.head_meta["model_id"],
                                                        "head_fingerprint": self.fingerprint,
                                                        "open_sessions": len(self.sessions)}).encode(), {}
        if method == "GET" and path == "/tokenizer":
            if self.tokenizer_files is None:
                raise RequestError(404, "this service was started without its tokenizer")
            return 200, "application/json", self.tokenizer_files, {"tokenizer": 1}
        if method == "GET" and path == "/head":
            return 200, "application/octet-stream", self._head_file(), {"head": 1}
        if method == "POST" and path == "/context":
            return self._context(self._json(body), record)
        if method == "POST" and path == "/sessions":
            return self._open(self._json(body), record, tenant)
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "sessions" and parts[2] == "step" and method == "POST":
            return self._step(parts[1], self._json(body), record, tenant)
        if len(parts) == 2 and parts[0] == "sessions" and method == "DELETE":
            self._session(parts[1], tenant, record)
            del self.sessions[parts[1]]
            return 200, "application/json", b'{"closed": true}', {}
        raise RequestError(404, f"no endpoint {method} {path}")

    _json = staticmethod(json_object)

    def _head_file(self) -> bytes:
        from safetensors.torch import load as load_torch

        tensors = {k: v.numpy() for k, v in load_torch(self.head_bytes).items()}
        return save_numpy(tensors, metadata={"head.json": json.dumps(self.head_meta),
                                             "head_fingerprint": self.fingerprint})

    def _answer(self, tensors: dict[str, np.ndarray], **meta) -> bytes:
        return save_numpy(tensors, metadata={"head_fingerprint": self.fingerprint, **{k: str(v) for k, v in meta.items()}})

    def _check_size(self, rows: int, tokens: int, record: dict, ids: list[list[int]]) -> None:
        record.update(rows=rows, tokens_in=tokens,
                      ids_sha256=hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest())
        if rows > self.limits.max_rows or tokens > self.limits.max_tokens:
            raise RequestError(413, f"{rows} rows / {tokens} token ids are over the limits of "
                                    f"{self.limits.max_rows} rows / {self.limits.max_tokens} ids per request")

    # ---- context: teacher-forced keys -------------------------------------------------------------------------
    def _context(self, body: dict, record: dict):
        examples = body.get("examples")
        if not isinstance(examples, list) or not examples:
            raise RequestError(400, "examples must be a non-empty list of {example, prompt_ids, target_ids}")
        dtype = body.get("dtype", "float32")
        if not isinstance(dtype, str) or dtype not in self.encoders:
            raise RequestError(400, f"dtype={dtype!r} must be 'float16' or 'float32'")
        parsed = []
        for i, e in enumerate(examples):
            if not isinstance(e, dict) or not isinstance(e.get("example"), int) or isinstance(e.get("example"), bool) \
                    or not 0 <= e["example"] < 2 ** 63:
                raise RequestError(400, f"examples[{i}].example must be an integer in [0, 2**63)")
            parsed.append(EncodeExample(e["example"], tuple(_ids(e, "prompt_ids", f"examples[{i}].", self.vocab)),
                                        tuple(_ids(e, "target_ids", f"examples[{i}].", self.vocab))))
        self._check_size(len(parsed), sum(len(e.prompt_ids) + len(e.target_ids) for e in parsed), record,
                         [[e.prompt_ids, e.target_ids] for e in parsed])
        with self.lock:
            rows = self.encoders[dtype](parsed)
        rows = {k: np.ascontiguousarray(v) for k, v in rows.items()}
        out = self._answer(rows, d=rows["key"].shape[1], vocab_size=self.vocab)
        return 200, "application/octet-stream", out, {"keys": len(rows["key"]), "distributions": 0}

    # ---- decoding sessions ------------------------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.used > self.limits.session_ttl_s]:
            del self.sessions[sid]

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, past):
        from pema.owner.respond import ContextTap

        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]  # as generate() sets them: padding skipped
        with ContextTap(self.model) as tap:
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=past, position_ids=positions,
                             use_cache=True)
            key = tap.last_key()
        log_probs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        return out.past_key_values, key.float().cpu().numpy(), log_probs.cpu().numpy()

    def _session(self, sid: str, tenant: str, record: dict) -> _Session:
        """The open session ``sid`` of ``tenant``. Another tenant's session answers exactly as one that does not
        exist (404, the id not echoed), so ids cannot be probed; the attempt is marked in the audit line."""
        self._expire()
        session = self.sessions.get(sid)
        if session is not None and session.tenant != tenant:
            record["refused"] = "a session of another tenant"
            session = None
        if session is None:
            raise RequestError(404, f"unknown session (closed, expired after {self.limits.session_ttl_s:g} s idle, "
                                    "or never opened by this tenant)")
        return session

    def _open(self, body: dict, record: dict, tenant: str):
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(400, "prompts must be a non-empty list of token-id lists")
        prompts = [_ids({"prompt": p}, "prompt", f"prompts[{i}].", self.vocab) for i, p in enumerate(prompts)]
        self._check_size(len(prompts), sum(map(len, prompts)), record, prompts)
        self._expire()
        if (mine := sum(v.tenant == tenant for v in self.sessions.values())) >= self.limits.max_sessions_per_tenant:
            raise RequestError(429, f"this tenant has {mine} sessions open, its quota; close one (DELETE "
                                    "/sessions/<id>) or wait for idle ones to expire")
        if len(self.sessions) >= self.limits.max_sessions:
            raise RequestError(429, f"{len(self.sessions)} sessions are open, the most this service keeps; close "
                                    "one (DELETE /sessions/<id>) or wait for idle ones to expire")
        width = max(map(len, prompts))  # left-padded, as generate() pads decoder-only prompts
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
        with self.lock:
            past, key, log_probs = self._forward(ids.to(self.device), mask.to(self.device), None)
        sid = self.session_prefix + uuid.uuid4().hex
        self.sessions[sid] = _Session(past, mask.to(self.device), len(prompts), tenant)
        out = self._answer({"key": key, "log_probs": log_probs}, session=sid)
        return 200, "application/octet-stream", out, {"keys": len(key), "distributions": len(log_probs)}

    def _step(self, sid: str, body: dict, record: dict, tenant: str):
        session = self._session(sid, tenant, record)
        tokens = _ids(body, "tokens", "", self.vocab)
        if len(tokens) != session.rows:
            raise RequestError(400, f"tokens must hold one id per row: {session.rows} expected, got {len(tokens)}")
        self._check_size(len(tokens), len(tokens), record, tokens)
        mask = torch.cat([session.mask, torch.ones((session.rows, 1), dtype=torch.long, device=self.device)], 1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        with self.lock:
            past, key, log_probs = self._forward(ids, mask, session.past)
        session.past, session.mask, session.used = past, mask, time.monotonic()
        out = self._answer({"key": key, "log_probs": log_probs}, session=sid)
        return 200, "application/octet-stream", out, {"keys": len(key), "distributions": len(log_probs)}

    # ---- audit ------------------------------------------------------------------------------------------------
    def _audit(self, tenant, method, path, status, record, sent, nbytes, seconds) -> None:
        if self.audit_path is None:
            return
        line = {"time": time.time(), "tenant": tenant, "endpoint": f"{method} {path}", "status": status,
                "rows": record["rows"], "tokens_in": record["tokens_in"], "ids_sha256": record["ids_sha256"],
                "out": {"keys": sent.get("keys", 0), "distributions": sent.get("distributions", 0),
                        "head": sent.get("head", 0), "bytes": nbytes}, "latency_ms": round(seconds * 1000, 2)}
        if record.get("refused"):
            line["refused"] = record["refused"]
        with self.lock, open(self.audit_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
