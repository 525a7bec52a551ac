"""The PLM owner's service on Ray Serve: :class:`~pema.owner.service.OwnerService` behind one HTTP route.

Each replica holds the PLM and answers ``/context``, the decoding sessions, ``/head`` and ``/health`` (see
:mod:`pema.owner.service`). A session's KV cache lives in the replica that opened it, so the deployment routes by
session: a replica names its sessions ``<replica id>-<uuid>``, the client sends the id in Serve's session header
(``x-session-id``) with every step, and :class:`SessionRouter` (Serve's request-router API) sends the request to
that replica. Requests without a session (``/context``, opening one, ``/head``) go to the replicas with the fewest
open sessions, the least loaded of them first. So the deployment scales out, one replica per GPU
(``serve/owner_gpu.yaml``: ``num_gpus: 1`` per replica and an autoscaling range). A session whose replica is gone
(scaled down, crashed) answers 404 from whichever replica gets it: the client reopens it (see
:mod:`pema.adapter.remote_decode`).
"""
from __future__ import annotations

import asyncio
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import Response

from pema.formats.access import RequestError, bearer_tenant
from pema.owner.export import export_head
from pema.owner.plm import load_plm
from pema.formats.tasks import tokenizer_hash
from pema.owner.service import Limits, OwnerService, load_tokens

ROUTE = "/owner"
MAX_ONGOING = 64  # requests in one replica at once
SEP = "-"  # between the replica's id and the session's own id


class SessionRouter(FIFOMixin, RequestRouter):
    """A session's requests go to the replica that holds its KV cache; the rest to the replicas with the fewest open
    sessions (each replica reports them, :meth:`OwnerDeployment.record_routing_stats`)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if session and SEP in session:
            owner = session.split(SEP, 1)[0]
            held = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
            if held:
                return [held]
            # that replica is gone: any replica answers 404 (unknown session) and the client reopens it
        return _by_open_sessions(candidate_replicas)


def _by_open_sessions(replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """Ranks of replicas, fewest open sessions first (Serve then prefers the shortest queue within a rank)."""
    ranks: dict[int, list[RunningReplica]] = {}
    for r in random.sample(replicas, len(replicas)):
        ranks.setdefault(int((r.routing_stats or {}).get("open_sessions", 0)), []).append(r)
    return [ranks[n] for n in sorted(ranks)]


ROUTER = RequestRouterConfig(request_router_class="pema.executors.ray_serve.SessionRouter",
                             request_routing_stats_period_s=2, request_routing_stats_timeout_s=5)


@serve.deployment(name="pema_owner", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=MAX_ONGOING,
                  request_router_config=ROUTER)
class OwnerDeployment:
    def __init__(self, model_id: str, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
                 tokens_file: str | None = None, audit_path: str | None = None, limits: dict | None = None):
        model, tokenizer = load_plm(model_id, dtype=dtype, device=device, revision=revision)
        self._head = tempfile.TemporaryDirectory()
        export_head(model, self._head.name, model_id=model_id, model_revision=revision,
                    tokenizer_hash=tokenizer_hash(tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        replica = serve.get_replica_context().replica_id.unique_id
        self.service = OwnerService(model, self._head.name, load_tokens(tokens_file), audit_path=audit_path,
                                    limits=Limits(**(limits or {})), pad_id=pad, tokenizer=tokenizer,
                                    session_prefix=replica + SEP)
        # one thread per request Serve lets in (max_ongoing_requests): a step waiting for its batch holds one
        self._threads = ThreadPoolExecutor(max_workers=MAX_ONGOING, thread_name_prefix="owner")

    def record_routing_stats(self) -> dict:
        """What :class:`SessionRouter` ranks replicas by."""
        return {"open_sessions": len(self.service.sessions)}

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        prefix = request.scope.get("root_path", "") or ROUTE
        if path.startswith(prefix):
            path = path[len(prefix):] or "/"
        headers = dict(request.headers)
        body = await self._body(request, headers)
        # in a worker thread: the event loop keeps taking requests, so concurrent sessions' steps meet in the
        # service's step queue and share one forward (pema.owner.sessions)
        status, ctype, out, extra = await asyncio.get_running_loop().run_in_executor(
            self._threads, self.service.respond, request.method, path, headers, body)
        return Response(out, status_code=status, media_type=ctype, headers=extra)

    async def _body(self, request: Request, headers: dict) -> bytes:
        """The body, read only once the token is known, and at most one byte past the service's limit (the
        service then answers 413): a request without a valid token, or with a huge body, costs the replica no
        memory sized by what was sent. A refused token gets an empty body, so ``handle`` answers and audits 401."""
        from pema.formats.access import RequestError, bearer_tenant

        try:
            bearer_tenant(headers, self.service.tokens)
        except RequestError:
            return b""
        cap, chunks, size = self.service.limits.max_body_bytes + 1, [], 0
        async for chunk in request.stream():
            chunks.append(chunk[:cap - size])
            size += len(chunks[-1])
            if size >= cap:
                break
        return b"".join(chunks)


def owner_app(model_id: str, *, options: dict | None = None, **kwargs):
    """The Serve application (then ``serve.run(app, route_prefix=ROUTE)``); ``options`` are the deployment's
    (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ...)."""
    return OwnerDeployment.options(**(options or {})).bind(model_id, **kwargs)


def start_owner(model_id: str, *, port: int = 8000, name: str = "pema_owner", route: str = ROUTE, **kwargs) -> str:
    """Start Serve's HTTP proxy on ``127.0.0.1:port`` (if not running) and deploy the owner's service; returns its
    URL."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(owner_app(model_id, **kwargs), name=name, route_prefix=route)
    return f"http://127.0.0.1:{port}{route}"


def build_app(args: dict):
    """The application builder for a Serve config file (``import_path: pema.executors.ray_serve:build_app``):
    ``args`` are :class:`OwnerDeployment`'s (``model_id`` and the keyword arguments)."""
    args = dict(args)
    return owner_app(args.pop("model_id"), **args)
