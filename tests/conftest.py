"""Shared fixtures: the real SmolLM2 tokenizer (loaded once per session; ~11 s offline)."""

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from pema.owner.plm import SMOLLM2_GGUF, load_tokenizer

    return load_tokenizer(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local cluster (``ray start --head``), shared by the session's Ray tests and stopped at the end."""
    from local_ray import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("ray"))
    yield cluster
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.stop()


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This test process connected to the session's cluster (``ray.init(address=...)``)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    return ray_cluster


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server started by the project's own mlflow/server.sh on a free 127.0.0.1 port, with a
    temporary sqlite store and artifacts folder; yields its URI."""
    from local_mlflow import start_server, stop_server
    from local_ray import free_port

    port = free_port()
    proc = start_server(tmp_path_factory.mktemp("mlflow"), port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def inline_build(pairs, out_dir, *overrides: str, model_id: str = "tiny://llama", **memory):
    """The memory build stage on the inline executor (the same body the Ray executor distributes): ``memory``
    sets ``memory.*`` (dtype, rows_per_part, batch_tokens), ``overrides`` any other key."""
    from pema.config import load_config
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import build_memory

    cfg = load_config(None, [f"model.model_id={model_id}", *[f"memory.{k}={v}" for k, v in memory.items()],
                             *overrides])
    return build_memory(cfg, pairs, out_dir, InlineExecutor(), progress=False)


@pytest.fixture(scope="module")
def owner_url(ray_client, tmp_path_factory):
    """The PLM owner's service (tiny://llama) on Ray Serve of the test cluster, one per test module (Serve's proxy
    port is the module's own); yields ``(url, folder)``: the folder holds ``tokens.json`` (tenant ``acme``, token
    ``t-acme-0123456789``; tenant ``beta``, token ``t-beta-0123456789``) and ``audit.jsonl``."""
    import json

    from local_ray import free_port
    from ray import serve

    from pema.executors.ray_serve import start_owner

    tmp = tmp_path_factory.mktemp("owner")
    (tmp / "tokens.json").write_text(json.dumps({"acme": "t-acme-0123456789", "beta": "t-beta-0123456789"}))
    url = start_owner("tiny://llama", port=free_port(), tokens_file=str(tmp / "tokens.json"),
                      audit_path=str(tmp / "audit.jsonl"))
    yield url, tmp
    serve.shutdown()
