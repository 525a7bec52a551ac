"""The data owner's client of the PLM owner's service (:mod:`pema.owner.service`, served on Ray Serve): the
owner's answers over HTTP, so that no process of the data owner holds the PLM's weights.

Only the standard library speaks HTTP here; answers are safetensors (keys) or JSON. A service
that does not answer fails in seconds with :class:`~pema.errors.OwnerUnavailableError` naming the URL; an answer
other than 200 raises :class:`~pema.errors.OwnerRequestError` with the status and the service's message. Every
answer carries the fingerprint of the owner's head bundle; a client made with ``expect_fingerprint`` refuses any
other.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import torch
from safetensors.numpy import load as load_numpy

from pema.errors import MemoryMismatchError, OwnerRequestError, OwnerUnavailableError
from pema.formats.keys import paired_with_gold

# Ray Serve's session header (RAY_SERVE_SESSION_ID_HEADER_KEY's default): the owner's router sends a session's steps
# to the replica that opened it (pema.executors.ray_serve.SessionRouter); a plain HTTP server ignores it
SESSION_HEADER = "x-session-id"


class OwnerClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0, expect_fingerprint: str | None = None):
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self.fingerprint = expect_fingerprint
        self.bytes_in = self.bytes_out = 0  # what crossed, for the benchmarks
        self.greedy_agreement = [0, 0]  # label-private builds: the owner's greedy choices equal to gold, of all
        self._head = None

    def _request(self, method: str, path: str, body: dict | None = None, session: str | None = None) -> bytes:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if session is not None:  # Serve's proxy routes the request to the replica that holds the session
            headers[SESSION_HEADER] = session
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise OwnerRequestError(f"the PLM owner's service at {self.url} answered {exc.code} to {method} {path}: "
                                    f"{detail}", status=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise OwnerUnavailableError(f"the PLM owner's service at {self.url} is not reachable "
                                        f"({getattr(exc, 'reason', exc)}); start it (pema serve-owner) or fix "
                                        "owner.url") from None
        self.bytes_out += len(data or b"")
        self.bytes_in += len(raw)
        return raw

    def _tensors(self, raw: bytes) -> tuple[dict[str, np.ndarray], dict]:
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n]).get("__metadata__", {})
        got = meta.get("head_fingerprint")
        if self.fingerprint is None:
            self.fingerprint = got
        elif got != self.fingerprint:
            raise OwnerRequestError(f"the service at {self.url} answers for head {got}, not {self.fingerprint}: "
                                    "the owner's model changed; rebuild against the new head", status=409)
        return load_numpy(raw), meta

    def health(self) -> dict:
        return json.loads(self._request("GET", "/health"))

    def head(self) -> tuple[dict[str, np.ndarray], dict]:
        """The head bundle's tensors and its head.json."""
        tensors, meta = self._tensors(self._request("GET", "/head"))
        return tensors, json.loads(meta["head.json"])

    def tokenizer(self):
        """The owner's tokenizer, rebuilt from the files it serves (vocabulary, merges, chat template): the data
        owner tokenizes without opening the model's files."""
        import base64
        import tempfile
        from pathlib import Path

        from transformers import AutoTokenizer

        files = json.loads(self._request("GET", "/tokenizer"))
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / Path(name).name).write_bytes(base64.b64decode(data))
            return AutoTokenizer.from_pretrained(tmp)

    def output_head(self):
        """The owner's output head (:class:`~pema.adapter.head.OutputHead`), fetched once (``GET /head``): the
        data owner computes the PLM's next-token logits from a key with it."""
        if self._head is None:
            from pema.adapter.io import head_from_tensors

            tensors, meta = self.head()
            self._head = head_from_tensors({k: torch.from_numpy(v.copy()) for k, v in tensors.items()},
                                           meta, f"{self.url}/head (head.json)",
                                           f"{self.url}/head")[0]
        return self._head

    def context(self, examples, dtype: str = "float32", keys: str = "teacher_forced") -> dict[str, np.ndarray]:
        """The memory rows of ``examples`` (``EncodeExample``-like: example, prompt_ids, target_ids): key, token,
        example, position, d, vocab_size. ``keys="owner_greedy"`` (the label-private build) sends the prompts and
        the target lengths only; the owner answers the keys of its own greedy continuation, paired here with the
        gold tokens (``greedy_agreement`` counts how many of the owner's choices were the gold token)."""
        private = keys == "owner_greedy"
        body = {"dtype": dtype, "keys": keys, "examples": [
            {"example": int(e.example), "prompt_ids": list(e.prompt_ids),
             **({"target_length": len(e.target_ids)} if private else {"target_ids": list(e.target_ids)})}
            for e in examples]}
        rows, meta = self._tensors(self._request("POST", "/context", body))
        if private:
            try:
                rows, agree = paired_with_gold(rows, examples)
            except MemoryMismatchError as exc:
                raise OwnerRequestError(f"the service at {self.url} answered wrongly: {exc}", status=502) from None
            self.greedy_agreement[0] += agree
            self.greedy_agreement[1] += len(rows["token"])
        rows["d"], rows["vocab_size"] = int(meta["d"]), int(meta["vocab_size"])
        return rows

    def open_session(self, prompts: list[list[int]], dtype: str = "float32") -> tuple[str, np.ndarray]:
        """``(session id, key (rows, d))`` of the prompts' last positions, in ``dtype``."""
        out, meta = self._tensors(self._request("POST", "/sessions", {"prompts": prompts, "dtype": dtype}))
        return meta["session"], out["key"]

    def step(self, session: str, tokens: list[int], rows: list[int] | None = None) -> np.ndarray:
        """The keys of the rows' new contexts; ``rows``: the indices of the session's rows that go on (the others
        are dropped for good), ``tokens`` one per kept row."""
        body = {"tokens": tokens} if rows is None else {"tokens": tokens, "rows": rows}
        out, _ = self._tensors(self._request("POST", f"/sessions/{session}/step", body, session))
        return out["key"]

    def close(self, session: str) -> None:
        self._request("DELETE", f"/sessions/{session}", session=session)
