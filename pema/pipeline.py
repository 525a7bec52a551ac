"""The end-to-end PEMA run, stage by stage, in one process (no Ray, no MLflow).

Stages and their on-disk outputs under ``output_dir``:

- ``build_memory``  (PLM owner): ``memory/train``, ``memory/dev`` (Parquet parts + manifest)
- ``export_head``   (PLM owner): ``head/`` (safetensors + head.json)
- ``train``         (data owner): ``adapter/`` (safetensors + adapter.json), ``train_history.json``
- ``decode_*``      (both): ``predictions/<system>.jsonl``
- ``summary.json``: BLEU, chrF and TER per system and the stage timings; with ``zero_shot`` and at least one other
  system, each system's ``significance``: ``{"zero_shot": {"bleu": {"score", "mean", "ci", "ci_low", "ci_high",
  "p_value", "tied"}, "chrf": {..}, "ter": {..}, "baseline", "n_samples", "seed", "signatures"}}``, sacreBLEU's
  paired bootstrap test (:func:`pema.evaluate.paired_significance`, 1,000 resamples, fixed seed)
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pema.adapter.decode import GenerationSettings, generate
from pema.adapter.io import load_adapter, load_head, save_adapter
from pema.adapter.model import PemaAdapter
from pema.adapter.resident import ResidentMemory
from pema.adapter.schedule import Schedule, estimate_horizons, length_caps
from pema.adapter.phases import run_phases
from pema.adapter.train import target_vocab
from pema.config import PipelineConfig, ScheduleConfig, to_dict
from pema.evaluate import evaluate, format_interval, format_p, significance_against
from pema.memory import MemoryReader
from pema.tasks import (load_pairs, resolve_template, source_prompt_ids, source_token_count, stop_token_id,
                        use_chat_template)

SYSTEMS = ("zero_shot", "pema_const", "pema_gu", "pema")
SCHEDULES = {"pema_const": "const", "pema_gu": "gu", "pema": "pema"}  # system -> its decode.<schedule>


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 2)


def train_adapter(cfg: PipelineConfig, head, train_reader: MemoryReader, dev_reader: MemoryReader, *,
                  report=None, progress: bool = True, checkpoint=None, resume=None) -> tuple[PemaAdapter, list]:
    """RCT then RCT_PD (or PD only / RCT only) as ``cfg.train`` says; returns the adapter and phase results.
    ``checkpoint`` / ``resume``: as in :func:`~pema.adapter.phases.run_phases`."""
    t, a = cfg.train, cfg.adapter
    torch.manual_seed(t.seed)
    adapter = PemaAdapter(head.d, a.rank, a.alpha, a.dropout).to(t.device)
    head = head.to(t.device)
    if t.resident:  # the fast path: no per-batch file reads, keys stay on the device
        dtype = torch.float32 if t.device == "cpu" else torch.bfloat16
        train_mem = ResidentMemory.from_reader(train_reader, t.device, dtype)
        dev_mem = ResidentMemory.from_reader(dev_reader, t.device, dtype)
        train_batches = lambda epoch: train_mem.batches(t.batch_size, seed=t.seed * 1000 + epoch)
        dev_batches = lambda: dev_mem.batches(4096, shuffle=False)
    else:
        train_batches = lambda epoch: train_reader.iter_batches(t.batch_size, shuffle=True, seed=t.seed * 1000 + epoch)
        dev_batches = lambda: dev_reader.iter_batches(4096)
    subset = lambda: target_vocab(b["token"] for b in train_reader.iter_batches(65536)).to(t.device)
    results = run_phases(adapter, head, t, train_batches=train_batches, train_rows=len(train_reader),
                         dev_batches=dev_batches, vocab_subset=subset, report=report, progress=progress,
                         checkpoint=checkpoint, resume=resume)
    return adapter, results


def schedule_from(cfg: ScheduleConfig) -> Schedule:
    return Schedule(kind=cfg.kind, lam=cfg.lam, lam_max=cfg.lam_max, floor=cfg.floor, stop_lam=cfg.stop_lam)


BUNDLES = ("memory/train/manifest.json", "memory/dev/manifest.json", "head/head.json")


def missing_bundles(output_dir: str | os.PathLike) -> list[str]:
    """Which of the owner's outputs (train and dev memories, head) ``output_dir`` lacks; [] when all are there."""
    return [p for p in BUNDLES if not (Path(output_dir) / p).is_file()]


def open_bundles(output_dir: str | os.PathLike):
    """The data owner's inputs under ``output_dir``: ``(head, head_meta, train_reader, dev_reader)``, with both
    memories checked against the head (d, vocabulary, model id)."""
    out = Path(output_dir)
    head, head_meta = load_head(out / "head")
    train_reader, dev_reader = MemoryReader(out / "memory" / "train"), MemoryReader(out / "memory" / "dev")
    for reader in (train_reader, dev_reader):
        reader.check_compatible(d=head_meta["d"], vocab_size=head_meta["vocab_size"], model_id=head_meta["model_id"])
    return head, head_meta, train_reader, dev_reader


def adapter_meta(cfg: PipelineConfig, head_meta: dict, train_reader: MemoryReader, **extra) -> dict:
    """The JSON that travels with a trained adapter bundle (the target/source ratio sets the GU horizons)."""
    return {"model_id": head_meta["model_id"], "config": to_dict(cfg.adapter),
            "target_source_ratio": train_reader.manifest.target_source_ratio, **extra}


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
    with open(path, "w", encoding="utf-8") as f:
        for p, h, lam in zip(pairs, hyps, lam_traces):
            f.write(json.dumps({"index": p.index, "source": p.source, "reference": p.target, "hypothesis": h,
                                "lam": [round(x, 4) for x in lam]}, ensure_ascii=False) + "\n")


def run_pipeline(cfg: PipelineConfig, output_dir: str | os.PathLike, *, progress: bool = True,
                 log=print) -> dict:
    """Run every stage; returns the summary (also written to ``output_dir/summary.json``)."""
    from pema.owner.build import build_memory  # the owner's side, kept behind this boundary
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    d = cfg.data
    template = resolve_template(d.template)
    fields = dict(source_field=d.source_field, target_field=d.target_field)
    train_pairs = load_pairs(d.train, limit=d.train_limit, **fields)
    dev_pairs = load_pairs(d.dev, limit=d.dev_limit, **fields)
    load_pairs(d.test, limit=d.test_limit, **fields)  # fail on a bad test file before hours of work
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    with timer.stage("load_model"):
        model, tokenizer = load_plm(cfg.model.model_id, dtype=cfg.model.dtype, device=cfg.model.device,
                                    revision=cfg.model.revision)
        chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    build_kw = dict(model_id=cfg.model.model_id, model_revision=cfg.model.revision, template=template,
                    source_field=d.source_field, chat=chat, dtype=cfg.memory.dtype,
                    rows_per_part=cfg.memory.rows_per_part, batch_tokens=cfg.memory.batch_tokens, progress=progress)
    with timer.stage("build_memory"):
        train_manifest = build_memory(model, tokenizer, train_pairs, out / "memory" / "train", **build_kw)
        build_memory(model, tokenizer, dev_pairs, out / "memory" / "dev", **build_kw)
    log(f"memory: {train_manifest.total_rows} train rows from {train_manifest.num_examples} pairs")
    with timer.stage("export_head"):
        export_head(model, out / "head", model_id=cfg.model.model_id, model_revision=cfg.model.revision,
                    tokenizer_hash=train_manifest.tokenizer_hash)

    # ---- data owner: only the head bundle and the memories from here on ----
    head, head_meta, train_reader, dev_reader = open_bundles(out)
    history: list[dict] = []
    with timer.stage("train"):
        adapter, results = train_adapter(cfg, head, train_reader, dev_reader, report=history.append, progress=progress)
    save_adapter(adapter, out / "adapter", adapter_meta(cfg, head_meta, train_reader))
    (out / "train_history.json").write_text(json.dumps(history, indent=2))
    for r in results:
        log(f"{r.phase}: best val loss {r.best_val:.4f} at step {r.best_step} of {r.steps} "
            f"({r.entries_per_s:,.0f} rows/s{', stopped early' if r.stopped_early else ''})")
    summary = decode_and_score(cfg, out, model=model, tokenizer=tokenizer, progress=progress)
    summary["timings_s"] = {**timer.timings, **summary["timings_s"]}
    summary["train"] = [{"phase": r.phase, "best_val": r.best_val, "steps": r.steps, "rows_per_s": r.entries_per_s}
                        for r in results]
    summary["memory_rows"] = train_manifest.total_rows
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def translate(model, tokenizer, sources: list[str], cfg: PipelineConfig, *, adapter=None, head=None,
              schedule: ScheduleConfig | None = None, ratio: float | None = None, progress: bool = False,
              desc: str = "decode", scorer=None):
    """Decode ``sources`` with the PLM alone (no ``adapter``/``scorer``), mixed with PEMA (``adapter`` + ``head``)
    or mixed with another distribution of the owner's key (``scorer(key (rows, d)) -> log-probs (rows, vocab)``,
    e.g. the kNN-LM baseline of ``pema.baselines.knn_index.load_knn``), under ``schedule``.

    ``ratio`` (target/source tokens of the training memory) sets the Gradual Unrolling horizons; a constant schedule
    does not use them and takes ratio 1.0 when it is None. Returns the hypotheses and the
    :class:`~pema.adapter.decode.GenerationResult` (lambda traces, timing)."""
    from pema.owner.respond import ContextTap  # the PLM's responses come from the owner's side

    d, dc = cfg.data, cfg.decode
    chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    template = resolve_template(d.template)
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
    horizons = estimate_horizons([source_token_count(tokenizer, src) for src in sources], ratio or 1.0)
    if dc.length_cap is not None:  # every system alike, zero-shot included
        mix_kw["length_caps"] = length_caps(horizons, dc.length_cap)
    if mixing:
        if adapter is not None and scorer is not None:
            raise ValueError("pass either adapter and head (PEMA) or scorer (e.g. kNN-LM), not both")
        if schedule is None:
            raise ValueError("schedule=None: mixed decoding needs a ScheduleConfig, e.g. "
                             "ScheduleConfig(kind='constant', lam=cfg.knn.lam) for kNN-LM")
        mix_kw.update(key_source=ContextTap(model), schedule=schedule_from(schedule), horizons=horizons)
        mix_kw.update(dict(adapter=adapter, head=head) if scorer is None else dict(scorer=scorer))
    result = generate(model, prompts, stop_token_id=stop, pad_token_id=pad, settings=settings, progress=progress,
                      desc=desc, **mix_kw)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result.token_ids], result


def decode_and_score(cfg: PipelineConfig, output_dir: str | os.PathLike, *, model=None, tokenizer=None,
                     progress: bool = True, split: str = "test", systems: tuple[str, ...] = SYSTEMS,
                     write_predictions: bool = True, adapter_dir: str | os.PathLike | None = None) -> dict:
    """Decode the ``split`` pairs (``test`` or ``dev``) with each of ``systems`` and score them.

    Reads ``head/`` and ``adapter/`` under ``output_dir`` (or the adapter bundle at ``adapter_dir``); writes ``predictions/<system>.jsonl`` (test split). The
    PLM (loaded here unless passed in) answers the context queries through the owner's ContextTap.
    Returns ``{system: scores, ..., "timings_s": {...}}``. With ``zero_shot`` and at least one other system, each
    system's scores get ``significance`` against ``zero_shot`` (paired bootstrap on the raw hypotheses; see the
    module docstring).
    """
    from pema.owner.plm import load_plm  # the PLM's responses come from the owner's side

    if split not in ("test", "dev") or not set(systems) <= set(SYSTEMS):
        raise ValueError(f"split={split!r} must be 'test' or 'dev' and systems={systems!r} a subset of {SYSTEMS}")
    out = Path(output_dir)
    timer = Timer()
    d = cfg.data
    pairs = load_pairs(getattr(d, split), limit=getattr(d, f"{split}_limit"), source_field=d.source_field,
                       target_field=d.target_field)
    head, head_meta = load_head(out / "head")
    adapter, adapter_meta = load_adapter(adapter_dir if adapter_dir is not None else out / "adapter", head_meta)
    if model is None:
        with timer.stage("load_model"):
            model, tokenizer = load_plm(cfg.model.model_id, dtype=cfg.model.dtype, device=cfg.model.device,
                                        revision=cfg.model.revision)
    model_device = next(model.parameters()).device  # decode where the PLM's scores are (GPU when it is there)
    adapter, head = adapter.to(model_device), head.to(model_device)
    ratio = adapter_meta.get("target_source_ratio") or MemoryReader(out / "memory" / "train").manifest.target_source_ratio
    sources, refs = [p.source for p in pairs], [p.target for p in pairs]
    summary: dict = {}
    hyps_by_system: dict[str, list[str]] = {}
    for system in systems:
        kw = {"ratio": ratio}  # the horizons H: GU and decode.length_cap (every system alike)
        if system != "zero_shot":
            kw.update(adapter=adapter, head=head, schedule=getattr(cfg.decode, SCHEDULES[system]))
        with timer.stage(f"decode_{system}"):
            hyps, result = translate(model, tokenizer, sources, cfg, progress=progress, desc=system, **kw)
        summary[system] = score(hyps, refs, result, cfg.eval.postprocess)
        hyps_by_system[system] = hyps
        if write_predictions:
            save_predictions(out / "predictions" / f"{system}.jsonl", pairs, hyps, result.lam_traces)
    if "zero_shot" in hyps_by_system and len(hyps_by_system) >= 2:
        with timer.stage("significance"):
            for system, sig in significance_against(hyps_by_system, refs, ["zero_shot"]).items():
                summary[system]["significance"] = sig
    summary["timings_s"] = timer.timings
    return summary


def format_table(summary: dict, baseline: str = "zero_shot") -> str:
    """The systems in ``summary`` (in :data:`SYSTEMS` order): BLEU and chrF with their 95% bootstrap interval and
    p-value against ``baseline`` (when ``significance`` is there), TER; then the stage timings."""
    systems = [s for s in SYSTEMS if isinstance(summary.get(s), dict)]
    w = max([12, *map(len, systems)])
    p_head = f"p vs {baseline}"
    lines = [f"{'system':<{w}} {'BLEU [95% CI]':>24} {p_head:>{len(p_head)}} {'chrF [95% CI]':>24} "
             f"{p_head:>{len(p_head)}} {'TER':>7}"]
    for system in systems:
        s = summary[system]
        sig = s.get("significance", {}).get(baseline, {})
        bleu, chrf = sig.get("bleu"), sig.get("chrf")
        lines.append(f"{system:<{w}} {format_interval(bleu, s['bleu']):>24} {format_p(bleu):>{len(p_head)}} "
                     f"{format_interval(chrf, s['chrf']):>24} {format_p(chrf):>{len(p_head)}} {s['ter']:>7.2f}")
    if any("significance" in summary[s] for s in systems):
        lines.append(f"(sacreBLEU paired bootstrap: 95% interval around the bootstrap mean, p against {baseline})")
    lines.append("")
    lines.append(f"{'stage':<20} {'seconds':>8}")
    for stage, sec in summary["timings_s"].items():
        lines.append(f"{stage:<20} {sec:>8.1f}")
    return "\n".join(lines)
