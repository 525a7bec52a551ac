"""Every result table is formatted in one module (pema.stages.tables); these pin the exact text of each from fixed
numbers, so that moving or reworking the code cannot change what the console, summary.json and compare.md show."""
from __future__ import annotations

from pema.stages.tables import compare_markdown, format_compare_table, format_interval, format_p, format_table


def sig(score, low, high, p):
    return {"score": score, "mean": (low + high) / 2, "ci": (high - low) / 2, "ci_low": low, "ci_high": high,
            "p_value": p, "tied": False}


def row(bleu, chrf, ter, p):
    return {"bleu": bleu, "chrf": chrf, "ter": ter,
            "significance": {"zero_shot": {"bleu": sig(bleu, bleu - 0.3, bleu + 0.4, p),
                                           "chrf": sig(chrf, chrf - 1.5, chrf + 1.25, p and p / 2)}}}


def test_the_pipeline_table_text_is_pinned():
    summary = {"zero_shot": row(0.74, 15.93, 101.5, None), "pema_gu": row(0.83, 15.86, 99.25, 0.0421),
               "pema": row(1.5, 17.0, 98.0, 0.0002),
               "ood_test": {"zero_shot": row(2.0, 20.0, 90.0, None), "pema": row(2.5, 21.0, 89.0, 0.5)},
               "tables": {"test": {"file": "data/nc/test.jsonl", "pairs": 200},
                          "ood_test": {"file": "data/wmt22/test.jsonl", "pairs": 100}},
               "timings_s": {"build_memory": 12.345, "decode_pema": 1.0}}
    head = ("system                  BLEU [95% CI] p vs zero_shot            chrF [95% CI] p vs zero_shot     TER")
    note = "(sacreBLEU paired bootstrap: 95% interval around the bootstrap mean, p against zero_shot)"
    assert format_table(summary) == "\n".join([
        "test: 200 pairs of data/nc/test.jsonl",
        head,
        "zero_shot           0.74 [0.44, 1.14]              -     15.93 [14.43, 17.18]              -  101.50",
        "pema_gu             0.83 [0.53, 1.23]          0.042     15.86 [14.36, 17.11]          0.021   99.25",
        "pema                1.50 [1.20, 1.90]         <0.001     17.00 [15.50, 18.25]         <0.001   98.00",
        note,
        "",
        "ood_test: 100 pairs of data/wmt22/test.jsonl",
        head,
        "zero_shot           2.00 [1.70, 2.40]              -     20.00 [18.50, 21.25]              -   90.00",
        "pema                2.50 [2.20, 2.90]          0.500     21.00 [19.50, 22.25]          0.250   89.00",
        note,
        "",
        "stage                 seconds",
        "build_memory             12.3",
        "decode_pema               1.0"])


def test_the_compare_table_and_its_markdown_are_pinned():
    costs = ({"train_s": 0.0, "peak_train_mem_mb": 0.0, "trainable_params": 0, "decode_s_per_token": 0.0125},
             {"train_s": 12.34, "peak_train_mem_mb": 56.78, "trainable_params": 3072, "decode_s_per_token": 0.02})
    rows = {"zero_shot": {**row(1.234, 2.468, 98.77, None), **costs[0]},
            "pema_gu": {**row(3.0, 6.5, 95.0, 0.0009), **costs[1]}}
    table = "\n".join([
        "| system | BLEU [95% CI] | chrF [95% CI] | TER | p BLEU vs zero_shot | p chrF vs zero_shot | train s | "
        "peak train MB | trainable params | decode ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| zero_shot | 1.23 [0.93, 1.63] | 2.47 [0.97, 3.72] | 98.77 | - | - | 0.0 | 0.0 | 0 | 12.50 |",
        "| pema_gu | 3.00 [2.70, 3.40] | 6.50 [5.00, 7.75] | 95.00 | 0.001 | <0.001 | 12.3 | 56.8 | 3,072 | 20.00 |"])
    assert format_compare_table(rows) == table
    assert compare_markdown(rows) == (
        f"{table}\n\npeak train MB: the training's peak above its start; cpu_rss = sampled process RSS, "
        "cuda_allocated = torch's allocator (not comparable with each other); kNN-LM: building its index\n")


def test_cells():
    m = {"score": 0.83, "ci_low": 0.51, "ci_high": 1.2, "p_value": 0.0421}
    assert format_interval(m) == "0.83 [0.51, 1.20]" and format_interval(None, 1.0) == "1.00"
    assert format_interval(None) == "-"
    assert format_p(m) == "0.042" and format_p({"p_value": None}) == "-" and format_p(None) == "-"
    assert format_p({"p_value": 1 / 10001}) == "<0.001"
