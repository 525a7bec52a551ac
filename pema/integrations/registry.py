"""The register step: log the trained adapter as an MLflow pyfunc model, register a new version, and move the alias
``champion`` to it only when it beats the current champion on dev BLEU.

The model is "models from code" (:mod:`pema.integrations.pyfunc_model`) with plain-file artifacts: the adapter
bundle, the head bundle and the run's config (which names the base model and holds the decoding settings and the
lambda schedule, ``decode.pema``: the recommended PEMA configuration, the ``pema`` row). Every version carries the
tags ``dev_bleu``, ``schedule`` (:func:`schedule_tag`) and ``base_model``.
"""
from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path

import mlflow
import yaml
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from pema.config import PipelineConfig, to_dict
from pema.integrations.tracking import ROOT, stage_run

ALIAS = "champion"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))


def requirements() -> list[str]:
    """The project's pinned runtime dependencies (pyproject.toml), for the model's environment."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if not d.startswith("ray")]


def champion(name: str) -> tuple[str | None, float | None]:
    """(version, dev BLEU) of the current champion, or (None, None)."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None, None
    return mv.version, float(mv.tags.get("dev_bleu", "-inf"))


def schedule_tag(cfg: PipelineConfig) -> str:
    """The registered schedule, ``decode.pema``, as ``"<kind> lam=.. lam_max=.. floor=.. stop_lam=.."``: every value a
    YAML scalar (``stop_lam=null``: the stop decision uses the schedule's lambda, as for any token)."""
    p = cfg.decode.pema
    values = {"lam": p.lam, "lam_max": p.lam_max, "floor": p.floor, "stop_lam": p.stop_lam}
    return " ".join([p.kind] + [f"{k}={'null' if v is None else v}" for k, v in values.items()])


def dev_bleu_of(cfg: PipelineConfig, output_dir, *, progress: bool = True) -> float:
    """Dev BLEU of the ``pema`` system (the registered schedule, ``decode.pema``), decoded in a Ray task."""
    from pema.integrations.ray_pipeline import run_evaluate_stage
    from pema.integrations.stages import log_scores

    scores = run_evaluate_stage(cfg, output_dir, progress=progress, split="dev", systems=("pema",),
                                write_predictions=False)
    log_scores(scores, prefix="dev/")
    return float(scores["pema"]["bleu"])


def register(cfg: PipelineConfig, output_dir, name: str, *, dev_bleu: float | None = None,
             progress: bool = True) -> dict:
    """Register ``output_dir/adapter`` as a new version of ``name``; returns the version, its dev BLEU and
    whether it became the champion. ``dev_bleu`` is measured on the dev pairs unless given (a Tune trial has it)."""
    from pema.integrations.stages import check_inputs

    out = Path(output_dir)
    for part in ("adapter", "head"):
        if not (out / part / f"{part}.json").is_file():
            raise FileNotFoundError(f"{out / part} holds no {part} bundle: run the build and train jobs first")
    check_inputs(cfg, splits=("dev",) if dev_bleu is None else (), model=True)  # before the run exists
    with stage_run("register", cfg, out):
        if dev_bleu is None:
            dev_bleu = dev_bleu_of(cfg, out, progress=progress)
        mlflow.log_metric("dev_bleu", dev_bleu)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), signature=SIGNATURE, registered_model_name=name,
                artifacts={"adapter": str(out / "adapter"), "head": str(out / "head"), "config": str(config)},
                pip_requirements=requirements())
        version = str(info.registered_model_version)
        client = MlflowClient()
        tags = {"dev_bleu": str(dev_bleu), "schedule": schedule_tag(cfg), "base_model": cfg.model.model_id}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        previous, previous_bleu = champion(name)
        promoted = previous is None or dev_bleu > previous_bleu
        if promoted:
            client.set_registered_model_alias(name, ALIAS, version)
        mlflow.set_tags({"pema.registered_model": name, "pema.model_version": version,
                         "pema.champion": str(promoted).lower()})
    return {"name": name, "version": version, "dev_bleu": dev_bleu, "champion": promoted,
            "previous_champion": previous, "previous_dev_bleu": previous_bleu, "model_uri": f"models:/{name}/{version}"}
