"""The compare job (pema.jobs.compare): the systems' definitions, the table, and the job end to end on the
smoke config against a real local Ray cluster, with its MLflow runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pema.adapter.model import PemaAdapter
from pema.adapter.phases import phase_plan
from pema.config import ScheduleConfig, load_config
from pema.errors import ConfigError, MemoryFormatError
from pema.jobs.compare import STATE
from pema.stages.compare import (SYSTEMS, check_against, check_memory_matches, check_systems, decode_schedule,
                                 no_rct_config, pema_trainable_params, system_params)
from pema.stages.decode import schedule_from
from pema.stages.ledger import config_digest
from pema.stages.tables import format_compare_table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
METRICS = ("bleu", "chrf", "ter", "train_s", "peak_train_mem_mb", "trainable_params", "decode_s_per_token")


def row(bleu, train_s, mb, params, spt):
    return {"bleu": bleu, "chrf": 2 * bleu, "ter": 100 - bleu, "train_s": train_s, "peak_train_mem_mb": mb,
            "trainable_params": params, "decode_s_per_token": spt}


def test_format_compare_table():
    rows = {"zero_shot": row(1.234, 0.0, 0.0, 0, 0.0125), "lora": row(10.0, 612.345, 4328.7, 921600, 0.05)}
    assert format_compare_table(rows) == "\n".join([
        "| system | BLEU | chrF | TER | train s | peak train MB | trainable params | decode ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| zero_shot | 1.23 | 2.47 | 98.77 | 0.0 | 0.0 | 0 | 12.50 |",
        "| lora | 10.00 | 20.00 | 90.00 | 612.3 | 4328.7 | 921,600 | 50.00 |"])


def _sig(score, half, p):
    return {"score": score, "mean": score, "ci": half, "ci_low": score - half, "ci_high": score + half,
            "p_value": p, "tied": False}


def with_sig(r, **p_by_baseline):
    r["significance"] = {b: {"bleu": _sig(r["bleu"], 0.25, p), "chrf": _sig(r["chrf"], 1.0, p and p / 10)}
                         for b, p in p_by_baseline.items()}
    return r


def test_format_compare_table_with_intervals_and_p_values():
    rows = {"zero_shot": with_sig(row(1.234, 0.0, 0.0, 0, 0.0125), zero_shot=None, lora=0.0009990),
            "lora": with_sig(row(10.0, 612.345, 4328.7, 921600, 0.05), zero_shot=0.02, lora=None)}
    lines = format_compare_table(rows).splitlines()
    assert lines[0] == ("| system | BLEU [95% CI] | chrF [95% CI] | TER | p BLEU vs zero_shot | p chrF vs zero_shot | "
                        "p BLEU vs lora | p chrF vs lora | train s | peak train MB | trainable params | "
                        "decode ms/token |")
    assert lines[1] == "|---|" + "---:|" * 11
    assert lines[2] == ("| zero_shot | 1.23 [0.98, 1.48] | 2.47 [1.47, 3.47] | 98.77 | - | - | 0.001 | <0.001 | "
                        "0.0 | 0.0 | 0 | 12.50 |")
    assert lines[3] == ("| lora | 10.00 [9.75, 10.25] | 20.00 [19.00, 21.00] | 90.00 | 0.020 | 0.002 | - | - | "
                        "612.3 | 4328.7 | 921,600 | 50.00 |")


def test_against_is_checked_against_the_systems_that_run():
    assert check_against(None, SYSTEMS) == ("zero_shot",)  # the default
    assert check_against(None, ("lora", "pema_gu")) == ()  # no zero_shot: no default test
    assert check_against("knn_lm, zero_shot", SYSTEMS) == ("zero_shot", "knn_lm")
    assert check_against((), ("lora",)) == ()
    for bad in ("pema_magic", "zero_shot,nope", ""):
        with pytest.raises(ConfigError, match="choose from"):
            check_against(bad, SYSTEMS)
    with pytest.raises(ConfigError, match="'knn_lm'.*not among the systems that run"):
        check_against("knn_lm", ("zero_shot", "pema_gu"))


def test_significance_metrics_names():
    from pema.jobs.stages import significance_metrics

    r = with_sig(row(1.0, 0, 0, 0, 0.01), zero_shot=0.04, knn_lm=0.5)
    got = significance_metrics(r, "pema_gu/")
    assert got == {"pema_gu/bleu_ci_low": 0.75, "pema_gu/bleu_ci_high": 1.25, "pema_gu/bleu_p": 0.04,
                   "pema_gu/chrf_ci_low": 1.0, "pema_gu/chrf_ci_high": 3.0, "pema_gu/chrf_p": 0.004,
                   "pema_gu/bleu_p_vs_knn_lm": 0.5, "pema_gu/chrf_p_vs_knn_lm": 0.05}
    assert "bleu_p" not in significance_metrics(with_sig(row(1.0, 0, 0, 0, 0.01), zero_shot=None))
    assert significance_metrics(row(1.0, 0, 0, 0, 0.01)) == {}


def test_systems_are_checked_and_ordered():
    assert check_systems("all") == SYSTEMS and len(SYSTEMS) == 9 and SYSTEMS[-1] == "pema_knn"
    assert check_systems("pema_gu, zero_shot") == ("zero_shot", "pema_gu")  # always in table order
    assert check_systems(["lora"]) == ("lora",)
    assert check_systems("pema") == ("pema",)
    for bad in ("pema_x", "zero_shot,nope", ""):
        with pytest.raises(ConfigError, match="choose from"):
            check_systems(bad)


def test_definitions_of_the_schedules():
    cfg = load_config(SMOKE, ["knn.lam=0.3"])
    assert decode_schedule("pema_pd_only", cfg) == ScheduleConfig(kind="constant", lam=1.0)
    lam = schedule_from(decode_schedule("pema_pd_only", cfg))(torch.arange(20), torch.full((20,), 5.0))
    assert torch.equal(lam, torch.ones(20, dtype=torch.float64))  # P_PEMA alone at every step, whatever the horizon
    assert decode_schedule("knn_lm", cfg) == ScheduleConfig(kind="constant", lam=0.3)
    assert decode_schedule("pema_gu", cfg) == decode_schedule("pema_no_rct", cfg) == cfg.decode.gu
    assert decode_schedule("pema", cfg) == cfg.decode.pema
    assert decode_schedule("pema_const", cfg) == cfg.decode.const
    assert decode_schedule("zero_shot", cfg) is None and decode_schedule("lora", cfg) is None


def test_no_rct_trains_pd_only_and_counts_its_parameters():
    cfg = load_config(SMOKE)
    no_rct = no_rct_config(cfg)
    assert (no_rct.train.method, no_rct.train.b_pd_init) == ("pd", "random")
    assert [p["phase"] for p in phase_plan(no_rct.train)] == ["pd"]
    assert [p["phase"] for p in phase_plan(cfg.train)] == ["rct", "rct_pd"]
    adapter = PemaAdapter(d=64, rank=16)
    assert pema_trainable_params(adapter, cfg.train) == 3 * 16 * 64  # A, B_rct, B_pd
    assert pema_trainable_params(adapter, no_rct.train) == 2 * 16 * 64  # A, B_pd: B_rct is never trained
    assert system_params("pema_no_rct", cfg)["train.method"] == "pd"
    assert system_params("pema_gu", cfg)["train.method"] == "rct_pd"
    assert system_params("knn_lm", cfg)["knn.k"] == str(cfg.knn.k)


def test_missing_memory_is_named(tmp_path):
    with pytest.raises(MemoryFormatError, match="memory/train/manifest.json"):
        check_memory_matches(load_config(SMOKE), tmp_path)


def test_compare_bars_has_bleu_and_chrf_per_system():
    from pema.stages import plots

    rows = {"zero_shot": row(1.0, 0, 0, 0, 0.01), "pema_gu": row(3.0, 5, 10, 3072, 0.02)}
    fig = plots.compare_bars(rows)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [1.0, 3.0, 2.0, 6.0]
    plots.plt.close(fig)


def test_the_compare_stage_logs_through_the_logger(tmp_path):
    """run_compare: the work is one executor call; a child scope per system not already logged, the systems'
    metrics on the stage's scope, compare.md, compare.png and summary.json (merged) through the logger."""
    from pema.stages.compare import run_compare
    from pema.stages.logger import RecordingLogger
    from pema.stages.tables import compare_markdown

    rows = {"zero_shot": with_sig(row(1.0, 0.0, 0.0, 0, 0.01), zero_shot=None),
            "pema_gu": with_sig(row(3.0, 5.0, 10.0, 3072, 0.02), zero_shot=0.04)}
    for r in rows.values():
        r.update(memory_kind="cpu_rss", total_params=7)
    calls = []

    class Executor:
        def call(self, fn, *args, **kwargs):
            calls.append((fn.__name__, kwargs["systems"], kwargs["against"]))
            return {"rows": rows, "timings_s": {"decode_zero_shot": 1.5}}

    (tmp_path / "summary.json").write_text(json.dumps({"earlier": 1}))
    logger = RecordingLogger()
    summary = run_compare(load_config(SMOKE), tmp_path, Executor(), logger, systems="zero_shot,pema_gu",
                          logged={"zero_shot"}, timings={"build_memory": 2.0})
    assert calls == [("run_systems", ("zero_shot", "pema_gu"), ("zero_shot",))]
    assert [c[1] for c in logger.calls if c[0] == "stage"] == ["pema_gu"]  # zero_shot's child had finished
    tags = next(c[1] for c in logger.calls if c[0] == "tags")
    assert tags == {"pema.stage": "compare", "pema.system": "pema_gu", "pema.memory_kind": "cpu_rss"}
    metrics = logger.metrics()
    assert metrics["trainable_params"] == 3072 and metrics["bleu_p"] == 0.04 and metrics["total_params"] == 7
    assert metrics["zero_shot/bleu"] == 1.0 and metrics["pema_gu/decode_s_per_token"] == 0.02
    assert metrics["pema_gu/bleu_p"] == 0.04
    assert ("text", "compare.md", compare_markdown(rows)) in logger.calls and ("figure", "compare.png") in logger.calls
    assert ("artifact", str(tmp_path / "summary.json"), None) in logger.calls
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary and summary["earlier"] == 1 and summary["pema_gu"]["bleu"] == 3.0
    assert summary["compare_table"] == format_compare_table(rows) and "compare_mlflow" not in summary
    assert list(summary["compare_timings_s"]) == ["build_memory", "compare", "decode_zero_shot"]


def test_unknown_system_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare.py"), "--config", str(SMOKE),
                           "--output-dir", str(out), "--systems", "zero_shot,pema_magic"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "pema_magic" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("against, named", [("zero_shot,nope", "nope"), ("knn_lm", "knn_lm")])
def test_bad_against_exits_2_and_writes_nothing(tmp_path, against, named):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare.py"), "--config", str(SMOKE),
                           "--output-dir", str(out), "--systems", "zero_shot,pema_gu", "--against", against],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and named in proc.stderr and "against" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_compare_job_on_smoke_produces_every_row(ray_cluster, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "jobs/compare.py", "--config", "jobs/configs/smoke.yaml",
                           "--output-dir", str(out), "--no-progress", "--against", "zero_shot,knn_lm",
                           "decode.length_cap=1.0"],  # every system, zero-shot and LoRA included, needs its horizons
                          capture_output=True, text=True, timeout=840, env=ray_cluster.env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| pema_gu |" in proc.stdout and "| pema |" in proc.stdout  # the job prints the table
    assert "p BLEU vs zero_shot" in proc.stdout and "p chrF vs knn_lm" in proc.stdout

    cfg = load_config(SMOKE)
    summary = json.loads((out / "summary.json").read_text())
    assert set(SYSTEMS) <= set(summary) and "| knn_lm |" in summary["compare_table"]
    for system in SYSTEMS:
        assert set(METRICS) <= set(summary[system]), system
        lines = (out / "predictions" / f"{system}.jsonl").read_text().splitlines()
        assert len(lines) == cfg.data.test_limit
        lams = [x for line in lines for x in json.loads(line)["lam"]]
        if system == "pema_pd_only":
            assert lams and all(x == 1.0 for x in lams)
        elif system == "knn_lm":
            assert lams and all(x == cfg.knn.lam for x in lams)
        elif system == "pema_knn":  # P_LM against the blend of P_PEMA and p_kNN, at decode.pema_knn's lambda
            assert lams and all(x == cfg.decode.pema_knn.lam for x in lams)
        elif system in ("zero_shot", "lora"):
            assert lams == []
    z, lora = summary["zero_shot"], summary["lora"]
    assert z["train_s"] == 0 and z["trainable_params"] == 0 and summary["knn_lm"]["trainable_params"] == 0
    assert lora["trainable_params"] > 0 and lora["train_s"] > 0 and lora["peak_train_mem_mb"] > 0
    for system in ("pema_pd_only", "pema_no_rct", "pema_const", "pema_gu"):
        assert 0 < summary[system]["trainable_params"] < lora["total_params"] / 100
    assert summary["pema_gu"]["train_phases"][-1]["phase"] == "rct_pd"
    assert [p["phase"] for p in summary["pema_no_rct"]["train_phases"]] == ["pd"]
    for system in SYSTEMS:  # sacreBLEU's paired bootstrap against each --against baseline
        sig = summary[system]["significance"]
        assert list(sig) == ["zero_shot", "knn_lm"]
        for baseline, entry in sig.items():
            assert entry["baseline"] == baseline and entry["n_samples"] == 1000
            for metric in ("bleu", "chrf", "ter"):
                assert entry[metric]["score"] == pytest.approx(summary[system][metric])
                assert (entry[metric]["p_value"] is None) == (system == baseline)
    assert "p BLEU vs knn_lm" in summary["compare_table"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pema").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "compare")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_system = {r.data.tags["pema.system"]: r for r in children if "pema.system" in r.data.tags}
    assert set(by_system) == set(SYSTEMS) and all(r.info.run_name == s for s, r in by_system.items())
    assert by_system["lora"].data.metrics["trainable_params"] == lora["trainable_params"]
    lora_sig = summary["lora"]["significance"]
    assert by_system["lora"].data.metrics["bleu_p"] == pytest.approx(lora_sig["zero_shot"]["bleu"]["p_value"])
    assert by_system["lora"].data.metrics["chrf_p_vs_knn_lm"] == pytest.approx(lora_sig["knn_lm"]["chrf"]["p_value"])
    assert by_system["lora"].data.metrics["bleu_ci_low"] == pytest.approx(lora_sig["zero_shot"]["bleu"]["ci_low"])
    assert "bleu_p" not in by_system["zero_shot"].data.metrics and "bleu_ci_high" in by_system["zero_shot"].data.metrics
    assert parent.data.metrics["pema_gu/chrf_ci_high"] == pytest.approx(
        summary["pema_gu"]["significance"]["zero_shot"]["chrf"]["ci_high"])
    assert {r.info.run_name for r in children} - set(SYSTEMS) == {"build_memory"}  # built: the folder was empty
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"compare.png", "compare.md", "summary.json"} <= artifacts
    assert summary["compare_mlflow"]["run_id"] == parent.info.run_id
    assert not (out / STATE).exists()  # the run ended: a new job opens a new run

    # killed before its zero_shot child run was logged: the rerun resumes the run and logs only the missing child
    client.set_terminated(parent.info.run_id, "KILLED")  # what the next job's orphan sweep makes of it
    client.delete_run(by_system["zero_shot"].info.run_id)
    digest = config_digest(load_config(SMOKE, ["decode.length_cap=1.0"]))  # the job's config
    (out / STATE).write_text(json.dumps({"run_id": parent.info.run_id, "config": digest}))
    proc = subprocess.run([sys.executable, "jobs/compare.py", "--config", "jobs/configs/smoke.yaml",
                           "--output-dir", str(out), "--no-progress", "--systems", "zero_shot",
                           "decode.length_cap=1.0"], capture_output=True, text=True, timeout=600,
                          env=ray_cluster.env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = client.search_runs([client.get_experiment_by_name("pema").experiment_id])
    assert [r.info.run_id for r in runs if r.info.run_name == "compare"] == [parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    finished = [r.data.tags["pema.system"] for r in runs if r.info.status == "FINISHED" and "pema.system" in r.data.tags]
    assert sorted(finished) == sorted(SYSTEMS)  # one finished run per system, zero_shot logged again
    assert not (out / STATE).exists()

    # the same command once more (or after a kill that came once the result was recorded): the ledger holds it
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=600, env=ray_cluster.env(), cwd=ROOT)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert len(client.search_runs([client.get_experiment_by_name("pema").experiment_id])) == len(runs)
