"""Decoding and scoring as a Ray task (on a GPU when the PLM runs on one). The whole pipeline on Ray, with its
MLflow runs, is :func:`pema.integrations.stages.pipeline`."""
from __future__ import annotations

import os
from pathlib import Path

import ray

from pema.config import PipelineConfig, to_dict
from pema.integrations.ray_runtime import cluster_gpus
from pema.pipeline import decode_and_score


def _decode_task(cfg_dict: dict, output_dir: str, progress: bool, kwargs: dict) -> dict:
    from pema.config import config_from_dict

    return decode_and_score(config_from_dict(cfg_dict), output_dir, progress=progress, **kwargs)


def run_evaluate_stage(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True,
                       **kwargs) -> dict:
    """Decode the test set with every system and score it, in a Ray task; writes ``predictions/`` and returns
    the scores (``kwargs`` go to :func:`~pema.pipeline.decode_and_score`: ``split``, ``systems``, ...). The task
    asks for a GPU when ``model.device`` is not ``cpu`` and the cluster has one."""
    gpus = 1 if cfg.model.device != "cpu" and cluster_gpus() > 0 else 0
    task = ray.remote(_decode_task).options(num_cpus=cfg.eval.num_cpus, num_gpus=gpus, max_retries=0)
    return ray.get(task.remote(to_dict(cfg), str(Path(output_dir).resolve()), progress, kwargs))
