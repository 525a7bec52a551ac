"""The end-to-end run, written once: build the memory (PLM owner), train the adapter (data owner), decode and score
every system, on any executor (inline in tests, Ray in the jobs) and logged through any metric logger (MLflow in
the jobs: a ``pipeline`` run with the three stages as child runs).

Outputs under ``output_dir`` (:class:`~pema.formats.layout.RunLayout`): ``config.json``, ``memory/``, ``head/``,
``adapter/``, ``train_history.json``, ``predictions/`` and ``summary.json``: the scores of every system with their
significance against zero-shot (:mod:`pema.stages.decode`), the stage timings, the phases' best losses, the memory
size and where the logs went. The console gets one line as each stage starts and ends, with its key figure.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext

from pema.config import PipelineConfig, to_dict
from pema.formats.layout import RunLayout, write_text_atomic
from pema.stages.build import run_build
from pema.stages.decode import SYSTEMS, log_scores, run_evaluate
from pema.stages.inputs import check_inputs, cleaned_splits
from pema.stages.ledger import Ledger, gated
from pema.stages.logger import MetricLogger, NullLogger
from pema.stages.train import TrainResult, run_train


def run_pipeline(cfg: PipelineConfig, output_dir: str | os.PathLike, executor, logger: MetricLogger | None = None, *,
                 progress: bool = True, log=print, ledger: Ledger | None = None, checked: bool = False,
                 on_skip=lambda entry: None) -> dict:
    """Every stage in turn; returns the summary (also written to ``summary.json`` and logged). The inputs are
    checked first (unless the job's edge has ``checked`` them): a bad file or model path leaves ``output_dir`` as
    it was. With ``ledger``, every stage and the pipeline itself go through the stage gate
    (:func:`pema.stages.ledger.gated`): one done with this config and these inputs is not run again (its recorded
    result is used, and ``on_skip(entry)`` is called), and the console says which ran, which were skipped and why."""
    if not checked:
        check_inputs(cfg, splits=("train", "dev", "test"), model=True)
    _, hygiene = cleaned_splits(cfg)
    for line in hygiene.lines():
        log(f"[data] {line}")
    layout, logger = RunLayout(output_dir), logger or NullLogger()
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.config, json.dumps(to_dict(cfg), indent=2))
    if ledger is None:
        return _stages(cfg, layout, executor, logger.stage("pipeline"), None, hygiene, progress, log, on_skip)
    return gated(ledger, "pipeline", cfg, logger.stage,
                 lambda run: _stages(cfg, layout, executor, nullcontext(run), ledger, hygiene, progress, log, on_skip),
                 log=log, on_skip=on_skip, figure=lambda summary: "nothing ran now; the scores and timings are that "
                 "run's")[0]


def _stages(cfg: PipelineConfig, layout: RunLayout, executor, parent, ledger: Ledger | None, hygiene, progress: bool,
            log, on_skip) -> dict:
    timings: dict[str, float] = {}

    def stage(name: str, body, figure, restore=lambda r: r):
        start = time.perf_counter()
        if ledger is None:
            log(f"[{name}] started")
            with run.stage(name) as stage_logger:
                result, skipped = body(stage_logger), None
        else:
            result, skipped = gated(ledger, name, cfg, run.stage, body, log=log, figure=figure, on_skip=on_skip,
                                    restore=restore)
        timings[name] = skipped.get("seconds", 0.0) if skipped else round(time.perf_counter() - start, 2)
        if not skipped:
            log(f"[{name}] done in {timings[name]:.0f} s: {figure(result)}")
        return result

    with parent as run:
        built = stage("build_memory", lambda lg: run_build(cfg, layout.root, executor, lg, progress=progress),
                      lambda b: f"{b['train_rows']:,} train rows, {b['dev_rows']:,} dev rows")
        trained = stage("train", lambda lg: run_train(cfg, layout.root, executor, lg, progress=progress),
                        lambda t: "; ".join(_phase_figure(p) for p in t.phases), TrainResult.from_dict)
        summary = stage("evaluate", lambda lg: run_evaluate(cfg, layout.root, executor, lg, progress=progress),
                        lambda s: ", ".join(f"{k} chrF {s[k]['chrf']:.2f}" for k in SYSTEMS if k in s))
        summary["timings_s"] = {"build_memory": timings["build_memory"], "train": trained.seconds,
                                **summary["timings_s"]}
        summary["train"] = [{"phase": p["phase"], "best_val": p["best_val"], "steps": p["steps"],
                             "rows_per_s": p["rows_per_s"]} for p in trained.phases]
        summary["memory_rows"] = built["train_rows"]
        summary["hygiene"] = hygiene.to_dict()
        summary["executor"] = {"name": executor.name, "train_workers": trained.workers}
        if info := run.info():
            summary["mlflow"] = info
        write_text_atomic(layout.summary, json.dumps(summary, indent=2, ensure_ascii=False))
        log_scores(run, summary)
        run.log_metrics({f"{k}_s": float(v) for k, v in summary["timings_s"].items()})
        run.log_artifact(layout.summary)
    return summary


def _phase_figure(p: dict) -> str:
    if p["steps"] == 0:  # train.rct_solver: exact, solved in closed form
        return f"{p['phase']} val loss {p['best_val']:.4f} (closed form)"
    return f"{p['phase']} best val loss {p['best_val']:.4f} at step {p['best_step']} of {p['steps']}"

