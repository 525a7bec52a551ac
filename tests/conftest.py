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
