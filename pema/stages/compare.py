"""The compare stage: every system of the comparison, trained and decoded in one process on the same memory and test
pairs, then logged and tabled.

:func:`run_compare` is the stage, as build, train and evaluate are: handed an executor and a metric logger, it runs
:func:`run_systems` (no Ray, no MLflow) as one ``call`` on the executor (a Ray task in the job, GPUs: one when
``resources.device`` is CUDA), then logs one child scope per system (its definition as params, its metrics), the
systems' metrics on its own scope, ``compare.md``, ``compare.png`` and ``summary.json``. The job
(:mod:`pema.jobs.compare`) runs it through the stage gate inside its MLflow run. The definitions of the systems are
in :data:`DEFINITIONS` and in the docstring of :mod:`pema.jobs.compare`.

Costs per system: ``train_s`` is the wall time of what the system needs before it can decode (PEMA: both training
phases, kNN-LM: reading the memory and building its index, LoRA: PEFT fine-tuning, zero-shot: nothing);
``peak_train_mem_mb`` is the peak of that work above its start, as :class:`~pema.profiling.PeakMemory` measures it
on the work's device (``memory_kind``: ``cuda_allocated`` or ``cpu_rss``, which are not comparable with each other);
``trainable_params`` counts the parameters that training updates.

Significance: each row's ``significance`` is ``{baseline: entry}`` for every baseline of ``against``
(:func:`check_against`; default ``zero_shot`` when it runs), ``entry`` as :func:`pema.stages.scoring.paired_significance`
returns it (sacreBLEU's paired bootstrap: 95% intervals of BLEU, chrF and TER, p-values against that baseline).
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from pema.adapter.io import save_adapter
from pema.adapter.phases import phase_plan
from pema.adapter.train import PHASES
from pema.config import (PipelineConfig, ScheduleConfig, TrainConfig, flatten, to_dict, with_absolute_data,
                         with_overrides)
from pema.errors import ConfigError, MemoryFormatError
from pema.stages import plots
from pema.stages.logger import MetricLogger, NullLogger
from pema.stages.scoring import significance_against
from pema.stages.tables import compare_markdown, format_compare_table
from pema.formats.memory import MemoryReader
from pema.formats.layout import RunLayout, write_text_atomic
from pema.stages.decode import save_predictions, score, significance_metrics, translate
from pema.stages.inputs import adapter_meta, open_bundles, plm_or_client, split_pairs
from pema.stages.train import train_local
from pema.profiling import PeakMemory

SYSTEMS = ("zero_shot", "knn_lm", "lora", "pema_pd_only", "pema_no_rct", "pema_const", "pema_gu", "pema", "pema_knn")
DEFINITIONS = {
    "zero_shot": "the PLM alone",
    "knn_lm": "kNN-LM over the train memory: constant lam = knn.lam, k = knn.k, temperature knn.temperature",
    "lora": "PEFT LoRA on the PLM's weights (lora.*), loss on the target tokens only",
    "pema_pd_only": "the PEMA adapter's distribution alone: P_PEMA, constant lam = 1 (no mixing with P_LM)",
    "pema_no_rct": "a PEMA adapter trained without reconstruction (train.method = pd, b_pd_init random), "
                   "decoded with decode.gu",
    "pema_const": "the PEMA adapter (train.*), decoded with decode.const (constant lambda)",
    "pema_gu": "the PEMA adapter (train.*), decoded with decode.gu (Gradual Unrolling)",
    "pema": "the PEMA adapter (train.*), decoded with decode.pema (the recommended schedule, chosen on dev)",
    "pema_knn": "three-way mixture: (1 - lam) P_LM + lam ((1 - s) P_PEMA + s p_kNN), lam from decode.pema_knn, "
                "s = knn.pema_share, p_kNN as in knn_lm",
}
METRICS = ("bleu", "chrf", "ter", "train_s", "peak_train_mem_mb", "trainable_params", "decode_s_per_token")
PD_ONLY = ScheduleConfig(kind="constant", lam=1.0)  # log P = log P_PEMA exactly (interpolate handles lam = 1)
MAIN_ADAPTER = ("pema_pd_only", "pema_const", "pema_gu", "pema")  # the systems that share the cfg.train adapter
# (pema_knn shares it too, decoded with the kNN scorer blended in)


def _known_names(value: Iterable[str] | str, key: str, hint: str = "") -> list[str]:
    """``"a,b"`` or a sequence of names -> the list, each one of :data:`SYSTEMS` (ConfigError naming ``key``)."""
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        raise ConfigError(f"{key}={names!r}: unknown {unknown or 'empty list'}; choose from {SYSTEMS} "
                          f"(comma separated){hint}")
    return names


def _in_table_order(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(s for s in SYSTEMS if s in names)


def check_systems(systems: Iterable[str] | str) -> tuple[str, ...]:
    """``"all"``, ``"a,b"`` or a sequence of names -> the names in :data:`SYSTEMS` order (ConfigError otherwise)."""
    names = [s.strip() for s in systems.split(",")] if isinstance(systems, str) else list(systems)
    if names == ["all"]:
        return SYSTEMS
    return _in_table_order(_known_names(names, "systems", " or 'all'"))


def check_against(against: Iterable[str] | str | None, systems: Iterable[str]) -> tuple[str, ...]:
    """The baselines every system is tested against: ``"a,b"`` or a sequence of names, each one of ``systems`` (the
    systems that run), in :data:`SYSTEMS` order; None: ``("zero_shot",)`` when it runs, else ``()``. ConfigError
    (naming them) for unknown names or names that do not run."""
    systems = check_systems(systems)
    if against is None:
        return ("zero_shot",) if "zero_shot" in systems else ()
    if not isinstance(against, str) and not list(against):
        return ()  # no tests asked for (a checked default where zero_shot does not run)
    names = _known_names(against, "against")
    absent = [s for s in names if s not in systems]
    if absent:
        raise ConfigError(f"against={names!r}: {absent} not among the systems that run {systems}; add them to "
                          "--systems")
    return _in_table_order(names)


def no_rct_config(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with PD-only training (no reconstruction phase; there is no B_rct to start B_pd from)."""
    return with_overrides(cfg, {"train.method": "pd", "train.b_pd_init": "random"})


def decode_schedule(system: str, cfg: PipelineConfig) -> ScheduleConfig | None:
    """The lambda schedule ``system`` decodes with (None: the model alone, no mixing)."""
    return {"knn_lm": ScheduleConfig(kind="constant", lam=cfg.knn.lam), "pema_pd_only": PD_ONLY,
            "pema_no_rct": cfg.decode.gu, "pema_const": cfg.decode.const, "pema_gu": cfg.decode.gu,
            "pema": cfg.decode.pema, "pema_knn": cfg.decode.pema_knn}.get(system)


def blended_scorer(adapter, head, knn, share: float):
    """``key -> log((1 - share) P_PEMA + share p_kNN)``: the non-LM part of the ``pema_knn`` mixture, a plain
    weighted sum in log space (a token either distribution gives mass keeps it; share 0 and 1 are exact)."""
    def scorer(key):
        log_pema, log_knn = adapter.log_probs(key, head), knn(key)
        if share <= 0.0 or share >= 1.0:
            return log_knn if share >= 1.0 else log_pema
        return torch.logaddexp(log_pema + math.log1p(-share), log_knn + math.log(share))
    return scorer


def pema_trainable_params(adapter: torch.nn.Module, t: TrainConfig) -> int:
    """Parameters some phase of ``t.method`` updates (rct_pd: A, B_rct, B_pd; pd: A, B_pd)."""
    names = set().union(*(PHASES[p["phase"]] for p in phase_plan(t)))
    return sum(p.numel() for n, p in adapter.named_parameters() if n in names)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_memory_matches(cfg: PipelineConfig, output_dir) -> None:
    """MemoryFormatError unless memory/train, memory/dev and head/ exist and the memory holds ``data.train``."""
    out = Path(output_dir)
    if missing := RunLayout(out).missing():
        raise MemoryFormatError(f"{out} lacks {missing}: build the memory and head first (pema build; "
                                "the compare job does it when they are missing)")
    d = cfg.data
    pairs = len(split_pairs(cfg, "train"))
    built = MemoryReader(RunLayout(out).memory("train"), verify=False).manifest.num_examples
    if built != pairs:
        raise ConfigError(f"{out / 'memory' / 'train'} holds {built} examples but data.train (train_limit="
                          f"{d.train_limit}) gives {pairs} pairs: LoRA and PEMA would not train on the same data; "
                          "use another --output-dir or delete that memory")


def run_systems(cfg: PipelineConfig, output_dir, *, systems: Iterable[str] | str = SYSTEMS, progress: bool = True,
                log: Callable[[str], None] = print, against: Iterable[str] | str | None = None) -> dict:
    """Train what ``systems`` need, decode the test pairs with each and score them, each against every baseline
    of ``against`` (:func:`check_against`) when two or more systems run; writes ``predictions/<system>.jsonl`` and
    the trained adapters under ``compare/``. Returns ``{"rows": {system: row}, "timings_s": {...}}`` in
    :data:`SYSTEMS` order."""
    from pema.baselines.knn_index import load_knn
    from pema.owner.lora import save_lora, train_lora  # the PLM's weights: the owner's side
    from pema.owner.plm import load_plm

    systems = check_systems(systems)
    if cfg.resources.owner_url and "lora" in systems:
        raise ConfigError("lora trains the PLM's own weights, which the owner's service (resources.owner_url) does "
                          "not hand out: leave lora out of --systems or unset resources.owner_url")
    baselines = check_against(against, systems)
    out = Path(output_dir)
    check_memory_matches(cfg, out)
    timings, rows, hyps_by_system = {}, {}, {}
    test_pairs = split_pairs(cfg, "test")
    sources, refs = [p.source for p in test_pairs], [p.target for p in test_pairs]
    head, head_meta, train_reader, dev_reader = open_bundles(out)
    ratio = train_reader.manifest.target_source_ratio
    start = time.perf_counter()
    model, tokenizer = plm_or_client(cfg)  # the PLM, or the owner's service (resources.owner_url)
    timings["load_model"] = round(time.perf_counter() - start, 2)
    if cfg.resources.owner_url:  # the PLM's size is the owner's; only the data owner's parts are counted
        model_device, plm_params = torch.device("cpu"), 0
    else:
        model_device, plm_params = next(model.parameters()).device, n_params(model)

    def decode(system: str, decoder, cost: dict, **kw) -> None:
        start = time.perf_counter()
        kw.setdefault("ratio", ratio)  # the horizons H: GU and decode.length_cap (every system alike)
        hyps, result = translate(decoder, tokenizer, sources, cfg, schedule=decode_schedule(system, cfg),
                                 progress=progress, desc=system, **kw)
        timings[f"decode_{system}"] = round(time.perf_counter() - start, 2)
        row = score(hyps, refs, result, cfg.eval.postprocess)
        per_token = row.pop("seconds_per_token")
        rows[system] = {**row, **cost, "decode_s_per_token": per_token,
                        "generated_tokens": result.generated_tokens, "definition": DEFINITIONS[system]}
        hyps_by_system[system] = hyps
        save_predictions(RunLayout(out).prediction(system), test_pairs, hyps, result.lam_traces)
        log(f"compare: {system}: BLEU {row['bleu']:.2f}, chrF {row['chrf']:.2f}")

    translate(model, tokenizer, sources[:1], cfg, ratio=ratio)  # warm-up (first-call costs), so that no system's timing carries it
    if "zero_shot" in systems:
        decode("zero_shot", model, {"train_s": 0.0, "peak_train_mem_mb": 0.0, "memory_kind": "none",
                                    "trainable_params": 0, "total_params": plm_params})

    plans = {"pema": cfg} if set(MAIN_ADAPTER + ("pema_knn",)) & set(systems) else {}
    if "pema_no_rct" in systems:
        plans["pema_no_rct"] = no_rct_config(cfg)
    for name, pcfg in plans.items():
        with PeakMemory(pcfg.resources.device) as meter:
            start = time.perf_counter()
            trained = train_local(pcfg, out, progress=progress)
            seconds = time.perf_counter() - start
        adapter = trained.adapter
        timings[f"train_{name}"] = round(seconds, 2)
        save_adapter(adapter, RunLayout(out).compare / f"{name}_adapter",
                     adapter_meta(pcfg, head_meta, train_reader, train=to_dict(pcfg.train)))
        adapter, head = adapter.eval().to(model_device), head.to(model_device)
        cost = {"train_s": seconds, "peak_train_mem_mb": meter.peak_bytes / 2**20, "memory_kind": meter.kind,
                "trainable_params": pema_trainable_params(adapter, pcfg.train),
                "total_params": plm_params + n_params(adapter),
                "train_phases": [{k: p[k] for k in ("phase", "best_val", "steps")} for p in trained.phases]}
        log(f"compare: {name} adapter trained in {seconds:.1f} s ({[p['phase'] for p in trained.phases]})")
        for system in (MAIN_ADAPTER if name == "pema" else ("pema_no_rct",)):
            if system in systems:
                decode(system, model, cost, adapter=adapter, head=head, ratio=ratio)
        if name == "pema" and "pema_knn" in systems:
            knn = load_knn(RunLayout(out).memory("train"), cfg.knn, head_meta["vocab_size"], model_device,
                           d=head_meta["d"])
            decode("pema_knn", model, cost, scorer=blended_scorer(adapter, head, knn, cfg.knn.pema_share))
            del knn
        del adapter, trained

    if "knn_lm" in systems:
        with PeakMemory(model_device) as meter:
            start = time.perf_counter()
            scorer = load_knn(RunLayout(out).memory("train"), cfg.knn, head_meta["vocab_size"], model_device,
                              d=head_meta["d"])
            seconds = time.perf_counter() - start
        timings["index_knn_lm"] = round(seconds, 2)
        decode("knn_lm", model, {"train_s": seconds, "peak_train_mem_mb": meter.peak_bytes / 2**20,
                                 "memory_kind": meter.kind, "trainable_params": 0, "total_params": plm_params,
                                 "index_rows": len(scorer.index)}, scorer=scorer)
        del scorer

    if "lora" in systems:
        del model  # LoRA changes the PLM in place: it trains a fresh copy, and one copy at a time is enough
        gc.collect()
        train_pairs = split_pairs(cfg, "train")
        base, _ = load_plm(cfg.model.model_id, dtype=cfg.model.dtype, device=cfg.resources.device,
                           revision=cfg.model.revision)
        result = train_lora(base, tokenizer, train_pairs, cfg, progress=progress)
        timings["train_lora"] = round(result.train_seconds, 2)
        save_lora(result, RunLayout(out).compare / "lora")
        log(f"compare: lora trained in {result.train_seconds:.1f} s, loss per epoch {result.epoch_losses}")
        decode("lora", result.model, {"train_s": result.train_seconds, "peak_train_mem_mb": result.peak_bytes / 2**20,
                                      "memory_kind": result.memory_kind, "trainable_params": result.trainable_params,
                                      "total_params": result.total_params, "train_loss": result.epoch_losses})
    if baselines and len(systems) >= 2:
        start = time.perf_counter()
        for system, sig in significance_against({s: hyps_by_system[s] for s in systems}, refs, baselines).items():
            rows[system]["significance"] = sig
        timings["significance"] = round(time.perf_counter() - start, 2)
    return {"rows": {s: rows[s] for s in systems}, "timings_s": timings}


def system_params(system: str, cfg: PipelineConfig) -> dict[str, str]:
    """The settings that define ``system`` (its child scope's params)."""
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


def run_compare(cfg: PipelineConfig, output_dir: str | os.PathLike, executor, logger: MetricLogger | None = None, *,
                systems: Iterable[str] | str = SYSTEMS, against: Iterable[str] | str | None = None,
                progress: bool = True, logged: Iterable[str] = (), timings: dict | None = None) -> dict:
    """The compare stage: :func:`run_systems` as one ``executor.call``; then, on ``logger``, a child scope per
    system (tags ``pema.stage``, ``pema.system``, ``pema.memory_kind``; :func:`system_params`; the row's metrics and
    :func:`~pema.stages.decode.significance_metrics`) but for those in ``logged`` (a killed job's run, resumed,
    had finished them), ``<system>/<metric>`` on its own scope, ``compare.md``, ``compare.png`` and
    ``summary.json``. Merges the rows into ``<output_dir>/summary.json`` (one key per system, ``compare_table``,
    ``compare_timings_s``: ``timings`` first, ``compare_mlflow``: where the logs went) and returns that summary."""
    systems = check_systems(systems)
    against = check_against(against, systems)
    logger, out = logger or NullLogger(), Path(output_dir).resolve()
    start = time.perf_counter()
    found = executor.call(run_systems, with_absolute_data(cfg), str(out), systems=systems, progress=progress,
                          against=against, num_cpus=cfg.resources.eval_cpus,
                          gpu=cfg.resources.device.startswith("cuda"))
    timings = {**(timings or {}), "compare": round(time.perf_counter() - start, 2)}
    rows = found["rows"]
    for system, row in rows.items():
        if system in logged:
            continue
        with logger.stage(system, scope=True) as child:
            child.set_tags({"pema.stage": "compare", "pema.system": system, "pema.memory_kind": row["memory_kind"]})
            child.log_params(system_params(system, cfg))
            child.log_metrics({**{k: float(row[k]) for k in (*METRICS, "total_params")}, **significance_metrics(row)})
    logger.log_metrics({f"{s}/{k}": float(r[k]) for s, r in rows.items() for k in METRICS})
    for s, r in rows.items():
        if sig := significance_metrics(r, f"{s}/"):
            logger.log_metrics(sig)
    logger.log_text(compare_markdown(rows), "compare.md")
    logger.log_figure(plots.compare_bars(rows), "compare.png")
    path = RunLayout(out).summary
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(rows)
    summary.update({"compare_table": format_compare_table(rows), "compare_timings_s": {**timings, **found["timings_s"]}})
    if info := logger.info():
        summary["compare_mlflow"] = info
    write_text_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False))
    logger.log_artifact(path)
    return summary
