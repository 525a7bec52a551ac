"""The PLM owner's service, framework-free: requests in, responses out, the owner's weights never leave.

What crosses (PEMA's boundary; every answer carries the fingerprint of the owner's head bundle, so a client can
refuse a mismatch). Keys, never distributions: the data owner holds the exact output head (``GET /head``) and
computes the PLM's next-token distribution from a key itself, so nothing the service answers needs logits.

- ``POST /context``: JSON ``{"examples": [{"example": i, "prompt_ids": [...], "target_ids": [...]}, ...]}`` ->
  the keys at the target positions (the memory's key definition, :mod:`pema.formats.keys`) as safetensors:
  ``key`` (n, d) float16 or float32 (``"dtype"``), ``token``, ``example``, ``position`` (n,). With
  ``"keys": "owner_greedy"`` (the label-private build) an example carries ``target_length`` instead of
  ``target_ids``: the owner decodes its own greedy continuation of the prompt for that many tokens and answers
  the key of each step (``key``, ``example``, ``position`` and its own choice ``greedy``); no label reaches it.
- ``POST /sessions``: ``{"prompts": [[ids], ...], "dtype": "float32"}`` opens a decoding session (the owner keeps
  its KV cache) and answers the key of each prompt's last position, safetensors ``key`` (rows, d) in ``dtype``
  (float32 by default; float16 halves the bytes). ``POST /sessions/<id>/step``: ``{"tokens": [t, ...]}``, one per
  row, -> the key of each row's new context; ``"rows": [i, ...]`` (increasing indices into the session's current
  rows) keeps only those rows from this step on, so rows that stopped cost nothing more; ``tokens`` then holds
  one id per kept row. ``DELETE /sessions/<id>`` closes it. Concurrent sessions' steps share one forward
  (:mod:`pema.owner.sessions`).
- ``GET /head``: the output-head bundle (head.safetensors, with head.json as its metadata); ``GET /tokenizer``: the
  tokenizer's files (JSON ``{name: base64}``: vocabulary, merges, chat template; no weights); ``GET /health``.

Tenants. Access: ``Authorization: Bearer <token>``, tokens per tenant from a JSON file ``{"tenant": "token"}`` or
the environment (``PEMA_OWNER_TOKENS="tenant:token,..."``); a missing or wrong token gets 401, before the body is
read (:mod:`pema.executors.ray_serve`). A session belongs to the tenant that opened it: any other tenant's step or
close gets the same 404 as an unknown id, and the attempt is audited (``refused``); session ids never reach the
audit log or an error message. Each tenant has its own quota of sessions and of KV cache and its own request rate
(429 beyond, with Retry-After), all below the service's caps.

Bounds (:class:`Limits`, sized to the host when not given): a request's padded cells (rows x its longest row),
rows and body bytes; the KV cache of all open sessions; a session's length (the model's context window).
Over them: 413 or 429. A malformed body: 400 naming the field. One JSONL audit line per request, refused and
malformed ones included: time, tenant, endpoint (one of :data:`ROUTES`), status, rows, tokens in, what went out
(keys, bytes), the sha256 of the token ids and the latency; never a path as sent, never text or ids. If the audit
line cannot be written the answer is 503 naming the log, and a session the request opened or stepped is closed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as save_numpy

# load_tokens is named here too: the owner's jobs and tests import it from this module
from pema.errors import ConfigError
from pema.formats.access import RateLimiter, RequestError, bearer_tenant, json_object, load_tokens  # noqa: F401
from pema.formats.tasks import context_window
from pema.owner.encode import EncodeExample, FreeRunningEncoder, FreeRunningRequest, MemoryEncoder
from pema.owner.export import tokenizer_files
from pema.owner.plm import head_modules
from pema.owner.sessions import COST_FACTOR, Session, SessionDecoder, Step, kv_bytes_per_token

DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Limits:
    """What one request and all open sessions may cost. ``max_tokens`` (padded cells: rows x the longest row of a
    request) and ``kv_budget_bytes`` (the KV caches of all open sessions) are None by default: :meth:`sized` sets
    them from the host's memory (the GPU's when the model is on one)."""

    max_rows: int = 256  # rows (examples or decoding rows) per request
    max_tokens: int | None = None  # padded cells per request; None: a sixteenth of the host's memory
    max_body_bytes: int = 16 << 20
    max_sessions: int = 64
    max_sessions_per_tenant: int = 16  # each tenant's own quota, below the global cap: one cannot take every slot
    kv_budget_bytes: int | None = None  # all open sessions' KV caches; None: a quarter of the host's memory
    session_ttl_s: float = 300.0
    max_batch_rows: int = 256  # rows of concurrent sessions' steps in one forward
    tenant_requests_per_s: float = 100.0  # each tenant's request rate (a token bucket of tenant_burst)
    tenant_burst: int = 200

    def sized(self, model) -> "Limits":
        """These limits with the None ones sized to ``model``'s host."""
        host = _host_bytes(model)
        cell = COST_FACTOR * kv_bytes_per_token(model)
        return replace(self, max_tokens=self.max_tokens or max(1, int(host / 16 / cell)),
                       kv_budget_bytes=self.kv_budget_bytes or host // 4)


def _host_bytes(model) -> int:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ids(body: dict, field: str, where: str, vocab: int) -> list[int]:
    value = body.get(field)
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value):
        raise RequestError(400, f"{where}{field} must be a non-empty list of integer token ids")
    if min(value) < 0 or max(value) >= vocab:
        raise RequestError(400, f"{where}{field} holds ids outside [0, {vocab})")
    return value


def _count(body: dict, field: str, where: str, low: int, high: int) -> int:
    value = body.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise RequestError(400, f"{where}{field} must be an integer in [{low}, {high})")
    return value


def _dtype(body: dict) -> str:
    dtype = body.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise RequestError(400, f"dtype={dtype!r} must be 'float16' or 'float32'")
    return dtype


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
    ``(status, content_type, body_bytes)``, safe to call from many threads at once: one lock serialises the
    model's forwards, and concurrent sessions' steps share them (:class:`~pema.owner.sessions.SessionDecoder`)."""

    def __init__(self, model, head_dir: str | os.PathLike, tokens: dict[str, str], *, audit_path=None,
                 limits: Limits = Limits(), pad_id: int = 0, tokenizer=None, session_prefix: str = ""):
        self.model, self.tokens, self.pad_id = model.eval(), tokens, pad_id
        self.limits = limits.sized(model)
        self.session_prefix = session_prefix  # names the replica that holds a session's KV cache (Serve's router)
        self.heads = head_modules(model)
        self.vocab = int(self.heads.lm_head.weight.shape[0])
        self.kv_per_token = kv_bytes_per_token(model)
        self.window = context_window(model)
        self.head_dir = head_dir = Path(head_dir)
        self.head_meta = json.loads((head_dir / "head.json").read_text())
        self.head_bytes = (head_dir / "head.safetensors").read_bytes()
        self.fingerprint = hashlib.sha256(self.head_bytes).hexdigest()
        self.decoder = SessionDecoder(model, pad_id, max_batch_rows=self.limits.max_batch_rows)
        self.lock = self.decoder.lock  # the model's
        self.encoders = {(mode, dt): encoder(model, pad_id=pad_id, key_dtype=dt) for dt in DTYPES
                         for mode, encoder in (("teacher_forced", MemoryEncoder), ("owner_greedy", FreeRunningEncoder))}
        self.audit_path = Path(audit_path) if audit_path else None
        if self.audit_path is not None:
            try:
                with open(self.audit_path, "a", encoding="utf-8"):
                    pass
            except OSError as exc:
                raise ConfigError(f"the audit log {self.audit_path} cannot be written ({exc.strerror}); the "
                                  "service answers nothing it cannot audit: give a writable audit path") from None
        self._audit_lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        self._state = threading.Lock()  # the sessions table: quotas are checked and taken under it
        self.rate = RateLimiter(self.limits.tenant_requests_per_s, self.limits.tenant_burst)
        self.tokenizer_files = tokenizer_files(tokenizer) if tokenizer is not None else None

    # ---- the dispatcher -------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        return self.respond(method, path, headers, body)[:3]

    def respond(self, method: str, path: str, headers: dict[str, str],
                body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """:meth:`handle`'s answer and the headers to send with it (``Retry-After`` on a rate refusal)."""
        start, tenant, record = time.perf_counter(), None, {"rows": 0, "tokens_in": 0, "ids_sha256": None}
        extra: dict[str, str] = {}
        try:
            tenant = bearer_tenant(headers, self.tokens)
            if (wait := self.rate.take(tenant)) is not None:
                extra["Retry-After"] = str(max(1, round(wait)))
                raise RequestError(429, f"this tenant is over its rate of {self.limits.tenant_requests_per_s:g} "
                                        f"requests/s; retry in {wait:.2f} s")
            if len(body) > self.limits.max_body_bytes:
                raise RequestError(413, f"body of {len(body)} bytes is over the limit of "
                                        f"{self.limits.max_body_bytes}")
            status, ctype, out, sent = self._route(method, path.rstrip("/") or "/", body, record, tenant)
        except RequestError as exc:
            status, ctype, out, sent = exc.status, "application/json", json.dumps({"error": str(exc)}).encode(), {}
        except Exception as exc:  # a fault of the service, not of the request: audited, logged, the session dropped
            traceback.print_exc(file=sys.stderr)
            self._drop(record.get("session"))
            status, ctype, sent = 500, "application/json", {}
            out = json.dumps({"error": f"the owner's service failed on this request ({type(exc).__name__})"}).encode()
        try:
            self._audit(tenant, method, _redacted(path), status, record, sent, len(out), time.perf_counter() - start)
        except OSError as exc:  # nothing goes out that the log does not hold
            self._drop(record.get("session"))
            status, ctype = 503, "application/json"
            out = json.dumps({"error": f"the owner's audit log cannot be written ({exc.strerror}); nothing was "
                                       "answered or kept open"}).encode()
        return status, ctype, out, extra

    def _drop(self, sid: str | None) -> None:
        if sid is not None:
            with self._state:
                if (session := self.sessions.pop(sid, None)) is not None:
                    self.decoder.forget(session)

    def _route(self, method, path, body, record, tenant):
        if method == "GET" and path == "/health":
            return 200, "application/json", json.dumps({
                "status": "ok", "model_id": self.head_meta["model_id"], "head_fingerprint": self.fingerprint,
                "open_sessions": len(self.sessions), "forwards": self.decoder.forwards,
                "steps": self.decoder.stepped}).encode(), {}
        if method == "GET" and path == "/tokenizer":
            if self.tokenizer_files is None:
                raise RequestError(404, "this service was started without its tokenizer")
            return 200, "application/json", self.tokenizer_files, {"tokenizer": 1}
        if method == "GET" and path == "/head":
            return 200, "application/octet-stream", self._head_file(), {"head": 1}
        if method == "POST" and path == "/context":
            return self._context(json_object(body), record)
        if method == "POST" and path == "/sessions":
            return self._open(json_object(body), record, tenant)
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "sessions" and parts[2] == "step" and method == "POST":
            return self._step(parts[1], json_object(body), record, tenant)
        if len(parts) == 2 and parts[0] == "sessions" and method == "DELETE":
            with self._state:
                self.decoder.forget(self._session(parts[1], tenant, record))
                del self.sessions[parts[1]]
            return 200, "application/json", b'{"closed": true}', {}
        raise RequestError(404, "no such endpoint: " + ", ".join(ROUTES))

    def _head_file(self) -> bytes:
        from safetensors.torch import load as load_torch

        tensors = {k: v.numpy() for k, v in load_torch(self.head_bytes).items()}
        return save_numpy(tensors, metadata={"head.json": json.dumps(self.head_meta),
                                             "head_fingerprint": self.fingerprint})

    def _answer(self, tensors: dict[str, np.ndarray], **meta) -> bytes:
        return save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                          metadata={"head_fingerprint": self.fingerprint, **{k: str(v) for k, v in meta.items()}})

    def _check_size(self, rows: int, cells: int, record: dict, ids) -> None:
        """``cells``: the padded tokens the request's forward holds (rows x its longest row)."""
        record.update(rows=rows, tokens_in=cells,
                      ids_sha256=hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest())
        if rows > self.limits.max_rows or cells > self.limits.max_tokens:
            raise RequestError(413, f"{rows} rows / {cells} padded tokens (rows x the longest row) are over the "
                                    f"limits of {self.limits.max_rows} rows / {self.limits.max_tokens} padded tokens "
                                    "per request; send fewer or shorter rows per request")

    # ---- context: the keys of a memory ------------------------------------------------------------------------
    def _context(self, body: dict, record: dict):
        examples = body.get("examples")
        if not isinstance(examples, list) or not examples:
            raise RequestError(400, "examples must be a non-empty list of {example, prompt_ids, target_ids}")
        dtype, mode = _dtype(body), body.get("keys", "teacher_forced")
        if mode not in ("teacher_forced", "owner_greedy"):
            raise RequestError(400, f"keys={mode!r} must be 'teacher_forced' or 'owner_greedy'")
        parsed = []
        for i, e in enumerate(examples):
            where = f"examples[{i}]."
            if not isinstance(e, dict):
                raise RequestError(400, f"examples[{i}] must be an object")
            example = _count(e, "example", where, 0, 2 ** 63)
            prompt = tuple(_ids(e, "prompt_ids", where, self.vocab))
            parsed.append(EncodeExample(example, prompt, tuple(_ids(e, "target_ids", where, self.vocab)))
                          if mode == "teacher_forced" else
                          FreeRunningRequest(example, prompt,
                                             _count(e, "target_length", where, 1, (self.window or 2 ** 31) + 1)))
        self._check_size(len(parsed), len(parsed) * max(p.input_length for p in parsed), record, examples)
        encoder = self.encoders[mode, dtype]
        try:
            with self.lock:
                rows = encoder(parsed)
        except ValueError as exc:  # OverlengthError: a sequence over the model's context window
            raise RequestError(413, str(exc)) from None
        out = self._answer(rows, d=rows["key"].shape[1], vocab_size=self.vocab, keys=mode)
        return 200, "application/octet-stream", out, {"keys": len(rows["key"])}

    # ---- decoding sessions ------------------------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if not v.busy and now - v.used > self.limits.session_ttl_s]:
            del self.sessions[sid]

    def _session(self, sid: str, tenant: str, record: dict) -> Session:
        """The open session ``sid`` of ``tenant`` (call under ``_state``). Another tenant's session answers exactly
        as one that does not exist (404, the id not echoed), so ids cannot be probed; the attempt is audited."""
        self._expire()
        session = self.sessions.get(sid)
        if session is not None and session.tenant != tenant:
            record["refused"] = "a session of another tenant"
            session = None
        if session is None:
            raise RequestError(404, f"unknown session (closed, expired after {self.limits.session_ttl_s:g} s idle, "
                                    "or never opened by this tenant)")
        return session

    def _kv_room(self, tenant: str, adding: int) -> None:
        """429 unless ``adding`` bytes of KV cache fit the service's budget and this tenant's share of it (its
        session quota's share). Call under ``_state``."""
        total = sum(s.kv_bytes(self.kv_per_token) for s in self.sessions.values())
        mine = sum(s.kv_bytes(self.kv_per_token) for s in self.sessions.values() if s.tenant == tenant)
        share = self.limits.kv_budget_bytes * self.limits.max_sessions_per_tenant // self.limits.max_sessions
        if mine + adding > share or total + adding > self.limits.kv_budget_bytes:
            raise RequestError(429, f"the decoding state is full: this tenant's sessions hold {mine / 2**20:.1f} MiB "
                                    f"of KV cache (its share {share / 2**20:.1f} MiB), all sessions "
                                    f"{total / 2**20:.1f} MiB (the budget {self.limits.kv_budget_bytes / 2**20:.1f} "
                                    "MiB); close sessions or send fewer rows")

    def _open(self, body: dict, record: dict, tenant: str):
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(400, "prompts must be a non-empty list of token-id lists")
        dtype = _dtype(body)
        prompts = [_ids({"prompt": p}, "prompt", f"prompts[{i}].", self.vocab) for i, p in enumerate(prompts)]
        width = max(map(len, prompts))
        self._check_size(len(prompts), len(prompts) * width, record, prompts)
        if self.window is not None and width >= self.window:
            raise RequestError(413, f"a prompt of {width} tokens leaves no room in the model's context window of "
                                    f"{self.window}")
        sid = self.session_prefix + uuid.uuid4().hex
        with self._state:  # the slot is taken before the forward, so concurrent opens cannot pass the quota
            self._expire()
            if (mine := sum(v.tenant == tenant for v in self.sessions.values())) >= \
                    self.limits.max_sessions_per_tenant:
                raise RequestError(429, f"this tenant has {mine} sessions open, its quota; close one (DELETE "
                                        "/sessions/<id>) or wait for idle ones to expire")
            if len(self.sessions) >= self.limits.max_sessions:
                raise RequestError(429, f"{len(self.sessions)} sessions are open, the most this service keeps; "
                                        "close one (DELETE /sessions/<id>) or wait for idle ones to expire")
            self._kv_room(tenant, len(prompts) * width * self.kv_per_token)
            placeholder = Session(None, torch.zeros((len(prompts), width), dtype=torch.long), tenant, dtype)
            placeholder.busy = True
            self.sessions[sid] = placeholder
        record["session"] = sid  # dropped again if the forward or the audit fails
        past, mask, key = self.decoder.prefill(prompts)
        placeholder.past, placeholder.mask, placeholder.busy = past, mask, False
        placeholder.used = time.monotonic()
        out = self._answer({"key": key.cpu().numpy().astype(dtype)}, session=sid)
        return 200, "application/octet-stream", out, {"keys": len(key)}

    def _step(self, sid: str, body: dict, record: dict, tenant: str):
        with self._state:
            session = self._session(sid, tenant, record)
            if session.busy:
                raise RequestError(409, "a request of this session is still running; send its steps one at a time")
            keep = body.get("rows")
            if keep is not None:
                if not isinstance(keep, list) or not keep or not all(
                        isinstance(r, int) and not isinstance(r, bool) for r in keep) or keep != sorted(set(keep)) \
                        or keep[0] < 0 or keep[-1] >= session.rows:
                    raise RequestError(400, f"rows must be increasing indices into the session's {session.rows} "
                                            "current rows")
            tokens = _ids(body, "tokens", "", self.vocab)
            rows = len(keep) if keep is not None else session.rows
            if len(tokens) != rows:
                raise RequestError(400, f"tokens must hold one id per {'kept ' if keep is not None else ''}row: "
                                        f"{rows} expected, got {len(tokens)}")
            self._check_size(len(tokens), len(tokens), record, tokens)
            if self.window is not None and session.length + 1 > self.window:
                raise RequestError(413, f"the session reached the model's context window of {self.window} tokens")
            self._kv_room(tenant, rows * self.kv_per_token - (session.rows - rows) * session.length
                          * self.kv_per_token)
            session.busy = True
        record["session"] = sid
        try:
            key = self.decoder.step(Step(session, tokens, keep))
        finally:
            session.busy, session.used = False, time.monotonic()
        out = self._answer({"key": key.astype(session.dtype)}, session=sid)
        return 200, "application/octet-stream", out, {"keys": len(key)}

    # ---- audit ------------------------------------------------------------------------------------------------
    def _audit(self, tenant, method, path, status, record, sent, nbytes, seconds) -> None:
        if self.audit_path is None:
            return
        line = {"time": time.time(), "tenant": tenant, "endpoint": f"{method} {path}", "status": status,
                "rows": record["rows"], "tokens_in": record["tokens_in"], "ids_sha256": record["ids_sha256"],
                "out": {"keys": sent.get("keys", 0), "head": sent.get("head", 0), "bytes": nbytes},
                "latency_ms": round(seconds * 1000, 2)}
        if record.get("refused"):
            line["refused"] = record["refused"]
        with self._audit_lock, open(self.audit_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
