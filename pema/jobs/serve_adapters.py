"""Registered adapters served on Ray Serve: ``POST /adapters`` with ``{"adapter": "NAME@ALIAS" | "NAME/VERSION",
"texts": [...]}`` answers ``{"model": "NAME/VERSION", "texts": [...]}``.

Many adapters share one base model per replica (the PLM here, or the owner's service with ``resources.owner_url``):
each is loaded from the Model Registry on first use and kept by ``serve.multiplexed`` (least recently used out
beyond ``MAX_ADAPTERS``). An alias is resolved on every request, so moving ``champion`` takes effect on the next
request without a restart; every answer names the version that produced it.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

ROUTE = "/adapters"
MAX_ADAPTERS = 4  # adapters kept per replica (least recently used out beyond it)


def resolve(ref: str, client: MlflowClient) -> str:
    """``NAME@ALIAS`` or ``NAME/VERSION`` -> ``NAME/VERSION`` (ValueError for anything else)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, sep, version = ref.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise ValueError(f"adapter={ref!r} must be NAME@ALIAS or NAME/VERSION")
    return ref


@serve.deployment(name="pema_adapters", ray_actor_options={"num_cpus": 1})
class AdapterDeployment:
    def __init__(self, tracking_uri: str, base_config: dict):
        from pema.config import config_from_dict
        from pema.stages.inputs import plm_or_client

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.cfg = config_from_dict(base_config)
        self.model, self.tokenizer = plm_or_client(self.cfg)  # the one base model every adapter mixes with

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS)
    async def get_adapter(self, model: str):
        import yaml

        from pema.adapter.io import load_adapter, load_head
        from pema.config import config_from_dict

        mlflow.set_tracking_uri(self.tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}"))
        find = lambda name: next(p for p in local.rglob(name))  # noqa: E731  (pyfunc artifacts/<name>)
        head, head_meta = load_head(find("head.json").parent)
        adapter, meta = load_adapter(find("adapter.json").parent, head_meta)
        cfg = config_from_dict(yaml.safe_load(find("config.yaml").read_text()))
        return {"adapter": adapter.eval(), "head": head, "ratio": meta["target_source_ratio"], "cfg": cfg}

    async def __call__(self, request: Request) -> JSONResponse:
        from pema.stages.decode import translate

        try:
            body = json.loads(await request.body())
            texts, ref = body["texts"], body["adapter"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(ref, str):
                raise ValueError("texts must be a list of strings and adapter a string")
            model = resolve(ref, self.client)
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        except mlflow.exceptions.MlflowException as exc:
            return JSONResponse({"error": f"adapter {body.get('adapter')!r}: {exc}"}, status_code=404)
        bundle = await self.get_adapter(model)
        hyps, _ = translate(self.model, self.tokenizer, texts, bundle["cfg"], adapter=bundle["adapter"],
                            head=bundle["head"], schedule=bundle["cfg"].decode.pema, ratio=bundle["ratio"])
        return JSONResponse({"model": model, "texts": hyps})


def start_adapters(tracking_uri: str, base_config: dict, *, port: int = 8000) -> str:
    """Deploy the adapter service (Serve's proxy on ``127.0.0.1:port``); returns its URL."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(AdapterDeployment.bind(tracking_uri, base_config), name="pema_adapters",
              route_prefix=ROUTE)
    return f"http://127.0.0.1:{port}{ROUTE}"
