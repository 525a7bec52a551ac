"""The PLM owner's service on Ray Serve: :class:`~pema.owner.service.OwnerService` behind one HTTP route.

One replica holds the PLM and answers ``/context``, the decoding sessions, ``/head`` and ``/health`` (see
:mod:`pema.owner.service`). A session's KV cache lives in the replica that opened it, so the deployment runs one
replica: every request of a session reaches it. Scaling out (one replica per GPU) needs routing by session id,
which is not built here.
"""
from __future__ import annotations

import tempfile

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from pema.owner.export import export_head
from pema.owner.plm import load_plm
from pema.formats.tasks import tokenizer_hash
from pema.owner.service import Limits, OwnerService, load_tokens

ROUTE = "/owner"


@serve.deployment(name="pema_owner", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class OwnerDeployment:
    def __init__(self, model_id: str, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
                 tokens_file: str | None = None, audit_path: str | None = None, limits: dict | None = None):
        model, tokenizer = load_plm(model_id, dtype=dtype, device=device, revision=revision)
        self._head = tempfile.TemporaryDirectory()
        export_head(model, self._head.name, model_id=model_id, model_revision=revision,
                    tokenizer_hash=tokenizer_hash(tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.service = OwnerService(model, self._head.name, load_tokens(tokens_file), audit_path=audit_path,
                                    limits=Limits(**(limits or {})), pad_id=pad, tokenizer=tokenizer)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        prefix = request.scope.get("root_path", "") or ROUTE
        if path.startswith(prefix):
            path = path[len(prefix):] or "/"
        status, ctype, body = self.service.handle(request.method, path, dict(request.headers), await request.body())
        return Response(body, status_code=status, media_type=ctype)


def owner_app(model_id: str, **kwargs):
    """The Serve application (bind it, then ``serve.run(app, route_prefix=ROUTE)``)."""
    return OwnerDeployment.bind(model_id, **kwargs)


def start_owner(model_id: str, *, port: int = 8000, name: str = "pema_owner", **kwargs) -> str:
    """Start Serve's HTTP proxy on ``127.0.0.1:port`` (if not running) and deploy the owner's service; returns its
    URL."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(owner_app(model_id, **kwargs), name=name, route_prefix=ROUTE)
    return f"http://127.0.0.1:{port}{ROUTE}"


def build_app(args: dict):
    """The application builder for a Serve config file (``import_path: pema.executors.ray_serve:build_app``):
    ``args`` are :class:`OwnerDeployment`'s (``model_id`` and the keyword arguments)."""
    args = dict(args)
    return owner_app(args.pop("model_id"), **args)
