"""Decoding and scoring, written once: the PLM alone (``zero_shot``) and mixed with the adapter under each lambda
schedule (``pema_const``, ``pema_gu``, ``pema``), or with another distribution of the owner's key (kNN-LM).

- :func:`translate`: one batch of sources through :func:`pema.adapter.decode.generate`; the PLM's responses (its
  context keys and next-token distributions) come from the owner's side (:class:`~pema.owner.respond.ContextTap`).
- :func:`decode_and_score`: every system on the ``test`` or ``dev`` pairs, scored (BLEU, chrF, TER, seconds per
  token) and, with ``zero_shot`` and one more system, each system's ``significance``: ``{"zero_shot": {"bleu":
  {"score", "mean", "ci", "ci_low", "ci_high", "p_value", "tied"}, "chrf": {..}, "ter": {..}, "baseline",
  "n_samples", "seed", "signatures"}}``, sacreBLEU's paired bootstrap test
  (:func:`pema.stages.scoring.paired_significance`, 1,000 resamples, fixed seed). Writes
  ``predictions/<system>.jsonl``.
- :func:`run_evaluate`: the evaluate stage: :func:`decode_and_score` on an executor (a Ray task on a GPU when there
  is one), its scores, predictions and lambda figure logged.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from pema.adapter.decode import GenerationSettings, generate
from pema.adapter.remote import OwnerClient
from pema.adapter.remote_decode import generate_remote
from pema.adapter.io import load_adapter, load_head
from pema.adapter.schedule import Schedule, estimate_horizons, length_caps
from pema.config import PipelineConfig, ScheduleConfig
from pema.formats.layout import RunLayout, source_of, write_text_atomic
from pema.formats.memory import read_manifest
from pema.profiling import Timer
from pema.formats.tasks import (OverlengthError, prompt_token_bound, resolve_template, source_prompt_ids,
                                 source_token_count, stop_token_id, use_chat_template)
from pema.stages import plots
from pema.stages.inputs import cleaned_splits, plm_or_client
from pema.stages.logger import MetricLogger, NullLogger
from pema.stages.scoring import evaluate, significance_against

SYSTEMS = ("zero_shot", "pema_const", "pema_gu", "pema")
SCHEDULES = {"pema_const": "const", "pema_gu": "gu", "pema": "pema"}  # system -> its decode.<schedule>


def schedule_from(cfg: ScheduleConfig) -> Schedule:
    return Schedule(kind=cfg.kind, lam=cfg.lam, lam_max=cfg.lam_max, floor=cfg.floor, stop_lam=cfg.stop_lam)


def score(hyps: list[str], refs: list[str], result, postprocess: bool) -> dict:
    """BLEU, chrF, TER (raw, with signatures; ``post`` too with post-processing) and seconds per generated token."""
    scores = evaluate(hyps, refs, postprocess=postprocess)
    raw = scores["raw"]
    row = {"bleu": raw["bleu"], "chrf": raw["chrf"], "ter": raw["ter"], "signatures": raw["signatures"],
           "seconds_per_token": result.seconds_per_token}
    if scores["post"] is not None:
        row["post"] = {k: scores["post"][k] for k in ("bleu", "chrf", "ter")}
    return row


def save_predictions(path: str | os.PathLike, pairs, hyps: list[str], lam_traces: list[list[float]]) -> None:
    """One JSON object per pair: index, source, reference, hypothesis and the lambda used at each step."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"index": p.index, "source": p.source, "reference": p.target, "hypothesis": h,
                         "lam": [round(x, 4) for x in lam]}, ensure_ascii=False) + "\n"
             for p, h, lam in zip(pairs, hyps, lam_traces))
    write_text_atomic(path, "".join(lines))  # a failed write leaves no half file


def translate(model, tokenizer, sources: list[str], cfg: PipelineConfig, *, adapter=None, head=None,
              schedule: ScheduleConfig | None = None, ratio: float | None = None, progress: bool = False,
              desc: str = "decode", scorer=None, plm_head=None):
    """Decode ``sources`` with the PLM alone (no ``adapter``/``scorer``), mixed with PEMA (``adapter`` + ``head``)
    or mixed with another distribution of the owner's key (``scorer(key (rows, d)) -> log-probs (rows, vocab)``,
    e.g. the kNN-LM baseline of ``pema.baselines.knn_index.load_knn``), under ``schedule``.

    ``ratio`` (target/source tokens of the training memory) sets the Gradual Unrolling horizons; a constant schedule
    does not use them and takes ratio 1.0 when it is None. Returns the hypotheses and the
    :class:`~pema.adapter.decode.GenerationResult` (lambda traces, timing). ``model`` may be an
    :class:`~pema.adapter.remote.OwnerClient`: the PLM's answers then come from the owner's service (greedy), as
    keys that ``plm_head`` (the owner's head bundle; by default ``head``, else fetched from the service) turns into
    the PLM's logits.

    Every source must be within ``data.max_tokens`` (the files' texts are held to it when read, cut or refused as
    ``data.overlength`` says): one over it is an OverlengthError, and so is a prompt over the bound that follows
    from it (:func:`~pema.formats.tasks.prompt_token_bound`), before anything is decoded."""
    d, dc = cfg.data, cfg.decode
    chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    template = resolve_template(d.template)
    source_tokens = [source_token_count(tokenizer, src) for src in sources]
    if over := [i for i, n in enumerate(source_tokens) if n > d.max_tokens]:
        raise OverlengthError(f"source {over[0]} of {len(sources)} has {source_tokens[over[0]]:,} tokens, over "
                              f"data.max_tokens={d.max_tokens} ({len(over)} source(s) over it); cut it to "
                              "data.max_tokens (pema.formats.tasks.cut_to_tokens) or raise data.max_tokens")
    prompts = [source_prompt_ids(tokenizer, template, src, source_field=d.source_field, chat=chat) for src in sources]
    settings = GenerationSettings(**{f.name: getattr(dc, f.name) for f in dataclasses.fields(GenerationSettings)})
    stop = stop_token_id(tokenizer, chat=chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    mix_kw, mixing = {}, adapter is not None or scorer is not None
    if ratio is None and dc.length_cap is not None:
        raise ValueError("ratio=None: decode.length_cap needs the training memory's target/source token ratio "
                         "(manifest.target_source_ratio) for the horizons H")
    if mixing and ratio is None and schedule is not None and schedule.kind != "constant":
        raise ValueError(f"ratio=None: schedule kind {schedule.kind!r} needs the training memory's "
                         "target/source token ratio (manifest.target_source_ratio) for its horizons")
    horizons = estimate_horizons(source_tokens, ratio or 1.0)
    if dc.length_cap is not None:  # every system alike, zero-shot included
        mix_kw["length_caps"] = length_caps(horizons, dc.length_cap)
    if mixing:
        if adapter is not None and scorer is not None:
            raise ValueError("pass either adapter and head (PEMA) or scorer (e.g. kNN-LM), not both")
        if schedule is None:
            raise ValueError("schedule=None: mixed decoding needs a ScheduleConfig, e.g. "
                             "ScheduleConfig(kind='constant', lam=cfg.knn.lam) for kNN-LM")
        mix_kw.update(schedule=schedule_from(schedule), horizons=horizons)
        if not isinstance(model, OwnerClient):
            from pema.owner.respond import ContextTap  # the PLM's responses come from the owner's side

            mix_kw["key_source"] = ContextTap(model)
        mix_kw.update(dict(adapter=adapter, head=head) if scorer is None else dict(scorer=scorer))
    if isinstance(model, OwnerClient):
        decoder, mix_kw["plm_head"] = generate_remote, plm_head
    else:
        decoder = generate
        mix_kw["max_prompt_tokens"] = prompt_token_bound(tokenizer, template, d.max_tokens,
                                                         source_field=d.source_field, chat=chat)
    result = decoder(model, prompts, stop_token_id=stop, pad_token_id=pad, settings=settings, progress=progress,
                     desc=desc, **mix_kw)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result.token_ids], result


def decode_and_score(cfg: PipelineConfig, output_dir: str | os.PathLike, *, model=None, tokenizer=None,
                     progress: bool = True, split: str = "test", systems: tuple[str, ...] = SYSTEMS,
                     write_predictions: bool = True, adapter_dir: str | os.PathLike | None = None) -> dict:
    """Decode the ``split`` pairs (``test`` or ``dev``) with each of ``systems`` and score them.

    Reads ``head/`` and ``adapter/`` under ``output_dir`` (or the adapter bundle at ``adapter_dir``); writes
    ``predictions/<system>.jsonl`` (the test split; ``predictions/<split>/<system>.jsonl`` for another). The
    PLM (loaded here unless passed in) answers the context queries through the owner's ContextTap, or the owner's
    service does (greedy, on its session steps) when ``resources.owner_url`` is set: no PLM weights are loaded here.
    Returns ``{system: scores, ..., "timings_s": {...}, "pairs": n, "truncated": texts of the split cut to
    ``data.max_tokens``}``. With ``zero_shot`` and at least one other system, each system's scores get
    ``significance`` against ``zero_shot`` (paired bootstrap on the raw hypotheses; see the module docstring).
    """

    if split not in ("test", "dev", "ood_test") or not set(systems) <= set(SYSTEMS):
        raise ValueError(f"split={split!r} must be 'test', 'ood_test' or 'dev' and systems={systems!r} a subset of "
                         f"{SYSTEMS}")
    layout = RunLayout(output_dir)
    timer = Timer()
    head, head_meta = load_head(layout.head)
    adapter, adapter_meta = load_adapter(adapter_dir if adapter_dir is not None else layout.adapter, head_meta)
    if model is None:  # the PLM here, or the owner's service (resources.owner_url): no PLM weights here
        with timer.stage("load_model"):
            model, tokenizer = plm_or_client(cfg)
    kept, report = cleaned_splits(cfg, split, tokenizer=tokenizer)  # every text counted with the model's tokenizer
    pairs = kept[split]
    remote = isinstance(model, OwnerClient)
    model_device = "cpu" if remote else next(model.parameters()).device  # where the PLM's scores are
    adapter, head = adapter.to(model_device), head.to(model_device)
    ratio = adapter_meta.get("target_source_ratio") or read_manifest(layout.memory("train")).target_source_ratio
    sources, refs = [p.source for p in pairs], [p.target for p in pairs]
    summary: dict = {}
    hyps_by_system: dict[str, list[str]] = {}
    for system in systems:
        kw = {"ratio": ratio}  # the horizons H: GU and decode.length_cap (every system alike)
        if system != "zero_shot":
            kw.update(adapter=adapter, head=head, schedule=getattr(cfg.decode, SCHEDULES[system]))
        with timer.stage(f"decode_{system}"):
            hyps, result = translate(model, tokenizer, sources, cfg, progress=progress, desc=system, plm_head=head, **kw)
        summary[system] = score(hyps, refs, result, cfg.eval.postprocess)
        hyps_by_system[system] = hyps
        if write_predictions:
            save_predictions(layout.prediction(system, layout.predictions / split if split != "test" else None),
                             pairs, hyps, result.lam_traces)
    if "zero_shot" in hyps_by_system and len(hyps_by_system) >= 2:
        with timer.stage("significance"):
            for system, sig in significance_against(hyps_by_system, refs, ["zero_shot"]).items():
                summary[system]["significance"] = sig
    summary["timings_s"] = timer.timings
    summary["pairs"], summary["truncated"] = len(pairs), report.truncated.get(split, 0)
    return summary




def run_evaluate(cfg: PipelineConfig, output_dir: str | os.PathLike, executor, logger: MetricLogger | None = None, *,
                 progress: bool = True) -> dict:
    """The evaluate stage: every system on the test pairs, decoded by ``executor.call`` (a Ray task, on a GPU when
    ``resources.device`` is CUDA and the cluster has one); logs the scores, the timings, the predictions and the
    lambda actually used at each generated token. Returns the scores."""
    layout, logger = RunLayout(output_dir), logger or NullLogger()
    scores = executor.call(decode_test_sets, cfg, str(layout.root), progress=progress,
                           num_cpus=cfg.resources.eval_cpus, gpu=cfg.resources.device.startswith("cuda"))
    log_scores(logger, scores)
    if "ood_test" in scores:
        log_scores(logger, scores["ood_test"], "ood_test/")
    logger.log_metrics({**{f"{k}_s": float(v) for k, v in scores["timings_s"].items()},
                        **{f"truncated/{s}": float(n) for s, n in scores.get("truncated", {}).items()}})
    logger.log_artifact(layout.predictions, "predictions")
    traces = {}
    for system in [s for s in cfg.eval.systems if s != "zero_shot"]:
        with open(layout.prediction(system), encoding="utf-8") as f:
            traces[system] = [json.loads(line)["lam"] for line in f]
    if traces:
        logger.log_figure(plots.lambda_schedules(traces), "lambda_schedule.png")
    return scores


def decode_test_sets(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """The ``eval.systems`` on the test pairs and, with ``data.ood_test``, on those too (the PLM loaded once): the
    test split's scores with the other's under ``"ood_test"`` and both timings under ``"timings_s"``."""
    timer = Timer()
    with timer.stage("load_model"):
        model, tokenizer = plm_or_client(cfg)
    scores = decode_and_score(cfg, output_dir, model=model, tokenizer=tokenizer, progress=progress,
                              systems=cfg.eval.systems)
    scores["timings_s"] = {**timer.timings, **scores["timings_s"]}
    scores["tables"] = {"test": {"file": source_of(cfg.data.test), "pairs": scores.pop("pairs")}}
    scores["truncated"] = {"test": scores.pop("truncated")}  # texts cut to data.max_tokens (data.overlength)
    if cfg.data.ood_test is not None:
        ood = decode_and_score(cfg, output_dir, model=model, tokenizer=tokenizer, progress=progress,
                               split="ood_test", systems=cfg.eval.systems)
        scores["timings_s"].update({f"ood_test_{k}": v for k, v in ood.pop("timings_s").items()})
        scores["tables"]["ood_test"] = {"file": source_of(cfg.data.ood_test), "pairs": ood.pop("pairs")}
        scores["truncated"]["ood_test"] = ood.pop("truncated")
        scores["ood_test"] = ood
    return scores


SIGNIFICANCE_METRICS = ("bleu", "chrf", "ter")


def significance_metrics(row: dict, prefix: str = "") -> dict[str, float]:
    """Metrics from a row's ``significance`` (``{baseline: entry}``): ``<prefix><metric>_ci_low``, ``_ci_high``,
    ``_p`` (against ``zero_shot``) and ``_p_vs_<baseline>`` (other baselines); {} without one."""
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


def log_scores(logger: MetricLogger, scores: dict, prefix: str = "") -> None:
    """Scores, seconds per token and the significance metrics of every system in ``scores`` (its order)."""
    for system, s in scores.items():
        if isinstance(s, dict) and "bleu" in s:
            metrics = {f"{prefix}{system}/{k}": float(s[k]) for k in ("bleu", "chrf", "ter", "seconds_per_token")
                       if k in s}
            logger.log_metrics({**metrics, **significance_metrics(s, f"{prefix}{system}/")})
