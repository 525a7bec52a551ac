"""The Ray executor: the stages' bodies on the connected Ray cluster (:func:`~pema.executors.ray_runtime.init_ray`).

- ``encode``: the memory build's shards through Ray Data actors (:mod:`pema.executors.ray_build`);
- ``train``: the training body on Ray Train's DDP workers (:mod:`pema.executors.ray_train`);
- ``call``: any stage function as a Ray task, on a GPU when the stage asks for one (``resources.device`` is CUDA)
  and the cluster has one (decoding, the head export).
"""
from __future__ import annotations

import ray

from pema.executors.ray_build import actor_resources, encode_on_ray
from pema.executors.ray_progress import bars_on_driver, relayed_bars
from pema.executors.ray_runtime import cluster_gpus
from pema.executors.ray_train import train_on_ray


def _relayed(relay, fn, args, kwargs):
    with relayed_bars(relay, getattr(fn, "__name__", "task")):
        return fn(*args, **kwargs)


class RayExecutor:
    """``progress``: redraw the workers' progress bars on this console (:mod:`pema.executors.ray_progress`)."""

    name = "ray"

    def __init__(self, progress: bool = True):
        self.progress = progress

    def check_encode(self, cfg) -> None:
        """ConfigError when the cluster cannot start ``resources.memory_actors`` encoder actors."""
        actor_resources(cfg.resources, ray.cluster_resources())

    def encode(self, factory, items, *, cfg):
        return encode_on_ray(factory, items, cfg=cfg)

    def train(self, body, config: dict, *, cfg, layout):
        return train_on_ray(body, config, cfg=cfg, layout=layout, progress=self.progress)

    def call(self, fn, *args, num_cpus: float = 1, gpu: bool = False, **kwargs):
        """``fn(*args, **kwargs)`` in a Ray task with ``num_cpus`` logical CPUs and, when ``gpu`` and the cluster
        has one, a GPU."""
        task = ray.remote(_relayed).options(num_cpus=num_cpus, num_gpus=1 if gpu and cluster_gpus() > 0 else 0,
                                            max_retries=0)
        with bars_on_driver(self.progress) as relay:
            return ray.get(task.remote(relay, fn, args, kwargs))
