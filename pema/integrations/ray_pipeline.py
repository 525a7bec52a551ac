"""The evaluation stage as a Ray task, and the whole pipeline on Ray: build (Ray Data) -> train (Ray Train) ->
decode and score (a Ray task on a GPU when the PLM runs on one). ``summary.json`` has the same contract as the
single-process :func:`pema.pipeline.run_pipeline`: scores per system, ``timings_s``, ``train`` and ``memory_rows``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray

from pema.config import PipelineConfig, to_dict
from pema.integrations.ray_build import run_build_stage
from pema.integrations.ray_runtime import cluster_gpus
from pema.integrations.ray_train import run_train_stage
from pema.memory import read_manifest
from pema.pipeline import decode_and_score


def _decode_task(cfg_dict: dict, output_dir: str, progress: bool) -> dict:
    from pema.config import config_from_dict

    return decode_and_score(config_from_dict(cfg_dict), output_dir, progress=progress)


def run_evaluate_stage(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Decode the test set with every system and score it, in a Ray task; writes ``predictions/`` and returns
    the scores. The task asks for a GPU when ``model.device`` is not ``cpu`` and the cluster has one."""
    gpus = 1 if cfg.model.device != "cpu" and cluster_gpus() > 0 else 0
    task = ray.remote(_decode_task).options(num_cpus=cfg.eval.num_cpus, num_gpus=gpus, max_retries=0)
    return ray.get(task.remote(to_dict(cfg), str(Path(output_dir).resolve()), progress))


def run_pipeline_ray(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True,
                     log=print) -> dict:
    """Every stage on the connected Ray cluster; returns the summary (also in ``output_dir/summary.json``)."""
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    run_build_stage(cfg, out, progress=progress)
    timings["build_memory"] = round(time.perf_counter() - start, 2)
    manifest = read_manifest(out / "memory" / "train")
    log(f"memory: {manifest.total_rows} train rows from {manifest.num_examples} pairs")
    trained = run_train_stage(cfg, out, progress=progress)
    timings["train"] = trained["seconds"]
    for p in trained["phases"]:
        log(f"{p['phase']}: best val loss {p['best_val']:.4f} at step {p['best_step']} of {p['steps']} "
            f"({p['rows_per_s']:,.0f} rows/s per worker{', stopped early' if p['stopped_early'] else ''})")
    summary = run_evaluate_stage(cfg, out, progress=progress)
    summary["timings_s"] = {**timings, **summary["timings_s"]}
    summary["train"] = [{"phase": p["phase"], "best_val": p["best_val"], "steps": p["steps"],
                         "rows_per_s": p["rows_per_s"]} for p in trained["phases"]]
    summary["memory_rows"] = manifest.total_rows
    summary["ray"] = {"train_workers": trained["workers"], "cluster_gpus": cluster_gpus()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
