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

Everything runs in ONE Ray task that loads the PLM once: the compare stage (:func:`pema.stages.compare.run_compare`,
on :class:`~pema.executors.ray_executor.RayExecutor`), whose work is :func:`pema.stages.compare.run_systems`.
Per system it reports BLEU, chrF, TER, training time, peak training memory, trainable parameters and decoding time
per token, and writes ``predictions/<system>.jsonl``. The stage logs through the metric logger
(:class:`~pema.tracking.logger.MLflowLogger` here): a child run per system, the table and ``summary.json``.

Significance (sacreBLEU's paired bootstrap, 1,000 resamples, fixed seed: :func:`pema.stages.scoring.paired_significance`):
the table shows BLEU and chrF with their 95% interval and, for every baseline of ``against`` (default
``zero_shot``), a p-value column for each; each row's ``significance`` holds the numbers (``{baseline: entry}``),
and the child runs log them as ``bleu_ci_low``, ``bleu_ci_high``, ``bleu_p`` (against ``zero_shot``),
``bleu_p_vs_<baseline>`` (others) and the same for ``chrf`` and ``ter`` (on the parent with ``<system>/`` before).
"""
from __future__ import annotations

import json
from pathlib import Path

from pema.config import PipelineConfig
from pema.executors.ray_executor import RayExecutor
from pema.formats.layout import write_text_atomic
from pema.jobs import stages
from pema.stages.compare import SYSTEMS, check_against, check_systems, run_compare
from pema.stages.inputs import split_pairs
from pema.stages.ledger import config_digest
from pema.tracking.orphans import finished_children
from pema.tracking.runs import connect

STATE = "compare_state.json"  # the open compare run's id: a job killed mid-run is finished in that run


def compare(cfg: PipelineConfig, output_dir, *, systems=SYSTEMS, progress: bool = True, log=print,
            against=None) -> dict:
    """The comparison as one ``compare`` MLflow run, through the stage gate (:func:`pema.jobs.stages.once`): builds
    the memory and head when missing (the ``build_memory`` child run), then the compare stage
    (:func:`~pema.stages.compare.run_compare`), which logs a child run per system and, on the parent,
    ``compare.png``, ``compare.md`` and ``summary.json``, and merges the rows into ``<output_dir>/summary.json``;
    returns that summary. ``against``: the baselines of the paired tests (default ``zero_shot`` when it runs;
    ConfigError for names that do not run). A rerun after a kill resumes the killed job's run (:func:`_killed_run`)."""
    systems = check_systems(systems)
    against = check_against(against, systems)
    for split in ("train", "test"):  # a missing or malformed file fails here, before the run exists
        split_pairs(cfg, split)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_id, logged = _killed_run(cfg, out)

    def body(logger) -> dict:
        write_text_atomic(out / STATE, json.dumps({"run_id": logger.info()["run_id"], "config": config_digest(cfg)}))
        built = stages.ensure_built(cfg, out, progress=progress, log=log)
        return run_compare(cfg, out, RayExecutor(progress), logger, systems=systems, against=against,
                           progress=progress, logged=logged, timings={} if built is None else {"build_memory": built})

    try:
        return stages.once("compare", cfg, out, body, log=log, resume=run_id, systems=list(systems),
                           against=list(against))
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
        return str(state["run_id"]), finished_children(str(state["run_id"]), "pema.system")
    except Exception:  # noqa: BLE001 - no state, an unreadable one or a store without that run: a new run
        return None, set()
