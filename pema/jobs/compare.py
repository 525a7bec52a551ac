"""The ``compare`` job: every system on the same test pairs, one table, one MLflow parent run with a child per system.

Systems (all read the same ``memory/train`` or the pairs it was built from, decode the same ``data.test`` pairs with
the same ``decode.*`` settings through :func:`pema.stages.decode.translate`, and are scored by the same sacreBLEU call):

- ``zero_shot``: the PLM alone.
- ``knn_lm``: kNN-LM over the same train memory: p_kNN from the ``knn.k`` nearest keys at temperature
  ``knn.temperature``, mixed with P_LM at constant lam = ``knn.lam``.
- ``lora``: PEFT LoRA on the PLM's weights (``lora.*``), loss on the target tokens only; needs the weights, so it
  is what the PLM owner could offer instead of PEMA.
- ``pema_gu``: the PEMA adapter trained as ``train.*`` says, decoded with ``decode.gu`` (Gradual Unrolling).
- ``pema_const``: the same adapter, decoded with ``decode.const`` (constant lambda instead of GU).
- ``pema``: the same adapter, decoded with ``decode.pema``: the recommended schedule, chosen on dev pairs.
- ``pema_pd_only``: the same adapter's distribution ALONE (P_PEMA, constant lam = 1: no mixing with P_LM), i.e.
  what the PD head has learnt by itself.
- ``pema_no_rct``: an adapter trained WITHOUT reconstruction (``train.method = pd``, ``b_pd_init = random``: there
  is no B_rct to copy), decoded with ``decode.gu``.
- ``pema_knn``: the three-way mixture of P_LM, the same adapter's P_PEMA and kNN-LM's p_kNN:
  ``(1 - lam) P_LM + lam ((1 - s) P_PEMA + s p_kNN)``, lam from ``decode.pema_knn``, s = ``knn.pema_share``.

Everything runs in ONE Ray task (:func:`run_compare_stage`; GPUs: one when ``resources.device`` is CUDA and the cluster
has one) that loads the PLM once; the work itself is :func:`pema.stages.compare.run_systems`.
Per system it reports BLEU, chrF, TER, training time, peak training memory, trainable parameters and decoding time
per token, and writes ``predictions/<system>.jsonl``. :func:`compare` adds the MLflow runs and ``summary.json``.

Significance (sacreBLEU's paired bootstrap, 1,000 resamples, fixed seed: :func:`pema.stages.scoring.paired_significance`):
the table shows BLEU and chrF with their 95% interval and, for every baseline of ``against`` (default
``zero_shot``), a p-value column for each; each row's ``significance`` holds the numbers (``{baseline: entry}``),
and the child runs log them as ``bleu_ci_low``, ``bleu_ci_high``, ``bleu_p`` (against ``zero_shot``),
``bleu_p_vs_<baseline>`` (others) and the same for ``chrf`` and ``ter`` (on the parent with ``<system>/`` before).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow

from pema.config import PipelineConfig, flatten, with_absolute_data
from pema.stages import plots
from pema.executors.ray_executor import RayExecutor
from pema.stages.compare import (DEFINITIONS, SYSTEMS, check_against, check_systems, decode_schedule, no_rct_config,
                                 run_systems)
from pema.stages.decode import significance_metrics
from pema.formats.layout import write_text_atomic
from pema.stages.inputs import split_pairs
from pema.stages.ledger import Ledger, config_digest, stage_inputs
from pema.stages.tables import MEMORY_NOTE, format_compare_table
from pema.tracking.logger import MLflowLogger
from pema.tracking.runs import connect, lineage_tags, stage_run

STATE = "compare_state.json"  # the open compare run's id: a job killed mid-run is finished in that run
METRICS = ("bleu", "chrf", "ter", "train_s", "peak_train_mem_mb", "trainable_params", "decode_s_per_token")


def run_compare_stage(cfg: PipelineConfig, output_dir, *, systems=SYSTEMS, progress: bool = True,
                      against=None) -> dict:
    """Train, decode and score ``systems`` in one Ray task; ``memory/``, ``head/`` must exist under ``output_dir``.
    ``against``: the baselines of the paired tests (:func:`~pema.stages.compare.check_against`).
    Returns ``{"rows": {system: row}, "timings_s": {...}}`` (row keys: :data:`METRICS`, ``memory_kind``,
    ``total_params``, ``definition``, ``significance``, ...)."""
    systems = check_systems(systems)
    against = check_against(against, systems)
    return RayExecutor(progress).call(run_systems, with_absolute_data(cfg), str(Path(output_dir).resolve()),
                                      systems=systems, progress=progress, against=against,
                                      num_cpus=cfg.resources.eval_cpus, gpu=cfg.resources.device.startswith("cuda"))


def system_params(system: str, cfg: PipelineConfig) -> dict[str, str]:
    """The settings that define ``system`` (its child run's params)."""
    params: dict[str, object] = {"system.definition": DEFINITIONS[system], "decode.strategy": cfg.decode.strategy,
                                 "decode.max_new_tokens": cfg.decode.max_new_tokens}
    if system == "knn_lm":
        params.update(flatten(cfg.knn, "knn."))
    elif system == "lora":
        params.update(flatten(cfg.lora, "lora."))
    elif system.startswith("pema_"):
        train_cfg = no_rct_config(cfg) if system == "pema_no_rct" else cfg
        params.update({**flatten(cfg.adapter, "adapter."), **flatten(train_cfg.train, "train.")})
    if (schedule := decode_schedule(system, cfg)) is not None:
        params.update(flatten(schedule, "schedule."))
    return {k: str(v) for k, v in params.items()}


def _log_system_run(system: str, row: dict, cfg: PipelineConfig, experiment_id: str, tags: dict) -> None:
    with mlflow.start_run(run_name=system, nested=True, experiment_id=experiment_id):
        mlflow.set_tags({**tags, "pema.stage": "compare", "pema.system": system, "pema.memory_kind": row["memory_kind"]})
        mlflow.log_params(system_params(system, cfg))
        mlflow.log_metrics({**{k: float(row[k]) for k in (*METRICS, "total_params")}, **significance_metrics(row)})


def compare(cfg: PipelineConfig, output_dir, *, systems=SYSTEMS, progress: bool = True, log=print,
            against=None) -> dict:
    """The comparison as one ``compare`` MLflow run: builds the memory and head when missing (the ``build_memory``
    child run), runs :func:`run_compare_stage`, logs a child run per system (metrics, tag ``pema.system``) and on
    the parent ``compare.png``, ``compare.md`` and ``summary.json``. Merges the rows into ``<output_dir>/summary.json``
    (one key per system, ``compare_table``, ``compare_timings_s``) and returns that summary. ``against``: the
    baselines of the paired tests (default ``zero_shot`` when it runs; ConfigError for names that do not run).
    A rerun after a kill resumes the killed job's run (:func:`_killed_run`)."""
    systems = check_systems(systems)
    against = check_against(against, systems)
    for split in ("train", "test"):  # a missing or malformed file fails here, before the run exists
        split_pairs(cfg, split)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _compare_run(cfg, out, systems, against, progress, log)
    finally:  # ended (FINISHED or FAILED): the next job opens a new run; only a kill leaves the state behind
        (out / STATE).unlink(missing_ok=True)


def _killed_run(cfg: PipelineConfig, out: Path) -> tuple[str | None, set[str]]:
    """The compare run of this config that a killed job left in ``out`` (from ``compare_state.json``, if the store
    still has it) and the systems whose child runs it already FINISHED: the rerun resumes that run and logs only
    the missing children, so each system keeps one finished run."""
    try:
        state = json.loads((out / STATE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("config") != config_digest(cfg):
            return None, set()
        connect(out)
        run = mlflow.get_run(str(state["run_id"]))
        children = mlflow.search_runs([run.info.experiment_id], output_format="list", filter_string=(
            f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'FINISHED'"))
    except Exception:  # noqa: BLE001 - no state, an unreadable one or a store without that run: a new run
        return None, set()
    return run.info.run_id, {c.data.tags.get("pema.system") for c in children} - {None}


def _compare_run(cfg: PipelineConfig, out: Path, systems, against, progress: bool, log) -> dict:
    from pema.jobs import stages

    match = {"systems": list(systems), "against": list(against)}
    inputs = stage_inputs(cfg, out, "compare")  # what this run reads, hashed once, recorded with its result
    if (entry := stages.recorded("compare", cfg, out, **match)) is not None:  # done (a kill after it was recorded)
        return entry["result"]
    run_id, logged = _killed_run(cfg, out)
    with stage_run("compare", cfg, out, run_id=run_id) as parent:
        write_text_atomic(out / STATE, json.dumps({"run_id": parent.info.run_id, "config": config_digest(cfg)}))
        timings: dict[str, float] = {}
        if (seconds := stages.ensure_built(cfg, out, progress=progress, log=log)) is not None:
            timings["build_memory"] = seconds
        start = time.perf_counter()
        found = run_compare_stage(cfg, out, systems=systems, progress=progress, against=against)
        timings["compare"] = round(time.perf_counter() - start, 2)
        rows = found["rows"]
        tags = lineage_tags(cfg, out)
        for system, row in rows.items():
            if system in logged:  # the killed job's child run of this system had finished
                continue
            _log_system_run(system, row, cfg, parent.info.experiment_id, tags)
        table = format_compare_table(rows)
        mlflow.log_metrics({f"{s}/{k}": float(r[k]) for s, r in rows.items() for k in METRICS})
        for s, r in rows.items():
            if sig := significance_metrics(r, f"{s}/"):
                mlflow.log_metrics(sig)
        mlflow.log_text(f"{table}\n\n{MEMORY_NOTE}\n", "compare.md")
        MLflowLogger(cfg, out).log_figure(plots.compare_bars(rows), "compare.png")
        path = out / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary.update(rows)
        summary.update({"compare_table": table, "compare_timings_s": {**timings, **found["timings_s"]},
                        "compare_mlflow": {"run_id": parent.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}})
        write_text_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False))
        mlflow.log_artifact(str(path))
        Ledger(out).record("compare", cfg, summary, parent.info.run_id, inputs=inputs, **match)  # before the run ends (a kill after it)
    return summary
