"""Registered adapters served on Ray Serve: ``POST /adapters`` with ``{"adapter": "NAME@ALIAS" | "NAME/VERSION",
"texts": [...]}`` and ``Authorization: Bearer <token>`` answers ``{"model": "NAME/VERSION", "texts": [...]}``.

Many adapters share one base model per replica (the PLM here, or the owner's service with ``resources.owner_url``):
each is loaded from the Model Registry on first use and kept by ``serve.multiplexed`` (least recently used out
beyond ``MAX_ADAPTERS``). The registry is asked on every request (one ``get_model_version`` or alias lookup): an
alias moved takes effect on the next request, and a version deleted stops answering at once, loaded or not. Every
answer names the version that produced it.

What a request may be, and what else it gets:

- access: a bearer token per tenant, from ``--tokens FILE`` or ``$PEMA_ADAPTER_TOKENS`` (the owner's service's
  code path, :mod:`pema.formats.access`); a missing or wrong token: 401.
- caps: a body of at most ``MAX_BODY_BYTES`` (1 MiB; the declared ``Content-Length``, then the bytes read), at most
  ``MAX_TEXTS`` (32) texts, each of at most ``data.max_tokens`` tokens of the service's config: over any of them
  413, naming the text's index, its tokens and the cap. With ``data.overlength: truncate`` a longer text is cut to
  the cap instead, and the answer says so (``"truncated": [{"index", "tokens", "max_tokens"}]``). So the largest
  request decodes at most ``MAX_TEXTS`` prompts of ``data.max_tokens`` source tokens for ``decode.max_new_tokens``
  steps: bounded by the config, not by the input.
- one decode at a time per replica (the base model is shared, and its context tap hooks it), first come first
  served, in a thread: refusals, 404s and the audit are answered while a decode runs. More replicas
  (``replicas``) decode side by side, each with its own base model.
- errors: a malformed body 400 naming the field; an unknown ``NAME/VERSION``, alias or model, a version deleted
  from the registry and a version whose artifacts are gone 404 naming the reference; a registry that does not
  answer 503; JSON ``{"error": ...}`` always, never a traceback.
- audit: one JSONL line per request, refused ones included: time, tenant, endpoint, status, the reference asked
  for, the version that answered, texts, tokens in, truncated texts and the latency. Never the text.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pema.errors import ConfigError, DataError, OwnerRequestError, OwnerUnavailableError, PemaError
from pema.formats.access import RequestError, bearer_tenant, json_object, load_tokens
from pema.formats.tasks import OverlengthError, cut_to_tokens
from pema.tracking.models import RegistryError, download_model, is_not_found, registry_client

ROUTE = "/adapters"
MAX_ADAPTERS = 4  # adapters kept per replica (least recently used out beyond it)
MAX_TEXTS = 32  # texts per request
MAX_BODY_BYTES = 1 << 20  # request body, bytes
MAX_ONGOING = 16  # requests a replica holds at once (refusals answer while one decodes)
TOKENS_ENV = "PEMA_ADAPTER_TOKENS"
log = logging.getLogger(__name__)


def parse_request(body: bytes) -> tuple[str, list[str]]:
    """The body -> ``(adapter reference, texts)``; RequestError 400 naming the field, 413 over ``MAX_TEXTS``."""
    data = json_object(body)
    ref, texts = data.get("adapter"), data.get("texts")
    if not isinstance(ref, str) or not ref:
        raise RequestError(400, "bad request: adapter must be a string, NAME@ALIAS or NAME/VERSION")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "bad request: texts must be a list of strings")
    if len(texts) > MAX_TEXTS:
        raise RequestError(413, f"{len(texts)} texts are over the cap of {MAX_TEXTS} per request; send them in parts")
    return ref, texts


def cap_texts(texts: list[str], tokenizer, max_tokens: int, overlength: str) -> tuple[list[str], list[dict], int]:
    """Every text within ``max_tokens`` tokens (``data.max_tokens``): RequestError 413 for the first one over it
    naming its index, tokens and the cap, or with ``overlength == "truncate"`` cut to the cap. Returns the texts,
    ``[{"index", "tokens", "max_tokens"}]`` of those cut, and the tokens in."""
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, truncated = [], []
    for i, (text, ids) in enumerate(zip(texts, rows)):
        if len(ids) <= max_tokens:
            out.append(text)
        elif overlength == "truncate":
            try:  # the longest prefix that still fits when counted again (a cut inside a character may not)
                out.append(cut_to_tokens(tokenizer, text, max_tokens, f"texts[{i}]"))
            except OverlengthError as exc:
                raise RequestError(413, str(exc)) from None
            truncated.append({"index": i, "tokens": len(ids), "max_tokens": max_tokens})
        else:
            raise RequestError(413, f"texts[{i}] has {len(ids)} tokens, over the cap of {max_tokens} "
                                    "(data.max_tokens); shorten it")
    return out, truncated, sum(map(len, rows))


def resolve(ref: str, client):
    """``NAME@ALIAS`` or ``NAME/VERSION`` -> its ModelVersion, asked of the registry now; RequestError 400 for
    anything else, 404 naming ``ref`` when the model, alias or version is not (or no longer) registered, 503 when
    the registry does not answer."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        lookup = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
    else:
        name, sep, version = ref.rpartition("/")
        if not sep or not name or not version.isdigit():
            raise RequestError(400, f"bad request: adapter={ref!r} must be NAME@ALIAS or NAME/VERSION")
        lookup = lambda: client.get_model_version(name, version)  # noqa: E731
    try:
        return lookup()
    except RegistryError as exc:
        if is_not_found(exc):
            raise RequestError(404, f"adapter {ref!r} is not in the registry ({exc.message})") from None
        raise RequestError(503, f"adapter {ref!r}: the registry did not answer ({exc.message})") from None


def _load(tracking_uri: str, model: str) -> dict:
    """The adapter, head, ratio and config of the registered version ``model`` (NAME/VERSION); FileNotFoundError
    when its artifacts are gone."""
    import yaml

    from pema.adapter.io import load_adapter, load_head
    from pema.config import config_from_dict

    local = download_model(tracking_uri, model)

    def find(name: str) -> Path:  # pyfunc artifacts/<name>
        path = next(local.rglob(name), None)
        if path is None:
            raise FileNotFoundError(f"{name} is not among the version's artifacts")
        return path

    head, head_meta = load_head(find("head.json").parent)
    adapter, meta = load_adapter(find("adapter.json").parent, head_meta)
    cfg = config_from_dict(yaml.safe_load(find("config.yaml").read_text()))
    return {"adapter": adapter.eval(), "head": head, "ratio": meta["target_source_ratio"], "cfg": cfg}


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, reading at most ``limit`` bytes (the declared length is checked first); RequestError 413 beyond."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body of more than {limit} bytes is over the limit of {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="pema_adapters", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=MAX_ONGOING)
class AdapterDeployment:
    def __init__(self, tracking_uri: str, base_config: dict, *, tokens_file: str | None = None,
                 audit_path: str | None = None):
        from pema.config import config_from_dict
        from pema.stages.inputs import plm_or_client

        self.tracking_uri = tracking_uri
        self.client = registry_client(tracking_uri)
        self.tokens = load_tokens(tokens_file, env=TOKENS_ENV)
        self.audit_path = Path(audit_path) if audit_path else None
        self.audit_lock = threading.Lock()
        self.cfg = config_from_dict(base_config)
        self.model, self.tokenizer = plm_or_client(self.cfg)  # the one base model every adapter mixes with
        self.decoding = asyncio.Lock()  # one decode at a time on the shared base model

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS)
    async def get_adapter(self, key: str):
        """``key`` is ``NAME/VERSION#CREATED`` (the version's creation time): a model deleted and registered again
        under the same name and number is a new key, never the old adapter."""
        return _load(self.tracking_uri, key.split("#", 1)[0])

    async def __call__(self, request: Request) -> JSONResponse:
        start, tenant, record = time.perf_counter(), None, {"adapter": None, "model": None, "texts": 0,
                                                            "tokens_in": 0, "truncated": 0}
        try:
            tenant = bearer_tenant(dict(request.headers), self.tokens)
            status, answer = 200, await self._answer(request, record)
        except RequestError as exc:
            status, answer = exc.status, {"error": str(exc)}
        except Exception as exc:  # a bug: named for the client, the traceback stays in the replica's log
            log.exception("adapter request failed")
            status, answer = 500, {"error": f"internal error ({type(exc).__name__}: {exc})"}
        self._audit(tenant, request, status, record, time.perf_counter() - start)
        return JSONResponse(answer, status_code=status)

    async def _answer(self, request: Request, record: dict) -> dict:
        from pema.stages.decode import translate

        ref, texts = parse_request(await read_body(request))
        record.update(adapter=ref, texts=len(texts))
        d = self.cfg.data
        texts, truncated, record["tokens_in"] = cap_texts(texts, self.tokenizer, d.max_tokens, d.overlength)
        record["truncated"] = len(truncated)
        mv = resolve(ref, self.client)  # asked on every request: a deleted version stops answering at once
        model = record["model"] = f"{mv.name}/{mv.version}"
        try:
            bundle = await self.get_adapter(f"{model}#{mv.creation_timestamp}")
        except (OSError, RegistryError) as exc:
            raise RequestError(404, f"adapter {ref!r} ({model}): its artifacts cannot be read from the registry's "
                                    f"store ({type(exc).__name__}: {exc})") from None
        cfg = bundle["cfg"]
        async with self.decoding:
            try:
                hyps, _ = await asyncio.to_thread(
                    translate, self.model, self.tokenizer, texts, cfg, adapter=bundle["adapter"],
                    head=bundle["head"], schedule=cfg.decode.pema, ratio=bundle["ratio"])
            except DataError as exc:
                raise RequestError(422, str(exc)) from None
            except (OwnerUnavailableError, OwnerRequestError) as exc:
                raise RequestError(502, f"the PLM owner's service: {exc}") from None
            except PemaError as exc:
                raise RequestError(500, f"{type(exc).__name__}: {exc}") from None
        return {"model": model, "texts": hyps, **({"truncated": truncated} if truncated else {})}

    def _audit(self, tenant, request: Request, status: int, record: dict, seconds: float) -> None:
        if self.audit_path is None:
            return
        line = {"time": time.time(), "tenant": tenant, "endpoint": f"{request.method} {request.url.path}",
                "status": status, **record, "latency_ms": round(seconds * 1000, 2)}
        with self.audit_lock, open(self.audit_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def start_adapters(tracking_uri: str, base_config: dict, *, port: int = 8000, tokens_file: str | None = None,
                   audit_path: str | None = None, replicas: int = 1) -> str:
    """Deploy the adapter service (Serve's proxy on ``127.0.0.1:port``) with ``replicas`` replicas; returns its URL.
    Tokens from ``tokens_file`` or ``$PEMA_ADAPTER_TOKENS`` (ConfigError, before anything starts, without; so is a
    ``replicas`` below 1)."""
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas={replicas!r}: give an integer >= 1")
    load_tokens(tokens_file, env=TOKENS_ENV)
    options = {"num_replicas": replicas}
    if tokens_file is None:  # the replicas read $PEMA_ADAPTER_TOKENS: it travels with them to any node
        options["ray_actor_options"] = {"num_cpus": 1, "runtime_env": {"env_vars": {TOKENS_ENV: os.environ[TOKENS_ENV]}}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = AdapterDeployment.options(**options).bind(tracking_uri, base_config, tokens_file=tokens_file,
                                                    audit_path=audit_path)
    serve.run(app, name="pema_adapters", route_prefix=ROUTE)
    return f"http://127.0.0.1:{port}{ROUTE}"
