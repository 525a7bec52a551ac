"""Each job is a stage run on the Ray executor and logged to MLflow: nothing here but the wiring.

- ``build``, ``train``, ``evaluate``: one MLflow run each (:func:`~pema.tracking.runs.stage_run`), the stage body
  from :mod:`pema.stages` on :class:`~pema.executors.ray_executor.RayExecutor`, logged by
  :class:`~pema.tracking.logger.MLflowLogger`; a stage the run folder's ledger (:mod:`pema.stages.ledger`) holds
  as done with the same config is not run again (:func:`once`).
- ``pipeline``: :func:`pema.stages.pipeline.run_pipeline` as a parent run holding the three as child runs.
- ``register``: the dev BLEU of the ``pema`` system (a Ray task), then the Model Registry.
- ``tune``: the search as one parent run (:mod:`pema.executors.ray_tune`), each trial a child run.

Every job's inputs are checked once, at its edge (:func:`pema.jobs.cli.run_job`, with
:func:`~pema.stages.inputs.check_inputs`), before it writes anything: a bad JSONL file, a model path that does not
exist or a missing bundle leaves the output folder as it was (no ``mlflow.db``, no ``config.json``). The functions
here trust that check and do not repeat it.
"""
from __future__ import annotations

import json

from pema.config import PipelineConfig, to_dict
from pema.executors.ray_executor import RayExecutor
from pema.formats.layout import ADAPTER_BUNDLES, OWNER_BUNDLES, RunLayout, write_text_atomic
from pema.stages.build import run_build
from pema.stages.decode import decode_and_score, log_scores, run_evaluate, significance_metrics  # noqa: F401
from pema.stages.inputs import check_inputs, cleaned_splits
from pema.stages.ledger import Ledger, gated, stage_inputs
from pema.stages.pipeline import run_pipeline
from pema.stages.train import TrainResult, run_train
from pema.tracking.logger import MLflowLogger, TrialRuns
from pema.tracking.registry import adapter_digest, register_adapter
from pema.tracking.orphans import finish_recorded_runs
from pema.tracking.runs import connect

__all__ = ["ADAPTER_BUNDLES", "OWNER_BUNDLES", "build", "train", "evaluate", "pipeline", "register", "tune",
           "ensure_built", "check_inputs", "log_scores", "significance_metrics", "dev_bleu_of"]


def finish_run(entry: dict, output_dir) -> None:
    """End the run of a recorded stage as FINISHED when a kill left it open (the work was done and recorded)."""
    if entry.get("run_id"):
        connect(output_dir)
        finish_recorded_runs([entry["run_id"]])


def recorded(stage: str, cfg: PipelineConfig, output_dir, **match) -> dict | None:
    """The ledger's entry of ``stage`` done with this config, its inputs and ``match`` (outputs in place), with
    its run ended FINISHED if a kill left it open; None when the stage has to run."""
    ledger = Ledger(output_dir)
    if (entry := ledger.done(stage, cfg, stage_inputs(cfg, output_dir, stage), **match)) is not None:
        finish_run(entry, output_dir)
    return entry


def once(stage: str, cfg: PipelineConfig, output_dir, body, *, log=print, figure=lambda result: "",
         restore=lambda result: result, resume: str | None = None, **match):
    """``body(logger)`` as the MLflow run of ``stage``, through the stage gate (:func:`pema.stages.ledger.gated`):
    skipped, with its recorded result (``restore`` makes it typed again), when the folder's ledger holds it as done
    with this config, these inputs and ``match`` with its outputs in place (a job killed after the work was done:
    its run, if the kill left it open, is ended as FINISHED); the console says which and why. ``resume``: the id of
    a run a killed job left open, reopened instead of a new one."""
    logger = MLflowLogger(cfg, output_dir)
    return gated(Ledger(output_dir), stage, cfg, lambda name: logger.stage(name, resume=resume), body, log=log,
                 figure=figure, restore=restore, on_skip=lambda entry: finish_run(entry, output_dir), **match)[0]


def build(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> dict:
    for line in cleaned_splits(cfg, "dev")[1].lines():  # what the pair hygiene kept and dropped, per split
        log(f"[data] {line}")
    return once("build_memory", cfg, output_dir,
                lambda logger: run_build(cfg, output_dir, RayExecutor(progress), logger, progress=progress), log=log)


def train(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> dict:
    """The train stage's :class:`~pema.stages.train.TrainResult`, as the job shows it (``to_dict()``)."""
    return once("train", cfg, output_dir,
                lambda logger: run_train(cfg, output_dir, RayExecutor(progress), logger, progress=progress), log=log,
                restore=TrainResult.from_dict).to_dict()


def evaluate(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> dict:
    return once("evaluate", cfg, output_dir,
                lambda logger: run_evaluate(cfg, output_dir, RayExecutor(progress), logger, progress=progress),
                log=log)


def pipeline(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> dict:
    """All stages as child runs of one ``pipeline`` run, each through the stage gate; writes and logs
    ``summary.json``. The job's edge (:func:`pema.jobs.cli.run_job`) has checked the inputs."""
    out = RunLayout(output_dir).root
    ledger = Ledger(out)
    return run_pipeline(cfg, out, RayExecutor(progress), MLflowLogger(cfg, out), progress=progress, log=log,
                        ledger=ledger, checked=True, on_skip=lambda entry: finish_run(entry, out))


def ensure_built(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> float | None:
    """Build the memories and the head (the ``build_memory`` child run) unless ``output_dir`` has them; returns the
    seconds it took, or None when nothing was missing."""
    if not RunLayout(output_dir).missing(OWNER_BUNDLES):
        return None
    built = build(cfg, output_dir, progress=progress)
    log(f"[build_memory] {built['train_rows']:,} train rows, {built['dev_rows']:,} dev rows")
    return built["build_s"] + built["head_s"]


def tune(cfg: PipelineConfig, output_dir, *, train_space: dict, decode_grid: list[dict], num_samples: int,
         name: str | None = None, max_concurrent: int = 1, seed: int = 0, progress: bool = True, log=print) -> dict:
    """The search as one parent run: builds the memory if missing (child run), one child run per trial, then the
    winning (adapter, decoding setting) at ``<output_dir>/adapter`` and, with ``name``, registered (child run).

    ``train_space``: a loaded space (``search_space.load_space``); ``decode_grid``: the decoding settings every
    surviving adapter is decoded with (``search_space.decode_grid``). Rerunning the same command after an
    interruption resumes the search in the same parent run; finished trials are not run again. Writes
    ``tune_summary.json``."""
    from pema.config import with_absolute_data, with_overrides
    from pema.executors.ray_tune import copy_adapter, run_tune

    layout = RunLayout(output_dir)
    out = layout.root
    cfg = with_absolute_data(cfg)  # trials run in their own folders
    state_path = layout.tune_state
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    with MLflowLogger(cfg, out).stage("tune", resume=state.get("parent_run_id")) as run:
        parent_run_id = run.info()["run_id"]
        write_text_atomic(state_path, json.dumps({"parent_run_id": parent_run_id}))
        ensure_built(cfg, out, progress=progress, log=log)
        setup = {"trial_runs": TrialRuns.under_active_run(cfg, out)}
        run.log_dict({"train": {k: list(v) for k, v in train_space.items()}, "decode_grid": decode_grid},
                     "search_space.json")
        found = run_tune(cfg, out, train_space=train_space, decode_grid=decode_grid, setup=setup,
                         num_samples=num_samples,
                         max_concurrent=max_concurrent, seed=seed, progress=progress)
        table = [{k: v for k, v in t.items() if k != "checkpoint"} for t in found["trials"]]
        summary = {"trials": table, "unfinished": found["unfinished"], "experiment_path": found["path"],
                   "parent_run_id": parent_run_id, "decode_grid": decode_grid}
        if found["unfinished"]:
            log(f"interrupted: {found['unfinished']} trial(s) unfinished; rerun the same command to resume")
        elif found["best"] is None:
            raise RuntimeError("no trial finished training: see the trials' errors in " + found["path"])
        else:
            best = found["best"]
            best_cfg = with_overrides(cfg, {**best["config"], **best["decode"]})
            copy_adapter(best["checkpoint"], layout.adapter)
            write_text_atomic(layout.config, json.dumps(to_dict(best_cfg), indent=2))
            summary["best"] = {k: best[k] for k in ("trial_id", "config", "decode", "dev_bleu", "dev_chrf",
                                                    "mlflow_run_id")}
            run.log_metrics({"best_dev_bleu": best["dev_bleu"], "trials_completed":
                             sum(t["status"] == "completed" for t in table), "trials_pruned":
                             sum(t["status"] == "pruned" for t in table)})
            run.set_tags({"pema.best_trial": best["trial_id"], "pema.best_decode": json.dumps(best["decode"])})
            if name:
                summary["registered"] = register(best_cfg, out, name, dev_bleu=best["dev_bleu"], progress=progress)
        write_text_atomic(layout.tune_summary, json.dumps(summary, indent=2, default=str))
        run.log_artifact(layout.tune_summary)
    return summary


def dev_bleu_of(cfg: PipelineConfig, output_dir, *, progress: bool = True, logger=None) -> float:
    """Dev BLEU of the ``pema`` system (the registered schedule, ``decode.pema``), decoded in a Ray task."""
    scores = RayExecutor(progress).call(decode_and_score, cfg, str(RunLayout(output_dir).root), progress=progress,
                                split="dev", systems=("pema",), write_predictions=False,
                                num_cpus=cfg.resources.eval_cpus, gpu=cfg.resources.device.startswith("cuda"))
    log_scores(logger or MLflowLogger(cfg, output_dir), scores, prefix="dev/")
    return float(scores["pema"]["bleu"])


def register(cfg: PipelineConfig, output_dir, name: str, *, dev_bleu: float | None = None,
             progress: bool = True) -> dict:
    """Register ``output_dir/adapter`` as a new version of ``name`` (the ``register`` run); returns the version, its
    dev BLEU and whether it became the champion. ``dev_bleu`` is measured on the dev pairs unless given (a Tune
    trial has it)."""

    def body(logger) -> dict:
        bleu = dev_bleu_of(cfg, output_dir, progress=progress, logger=logger) if dev_bleu is None else dev_bleu
        return register_adapter(cfg, output_dir, name, dev_bleu=bleu)

    # gated like the other stages: a rerun after a kill that came once the version was registered keeps one
    # FINISHED register run and returns the recorded version; another adapter, name or given dev BLEU registers
    return once("register", cfg, output_dir, body, name=name, dev_bleu=dev_bleu, adapter=adapter_digest(output_dir))
