"""Every result table, formatted in one place: the test tables the pipeline and the evaluate job print (and
``summary.json`` keeps), and the compare job's Markdown table (``compare.md``, ``summary.json``'s
``compare_table``). Cells: a score with sacreBLEU's 95% bootstrap interval (:func:`format_interval`) and a p-value
(:func:`format_p`)."""
from __future__ import annotations

from pema.stages.decode import SYSTEMS

MEMORY_NOTE = ("peak train MB: the training's peak above its start; cpu_rss = sampled process RSS, cuda_allocated "
               "= torch's allocator (not comparable with each other); kNN-LM: building its index")


def format_interval(m: dict | None, score: float | None = None) -> str:
    """``"0.83 [0.51, 1.20]"``: the score and sacreBLEU's 95% bootstrap interval (just the score without one)."""
    if m is None:
        return "-" if score is None else f"{score:.2f}"
    return f"{m['score']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


def format_p(m: dict | None) -> str:
    """The p-value with three decimals (``"-"`` for the baseline itself or no test); ``"<0.001"`` below 0.001."""
    if m is None or m.get("p_value") is None:
        return "-"
    p = m["p_value"]
    return "<0.001" if p < 0.0005 else f"{p:.3f}"


def format_table(summary: dict, baseline: str = "zero_shot") -> str:
    """The test table (the systems in ``summary``, in :data:`SYSTEMS` order): BLEU and chrF with their 95% bootstrap
    interval and p-value against ``baseline`` (when ``significance`` is there), TER; with ``summary["ood_test"]``
    the second test set's table the same way, each under a title naming its pairs; then the stage timings."""
    lines = []
    for key, scores in (("test", summary), ("ood_test", summary.get("ood_test"))):
        if isinstance(scores, dict):
            info = summary.get("tables", {}).get(key)
            if info and "ood_test" in summary:  # a title only where there are two tables
                lines.append(f"{key}: {info['pairs']} pairs of {info['file']}")
            lines += [_score_table(scores, baseline), ""]
    lines.append(f"{'stage':<20} {'seconds':>8}")
    for stage, sec in summary["timings_s"].items():
        lines.append(f"{stage:<20} {sec:>8.1f}")
    return "\n".join(lines)


def _score_table(summary: dict, baseline: str) -> str:
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
    return "\n".join(lines)


def table_baselines(rows: dict[str, dict]) -> list[str]:
    """The baselines the rows were tested against, in order of first appearance."""
    return list(dict.fromkeys(b for r in rows.values() for b in r.get("significance", {})))


def format_compare_table(rows: dict[str, dict]) -> str:
    """Markdown table of ``{system: row}``, in the mapping's order: BLEU and chrF with their 95% bootstrap interval
    (when the rows have ``significance``), TER, a BLEU and a chrF p-value column per baseline, then the costs."""
    baselines = table_baselines(rows)
    p_heads = [f"p {m} vs {b}" for b in baselines for m in ("BLEU", "chrF")]
    heads = ["system", "BLEU [95% CI]" if baselines else "BLEU", "chrF [95% CI]" if baselines else "chrF", "TER",
             *p_heads, "train s", "peak train MB", "trainable params", "decode ms/token"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for system, r in rows.items():
        sig = r.get("significance", {})
        first = sig.get(baselines[0], {}) if baselines else {}  # a system's interval is the same against each
        p_cells = [format_p(sig.get(b, {}).get(m)) for b in baselines for m in ("bleu", "chrf")]
        cells = [system, format_interval(first.get("bleu"), r["bleu"]), format_interval(first.get("chrf"), r["chrf"]),
                 f"{r['ter']:.2f}", *p_cells, f"{r['train_s']:.1f}", f"{r['peak_train_mem_mb']:.1f}",
                 f"{int(r['trainable_params']):,}", f"{1000 * r['decode_s_per_token']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_markdown(rows: dict[str, dict]) -> str:
    """``compare.md``: the compare table and the note on what the memory column measures."""
    return f"{format_compare_table(rows)}\n\n{MEMORY_NOTE}\n"
