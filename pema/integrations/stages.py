"""The jobs' stages with their MLflow runs: what each stage logs, in one place.

- ``build``: row and part counts, seconds and rows/s; the memory manifests as artifacts.
- ``train``: every validation's losses (``<phase>/val_loss`` ... with the optimizer step), best losses, steps,
  seconds and rows/s per phase; ``train_history.json`` and a loss-curve figure.
- ``evaluate``: BLEU, chrF, TER and seconds per token per system (``pema_const``, ``pema_gu`` and ``pema`` are the
  three lambda schedules; their settings are params ``decode.const.*`` / ``decode.gu.*`` / ``decode.pema.*``); the predictions and a figure
  of the lambda actually used at each generated token. With a ``significance`` entry (sacreBLEU's paired
  bootstrap, :func:`pema.evaluate.paired_significance`) also, per system and for ``bleu``, ``chrf`` and ``ter``:
  ``<system>/<metric>_ci_low`` and ``<system>/<metric>_ci_high`` (the 95% interval), ``<system>/<metric>_p`` (the
  p-value against ``zero_shot``) and ``<system>/<metric>_p_vs_<baseline>`` against any other baseline (the compare
  job's ``--against``); a baseline's own p-value is not logged. :func:`significance_metrics` builds them.
- ``pipeline``: a parent run holding the three as child runs, plus the final scores and ``summary.json``.

Every stage checks its inputs (:func:`check_inputs`) before it writes anything: a bad JSONL file, a model path
that does not exist or a missing bundle leaves the output folder as it was (no ``mlflow.db``, no ``config.json``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow

from pema.config import PipelineConfig, to_dict
from pema.integrations import plots
from pema.integrations.tracking import stage_run
from pema.pipeline import SYSTEMS


def check_inputs(cfg: PipelineConfig, output_dir=None, *, splits: tuple[str, ...] = (), model: bool = False,
                 bundles: tuple[str, ...] = ()) -> None:
    """Check what a stage reads before it writes anything: the JSONL pairs of ``splits`` (DataError naming
    ``<path>:<line>``, FileNotFoundError), ``model.model_id`` when ``model`` (ConfigError when it names a path
    that does not exist) and the ``bundles`` files under ``output_dir`` (FileNotFoundError naming the jobs that
    make them)."""
    from pema.tasks import load_pairs

    d = cfg.data
    for split in splits:
        load_pairs(getattr(d, split), limit=getattr(d, f"{split}_limit"), source_field=d.source_field,
                   target_field=d.target_field)
    if model:
        from pema.owner.plm import resolve_model  # the id only: nothing is loaded

        resolve_model(cfg.model.model_id)
    if missing := [b for b in bundles if not (Path(output_dir) / b).is_file()]:
        raise FileNotFoundError(f"{output_dir} lacks {missing}: run jobs/build_memory.py (memory/, head/) and "
                                "jobs/train.py (adapter/) on this --output-dir first")


ADAPTER_BUNDLES = ("head/head.json", "adapter/adapter.json")  # what decoding reads (the PLM answers the rest)


def _log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, name)
    plt.close(fig)


def build(cfg: PipelineConfig, output_dir, *, progress: bool = True) -> dict:
    from pema.integrations.ray_build import run_build_stage, stage_pairs

    pairs = stage_pairs(cfg)  # bad input fails here, before the run (and its store in output_dir) exists
    check_inputs(cfg, model=True)
    with stage_run("build_memory", cfg, output_dir):
        info = run_build_stage(cfg, output_dir, progress=progress, pairs=pairs)
        rows = info["train_rows"] + info["dev_rows"]
        mlflow.log_metrics({**{k: float(v) for k, v in info.items()},
                            "build_rows_per_s": rows / max(info["build_s"], 1e-9)})
        for split in ("train", "dev"):
            mlflow.log_artifact(str(Path(output_dir) / "memory" / split / "manifest.json"), f"memory/{split}")
    return info


def train(cfg: PipelineConfig, output_dir, *, progress: bool = True) -> dict:
    from pema.integrations.ray_train import run_train_stage
    from pema.pipeline import BUNDLES

    check_inputs(cfg, output_dir, bundles=BUNDLES)  # the data owner's inputs; it never loads the PLM
    with stage_run("train", cfg, output_dir):
        info = run_train_stage(cfg, output_dir, progress=progress)
        history = json.loads((Path(output_dir) / "train_history.json").read_text())
        offset, last_phase, last_step = 0, None, 0
        for h in history:  # one global step axis across the phases
            if h["phase"] != last_phase and last_phase is not None:
                offset += last_step
            last_phase, last_step = h["phase"], h["step"]
            mlflow.log_metrics({f"{h['phase']}/{k}": float(v) for k, v in h.items()
                                if k.startswith("val_") or k == "train_loss"}, step=offset + h["step"])
        for p in info["phases"]:
            mlflow.log_metrics({f"{p['phase']}/best_val": p["best_val"], f"{p['phase']}/steps": p["steps"],
                                f"{p['phase']}/seconds": p["seconds"], f"{p['phase']}/rows_per_s": p["rows_per_s"]})
        mlflow.log_metrics({"train_s": info["seconds"], "steps_run": info["steps_run"], "workers": info["workers"]})
        mlflow.log_artifact(str(Path(output_dir) / "train_history.json"))
        _log_figure(plots.loss_curves(history), "loss_curves.png")
    return info


SIGNIFICANCE_METRICS = ("bleu", "chrf", "ter")


def significance_metrics(row: dict, prefix: str = "") -> dict[str, float]:
    """MLflow metrics from a row's ``significance`` (``{baseline: entry}``): ``<prefix><metric>_ci_low``,
    ``_ci_high``, ``_p`` (against ``zero_shot``) and ``_p_vs_<baseline>`` (other baselines); {} without one."""
    metrics: dict[str, float] = {}
    for baseline, entry in row.get("significance", {}).items():
        for m in SIGNIFICANCE_METRICS:
            if m not in entry:
                continue
            metrics[f"{prefix}{m}_ci_low"] = float(entry[m]["ci_low"])  # the same for every baseline (same seed)
            metrics[f"{prefix}{m}_ci_high"] = float(entry[m]["ci_high"])
            if entry[m]["p_value"] is not None:
                suffix = "" if baseline == "zero_shot" else f"_vs_{baseline}"
                metrics[f"{prefix}{m}_p{suffix}"] = float(entry[m]["p_value"])
    return metrics


def log_scores(scores: dict, prefix: str = "") -> None:
    """Scores, seconds per token and the significance metrics of every system in ``scores`` (its order)."""
    for system, s in scores.items():
        if isinstance(s, dict) and "bleu" in s:
            metrics = {f"{prefix}{system}/{k}": float(s[k]) for k in ("bleu", "chrf", "ter", "seconds_per_token")
                       if k in s}
            mlflow.log_metrics({**metrics, **significance_metrics(s, f"{prefix}{system}/")})


def evaluate(cfg: PipelineConfig, output_dir, *, progress: bool = True) -> dict:
    from pema.integrations.ray_pipeline import run_evaluate_stage

    check_inputs(cfg, output_dir, splits=("test",), model=True, bundles=ADAPTER_BUNDLES)
    with stage_run("evaluate", cfg, output_dir):
        scores = run_evaluate_stage(cfg, output_dir, progress=progress)
        log_scores(scores)
        mlflow.log_metrics({f"{k}_s": float(v) for k, v in scores["timings_s"].items()})
        pred_dir = Path(output_dir) / "predictions"
        mlflow.log_artifacts(str(pred_dir), "predictions")
        traces = {}
        for system in SYSTEMS[1:]:
            with open(pred_dir / f"{system}.jsonl", encoding="utf-8") as f:
                traces[system] = [json.loads(line)["lam"] for line in f]
        _log_figure(plots.lambda_schedules(traces), "lambda_schedule.png")
    return scores


def pipeline(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> dict:
    """All stages as child runs of one ``pipeline`` run; writes and logs ``summary.json``."""
    check_inputs(cfg, splits=("train", "dev", "test"), model=True)  # before config.json and the run exist
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    with stage_run("pipeline", cfg, out):
        start = time.perf_counter()
        built = build(cfg, out, progress=progress)
        timings = {"build_memory": round(time.perf_counter() - start, 2)}
        log(f"memory: {built['train_rows']} train rows, {built['dev_rows']} dev rows")
        trained = train(cfg, out, progress=progress)
        timings["train"] = trained["seconds"]
        for p in trained["phases"]:
            log(f"{p['phase']}: best val loss {p['best_val']:.4f} at step {p['best_step']} of {p['steps']} "
                f"({p['rows_per_s']:,.0f} rows/s per worker{', stopped early' if p['stopped_early'] else ''})")
        summary = evaluate(cfg, out, progress=progress)
        summary["timings_s"] = {**timings, **summary["timings_s"]}
        summary["train"] = [{"phase": p["phase"], "best_val": p["best_val"], "steps": p["steps"],
                             "rows_per_s": p["rows_per_s"]} for p in trained["phases"]]
        summary["memory_rows"] = built["train_rows"]
        summary["ray"] = {"train_workers": trained["workers"]}
        summary["mlflow"] = {"run_id": mlflow.active_run().info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        log_scores(summary)
        mlflow.log_metrics({f"{k}_s": float(v) for k, v in summary["timings_s"].items()})
        mlflow.log_artifact(str(out / "summary.json"))
    return summary


def ensure_built(cfg: PipelineConfig, output_dir, *, progress: bool = True, log=print) -> float | None:
    """Build the memories and the head (the ``build_memory`` child run) unless ``output_dir`` has them; returns the
    seconds it took, or None when nothing was missing."""
    from pema.pipeline import missing_bundles

    if not missing_bundles(output_dir):
        return None
    start = time.perf_counter()
    built = build(cfg, output_dir, progress=progress)
    log(f"memory: {built['train_rows']} train rows, {built['dev_rows']} dev rows")
    return round(time.perf_counter() - start, 2)


def tune(cfg: PipelineConfig, output_dir, *, train_space: dict, decode_grid: list[dict], num_samples: int,
         name: str | None = None, max_concurrent: int = 1, seed: int = 0, progress: bool = True, log=print) -> dict:
    """The search as one parent run: builds the memory if missing (child run), one child run per trial, then the
    winning (adapter, decoding setting) at ``<output_dir>/adapter`` and, with ``name``, registered (child run).

    ``train_space``: a loaded space (``search_space.load_space``); ``decode_grid``: the decoding settings every
    surviving adapter is decoded with (``search_space.decode_grid``). Rerunning the same command after an
    interruption resumes the search in the same parent run; finished trials are not run again. Writes
    ``tune_summary.json``."""
    from pema.config import with_absolute_data, with_overrides
    from pema.integrations.ray_tune import copy_adapter, run_tune
    from pema.integrations.registry import register
    from pema.integrations.tracking import lineage_tags

    out = Path(output_dir).resolve()
    check_inputs(cfg, splits=("train", "dev"), model=True)  # before the folder and the run exist
    cfg = with_absolute_data(cfg)  # trials run in their own folders
    state_path = out / "tune_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    with stage_run("tune", cfg, out, run_id=state.get("parent_run_id")) as parent:
        state_path.write_text(json.dumps({"parent_run_id": parent.info.run_id}))
        ensure_built(cfg, out, progress=progress, log=log)
        setup = {"tracking_uri": mlflow.get_tracking_uri(), "experiment_id": parent.info.experiment_id,
                 "parent_run_id": parent.info.run_id, "lineage": lineage_tags(cfg, out)}
        mlflow.log_dict({"train": {k: list(v) for k, v in train_space.items()}, "decode_grid": decode_grid},
                        "search_space.json")
        found = run_tune(cfg, out, train_space=train_space, decode_grid=decode_grid, setup=setup,
                         num_samples=num_samples,
                         max_concurrent=max_concurrent, seed=seed, progress=progress)
        table = [{k: v for k, v in t.items() if k != "checkpoint"} for t in found["trials"]]
        summary = {"trials": table, "unfinished": found["unfinished"], "experiment_path": found["path"],
                   "parent_run_id": parent.info.run_id, "decode_grid": decode_grid}
        if found["unfinished"]:
            log(f"interrupted: {found['unfinished']} trial(s) unfinished; rerun the same command to resume")
        elif found["best"] is None:
            raise RuntimeError("no trial finished training: see the trials' errors in " + found["path"])
        else:
            best = found["best"]
            best_cfg = with_overrides(cfg, {**best["config"], **best["decode"]})
            copy_adapter(best["checkpoint"], out / "adapter")
            (out / "config.json").write_text(json.dumps(to_dict(best_cfg), indent=2))
            summary["best"] = {k: best[k] for k in ("trial_id", "config", "decode", "dev_bleu", "dev_chrf",
                                                    "mlflow_run_id")}
            mlflow.log_metrics({"best_dev_bleu": best["dev_bleu"], "trials_completed":
                                sum(t["status"] == "completed" for t in table), "trials_pruned":
                                sum(t["status"] == "pruned" for t in table)})
            mlflow.set_tags({"pema.best_trial": best["trial_id"], "pema.best_decode": json.dumps(best["decode"])})
            if name:
                summary["registered"] = register(best_cfg, out, name, dev_bleu=best["dev_bleu"], progress=progress)
        (out / "tune_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        mlflow.log_artifact(str(out / "tune_summary.json"))
    return summary
