"""Ray Tune over PEMA: ASHA over the training space, then a decoding sweep on dev for every adapter that survives.

One trial = one training configuration (``tune_spaces/train.yaml`` sampled):

1. It trains RCT, then the PD phase, on the run's memory (``<output-dir>/memory``, ``head``). After every PD-phase
   validation it reports ``dev_ce`` (the dev cross-entropy of P_PEMA, comparable across kappa) at ``pd_epoch`` with
   a checkpoint (safetensors + JSON, :mod:`pema.adapter.checkpoint`). ASHA compares trials on ``dev_ce`` at the
   same ``pd_epoch`` and stops the laggards.
2. A trial that finishes training decodes the dev pairs with the ``pema`` system once per decoding setting
   (``tune_spaces/decode.yaml``: ``decode.pema.*``, the same settings for every trial) with the SAME adapter:
   decoding needs no retraining. Its last report carries ``dev_bleu`` (the best over the settings), the setting
   that reached it and the adapter bundle.

Every trial logs to its own MLflow run, a child of the tune job's parent run (``mlflow.parentRunId``): the sampled
config as params, ``dev_ce`` per validation, the dev BLEU/chrF of each decoding setting (step = its index) and the
best. A trial that ASHA stops keeps its run, ended as KILLED with ``pema.trial_status=pruned``.

``events.jsonl`` in each trial folder records ``train_start`` / ``train_end`` / ``decode`` lines, so what ran (and
that decoding reused the adapter) can be checked afterwards.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from ray import tune

from pema.adapter.io import save_adapter
from pema.config import config_from_dict, to_dict, with_overrides
from pema.formats.layout import RunLayout, replace_dir
from pema.stages.decode import decode_and_score
from pema.stages.inputs import plm_or_client
from pema.stages.logger import NullLogger
from pema.stages.train import train_worker, worker_config

TRIAL_META = "trial.json"
BUNDLE = "adapter"


def _event(trial_dir: Path, kind: str, **fields) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")


def read_events(trial_dir: str | os.PathLike) -> list[dict]:
    path = Path(trial_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class TuneLogger(NullLogger):
    """The training body's logger inside a trial: every PD-phase validation becomes a ``tune.report`` of ``dev_ce``
    at ``pd_epoch`` (RCT's loss is a reconstruction MSE, so ASHA compares trials on the PD phase only), with the
    checkpoint and the trial's run id; the values go to the trial's MLflow run too. The trained adapter is the
    body's return value (:func:`tune_trial` puts it at ``<trial dir>/adapter`` for the decoding sweep)."""

    def __init__(self, run, base: dict, trial_dir: Path):
        self.run, self.base, self.trial_dir = run, base, trial_dir

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        if metrics.get("phase") == "rct" or not metrics.get("step"):
            return
        values = {"dev_ce": metrics["val_ce"], "dev_loss": metrics["val_loss"], "pd_epoch": metrics["epoch"]}
        self.run.log_metrics(values, step=metrics["step"])
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint(tmp)
            (Path(tmp) / TRIAL_META).write_text(json.dumps({"mlflow_run_id": self.run.run_id}))
            tune.report({**self.base, **values}, checkpoint=tune.Checkpoint.from_directory(tmp))


class TuneTrainContext:
    rank, world = 0, 1

    def __init__(self, logger: TuneLogger, device: str, latest):
        self.logger, self.device, self._latest = logger, torch.device(device), latest

    @contextlib.contextmanager
    def latest_checkpoint(self):
        if self._latest is None:
            yield None
            return
        with self._latest.as_directory() as d:
            yield d


def tune_trial(config: dict, setup: dict) -> None:
    """The function trainable: the training body (resuming from Tune's checkpoint if any), then the decoding sweep."""
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    trial_dir = Path(setup["trials_dir"]) / trial_id
    overrides = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
    cfg = with_overrides(config_from_dict(setup["cfg"]), overrides)
    out = Path(setup["output_dir"])
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))

    latest, meta = tune.get_checkpoint(), {}
    if latest is not None:
        with latest.as_directory() as d:
            meta = json.loads((Path(d) / TRIAL_META).read_text())
    if meta.get("final") and "result" in meta:
        # the trial had finished (run ended, adapter decoded) when the job was killed, before Tune saved that: report
        # its result again; reopening its run or training again would leave the run RUNNING when Tune stops it
        with latest.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(d, tmp, dirs_exist_ok=True)
            tune.report(meta["result"], checkpoint=tune.Checkpoint.from_directory(tmp))
        return
    run = setup["trial_runs"].open(trial_id, overrides, cfg, meta.get("mlflow_run_id"))
    base = {"mlflow_run_id": run.run_id, "trial_dir": str(trial_dir)}

    _event(trial_dir, "train_start", resumed=latest is not None)
    start = time.perf_counter()
    logger = TuneLogger(run, base, trial_dir)
    worker = worker_config(cfg, out, progress=False)
    trained = train_worker(worker, TuneTrainContext(logger, cfg.resources.device, latest))
    adapter_dir = trial_dir / BUNDLE  # the trained adapter, for the decoding sweep (stage, replace)
    replace_dir(adapter_dir, lambda staging: save_adapter(trained.adapter, staging, worker["adapter_meta"]))
    pd = trained.phases[-1]
    _event(trial_dir, "train_end", seconds=round(time.perf_counter() - start, 2))
    run.log_metrics({"train_s": time.perf_counter() - start, "best_dev_loss": pd["best_val"]})

    best = sweep_decoding(cfg, out, adapter_dir, setup["decode_grid"], run, trial_dir)
    history = pd["history"]
    result = {**base, "dev_ce": history[-1].get("val_ce", float("nan")) if history else float("nan"),
              "pd_epoch": history[-1]["epoch"] if history else 0.0, "dev_bleu": best["bleu"],
              "dev_chrf": best["chrf"], "decode": json.dumps(best["setting"]), "final": True}
    run.log_metrics({"dev_bleu": best["bleu"], "dev_chrf": best["chrf"]})
    run.end("FINISHED", **{"pema.trial_status": "completed", "pema.best_decode": json.dumps(best["setting"])})
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(adapter_dir, Path(tmp) / BUNDLE)
        (Path(tmp) / TRIAL_META).write_text(json.dumps({"mlflow_run_id": run.run_id, "final": True, "result": result}))
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


def sweep_decoding(cfg, out: Path, adapter_dir: Path, grid: list[dict], run, trial_dir: Path) -> dict:
    """Dev BLEU of one adapter, decoded as the ``pema`` system (``decode.pema``), under every decoding setting of
    ``grid`` (PLM loaded once, or the owner's service with ``resources.owner_url``); returns the best."""
    model, tokenizer = plm_or_client(cfg)
    best, table = None, []
    for i, setting in enumerate(grid):
        scores = decode_and_score(with_overrides(cfg, setting), out, model=model, tokenizer=tokenizer,
                                  progress=False, split="dev", systems=("pema",), write_predictions=False,
                                  adapter_dir=adapter_dir)["pema"]
        _event(trial_dir, "decode", index=i, setting=setting, bleu=scores["bleu"])
        run.log_metrics({"sweep/dev_bleu": scores["bleu"], "sweep/dev_chrf": scores["chrf"]}, step=i)
        table.append({"index": i, **setting, "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"],
                      "dev_ter": scores["ter"]})
        if best is None or (scores["bleu"], scores["chrf"]) > (best["bleu"], best["chrf"]):  # ties: chrF, then order
            best = {"bleu": scores["bleu"], "chrf": scores["chrf"], "setting": setting}
    run.log_dict(table, "decode_sweep.json")
    return best


def sample_order(trial: dict) -> tuple:
    """A trial's place in the search: Ray's trial ids end in the sample's index (``<experiment>_00003``)."""
    index = str(trial["trial_id"]).rsplit("_", 1)[-1]
    return (0, int(index), "") if index.isdigit() else (1, 0, str(trial["trial_id"]))


def best_trial(trials: list[dict]) -> dict | None:
    """The completed trial with the best dev BLEU; ties (common at low BLEU) go to the better dev chrF, then to the
    trial drawn first, so that a resumed search picks what an uninterrupted one picks."""
    done = sorted((t for t in trials if t["status"] == "completed"), key=sample_order)
    return max(done, key=lambda t: (t["dev_bleu"], t["dev_chrf"] or 0.0)) if done else None


def max_epochs(cfg, space: dict) -> float:
    """The longest PD phase the space allows (ASHA's ``max_t``)."""
    kind, args = space.get("train.epochs", ("choice", [cfg.train.epochs]))
    return float(max(args) if kind == "choice" else (args[1] - 1 if kind == "randint" else args[1]))


def run_tune(cfg, output_dir, *, train_space: dict, decode_grid: list[dict], setup: dict, num_samples: int,
             max_concurrent: int = 1, grace_period: float = 1.0, reduction_factor: float = 2.0, seed: int = 0,
             progress: bool = True) -> dict:
    """Run (or resume, when ``<output_dir>/ray_tune/tune`` holds an interrupted run) the search; returns
    ``{"trials": [...], "best": {...} | None, "unfinished": n, "path": ...}``."""
    from ray.tune import CheckpointConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pema.executors.search_space import to_tune

    out = Path(output_dir).resolve()
    storage, name = RunLayout(out).ray_tune, "tune"
    setup = {**setup, "cfg": to_dict(cfg), "output_dir": str(out), "trials_dir": str(RunLayout(out).trials),
             "decode_grid": decode_grid}
    resources = {"CPU": cfg.resources.cpus_per_worker, **({"GPU": 1} if cfg.resources.device.startswith("cuda") else {})}
    trainable = tune.with_resources(tune.with_parameters(tune_trial, setup=setup), resources)
    if Tuner.can_restore(str(storage / name)):
        tuner = Tuner.restore(str(storage / name), trainable, resume_unfinished=True, resume_errored=True)
    else:
        t_max = max_epochs(cfg, train_space)
        scheduler = ASHAScheduler(time_attr="pd_epoch", metric="dev_ce", mode="min", max_t=t_max,
                                  grace_period=min(grace_period, t_max), reduction_factor=reduction_factor,
                                  stop_last_trials=False)  # a trial that reaches max_t still decodes
        tuner = Tuner(trainable, param_space=to_tune(train_space),
                      tune_config=TuneConfig(scheduler=scheduler, num_samples=num_samples,
                                             max_concurrent_trials=max_concurrent,
                                             search_alg=BasicVariantGenerator(random_state=seed,
                                                                              max_concurrent=max_concurrent)),
                      run_config=RunConfig(name=name, storage_path=str(storage), verbose=1 if progress else 0,
                                           checkpoint_config=CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    saved = saved_statuses(storage / name)
    unfinished = num_samples - sum(s in ("TERMINATED", "ERROR") for s in saved.values())
    trials = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or _trial_id(result.path)
        status = {"TERMINATED": "pruned", "ERROR": "failed"}.get(saved.get(trial_id), "unfinished")
        status = "completed" if m.get("final") else status
        row = {"trial_id": trial_id, "status": status,
               "config": {k: v for k, v in (result.config or {}).items()}, "dev_ce": m.get("dev_ce"),
               "pd_epoch": m.get("pd_epoch"), "dev_bleu": m.get("dev_bleu"), "dev_chrf": m.get("dev_chrf"),
               "decode": json.loads(m["decode"]) if m.get("decode") else None, "mlflow_run_id": m.get("mlflow_run_id"),
               "checkpoint": result.checkpoint}
        if row["mlflow_run_id"] and not unfinished:  # a run its trial's process did not end (pruned, failed, stopped)
            setup["trial_runs"].close_if_running(row["mlflow_run_id"], {"pruned": "KILLED", "completed": "FINISHED"}
                                                 .get(status, "FAILED"), status)
        trials.append(row)
    trials.sort(key=sample_order)  # the order the searcher drew them in, not the order they ended (a resume changes it)
    best = best_trial(trials) if not unfinished else None
    return {"trials": trials, "best": best, "unfinished": unfinished, "path": str(storage / name)}


def _trial_id(path: str) -> str:
    """``.../tune_trial_61b3e_00001_1_adapter_rank=...`` -> ``61b3e_00001``."""
    parts = Path(path).name.split("_")
    return "_".join(parts[2:4])


def saved_statuses(path: Path) -> dict[str, str]:
    """Trial id -> status as saved for a restore. After Ctrl+C the interrupted trials are saved as PENDING (the
    in-memory result grid may already call them terminated) and trials not yet created are missing."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(str(path)).trials}


def copy_adapter(checkpoint, dest: str | os.PathLike) -> None:
    """Put the adapter bundle of a trial's final checkpoint at ``dest`` (stage, replace)."""
    with checkpoint.as_directory() as d:
        replace_dir(dest, lambda staging: shutil.copytree(Path(d) / BUNDLE, staging, dirs_exist_ok=True))
