"""The pipeline end to end: the smoke config on a tiny model through the inline executor (the same stage bodies
the Ray jobs run), what it logs, bad input at the job's boundary, and (slow) SmolLM2 through the real job."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pema.config import load_config
from pema.errors import ConfigError, DataError, MemoryMismatchError
from pema.formats.memory import MemoryReader
from pema.executors.inline import InlineExecutor
from pema.stages.decode import SYSTEMS
from pema.stages.logger import RecordingLogger
from pema.stages.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config(SMOKE, [f"data.{s}={ROOT / 'data' / 'wmt22' / (s + '.jsonl')}" for s in ("train", "dev", "test")]
                      + [f"data.ood_test={ROOT / 'data' / 'nc' / 'test.jsonl'}", "data.ood_test_limit=4"])
    logger, lines = RecordingLogger(), []
    summary = run_pipeline(cfg, out, InlineExecutor(), logger, progress=False, log=lines.append)
    return out, summary, logger, lines


def test_smoke_summary_contract(smoke_run):
    out, summary, *_ = smoke_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for system in SYSTEMS:
        for metric in ("bleu", "chrf", "ter"):
            assert isinstance(on_disk[system][metric], float)
    assert summary["executor"] == {"name": "inline", "train_workers": 1} and "mlflow" not in summary
    for stage in ("load_model", "build_memory", "train", "decode_zero_shot", "decode_pema_gu"):
        assert on_disk["timings_s"][stage] >= 0
    predictions = (out / "predictions" / "pema_gu.jsonl").read_text().splitlines()
    assert len(predictions) == 6  # smoke.yaml: test_limit 6
    ood = (out / "predictions" / "ood_test" / "pema_gu.jsonl").read_text().splitlines()
    assert len(ood) == 4  # the second table's pairs: data.ood_test, ood_test_limit 4
    assert on_disk["tables"] == {"test": {"file": str(ROOT / "data/wmt22/test.jsonl"), "pairs": 6},
                                 "ood_test": {"file": str(ROOT / "data/nc/test.jsonl"), "pairs": 4}}
    assert on_disk["hygiene"]["ood_test"] == {"kept": 4, "dropped": {}}
    for system, scores in [(s, on_disk) for s in SYSTEMS] + [(s, on_disk["ood_test"]) for s in SYSTEMS]:
        sig = scores[system]["significance"]["zero_shot"]
        assert (sig["baseline"], sig["n_samples"], sig["seed"]) == ("zero_shot", 1000, 12345)
        for metric in ("bleu", "chrf", "ter"):
            m = sig[metric]
            assert m["score"] == pytest.approx(scores[system][metric])
            assert m["ci_low"] <= m["mean"] <= m["ci_high"]
            assert (m["p_value"] is None) == (system == "zero_shot")
            assert system == "zero_shot" or 0 < m["p_value"] <= 1


def test_smoke_outputs_are_consistent(smoke_run):
    out, summary, *_ = smoke_run
    train = MemoryReader(out / "memory" / "train")
    head = json.loads((out / "head" / "head.json").read_text())
    train.check_compatible(d=head["d"], vocab_size=head["vocab_size"], model_id=head["model_id"])
    assert summary["memory_rows"] == len(train) == train.manifest.total_rows
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert adapter["d"] == head["d"] and adapter["rank"] == 16
    gu = [json.loads(line)["lam"] for line in (out / "predictions" / "pema_gu.jsonl").read_text().splitlines()]
    assert all(trace and trace[0] == pytest.approx(0.81) for trace in gu)  # lam_max 0.9, q 0: lam_0 = 0.81


def test_bad_jsonl_fails_before_anything_is_written(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"en": "a", "du": "b"}\n{"en": "c", "du": \n')
    cfg = load_config(SMOKE, [f"data.train={bad}"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=":2:"):
        run_pipeline(cfg, out, InlineExecutor(), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("row, message", [({"en": "x"}, "missing field 'du'"), ({"en": "x", "du": " "}, "empty")])
def test_missing_field_or_empty_target(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "test.jsonl", [{"en": "a", "du": "b"}, row])
    cfg = load_config(SMOKE, [f"data.test={path}"])
    with pytest.raises(DataError, match=message):
        run_pipeline(cfg, tmp_path / "out", InlineExecutor(), progress=False)
    assert not (tmp_path / "out").exists()


def test_memory_from_another_model_is_refused(smoke_run, tmp_path):
    out, *_ = smoke_run
    reader = MemoryReader(out / "memory" / "train")
    with pytest.raises(MemoryMismatchError, match="d=64.*d=576|576.*64"):
        reader.check_compatible(d=576, vocab_size=reader.manifest.vocab_size)
    with pytest.raises(MemoryMismatchError, match="50272"):
        reader.check_compatible(d=reader.manifest.d, vocab_size=50272)


def test_job_cli_rejects_bad_override(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pema", "run", "--config", str(SMOKE),
                           "--output-dir", str(tmp_path / "o"), "decode.gu.lam_max=1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lam_max=1.5" in proc.stderr
    with pytest.raises(ConfigError, match="train.kapa"):
        load_config(SMOKE, ["train.kapa=0.1"])


@pytest.mark.slow
def test_main_job_on_smollm2(tmp_path):
    """The real job on SmolLM2-135M-Instruct with a handful of pairs, through the command line."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pema", "run", "--config", str(ROOT / "jobs/configs/default.yaml"),
           "--output-dir", str(out), "--no-progress", "data.train_limit=12", "data.dev_limit=4", "data.test_limit=4",
           "data.ood_test_limit=4",
           "train.rct_epochs=2", "train.epochs=1", "decode.max_new_tokens=24", "adapter.rank=32", "adapter.alpha=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    head = json.loads((out / "head" / "head.json").read_text())
    assert (head["d"], head["vocab_size"], head["norm_type"]) == (576, 49152, "rms")
    systems = load_config(ROOT / "jobs/configs/default.yaml").eval.systems  # the default's rows, both tables
    assert set(systems) <= set(summary) and set(systems) <= set(summary["ood_test"]) and "BLEU" in proc.stdout
    assert "ood_test: 4 pairs of data/wmt22/test.jsonl" in proc.stdout
    zero_shot = [json.loads(line)["hypothesis"] for line in (out / "predictions" / "zero_shot.jsonl").open()]
    assert any(h.strip() for h in zero_shot)  # the chat template makes SmolLM2 answer (raw template: empty output)

    # the registered champion translates with the real base model (dev BLEU given: the decode is tested elsewhere)
    reg = subprocess.run([sys.executable, "-m", "pema", "register", "--config",
                          str(ROOT / "jobs/configs/default.yaml"), "--output-dir", str(out), "--name", "smollm2-pema",
                          "--dev-bleu", "1.0", "--no-progress"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert reg.returncode == 0, reg.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    hyps = mlflow.pyfunc.load_model("models:/smollm2-pema@champion").predict(["The hotel is close to the station."])
    assert len(hyps) == 1 and hyps[0].strip()


def test_stages_log_through_the_logger_and_the_console(smoke_run):
    out, summary, logger, lines = smoke_run
    stages = [c[1] for c in logger.calls if c[0] == "stage"]
    assert stages == ["pipeline", "build_memory", "train", "evaluate"]
    metrics = logger.metrics()
    assert metrics["train_rows"] == summary["memory_rows"] and metrics["build_rows_per_s"] > 0
    assert metrics["rct_pd/best_val"] == pytest.approx(summary["train"][1]["best_val"])
    assert metrics["pema_gu/chrf"] == pytest.approx(summary["pema_gu"]["chrf"])
    assert "pema_gu/chrf_p" in metrics and "zero_shot/chrf_p" not in metrics
    artifacts = {Path(c[1]).name for c in logger.calls if c[0] == "artifact"}
    assert {"manifest.json", "train_history.json", "predictions", "summary.json"} <= artifacts
    assert {c[1] for c in logger.calls if c[0] == "figure"} == {"loss_curves.png", "lambda_schedule.png"}
    # the console: one line as each stage starts and one as it ends, with its key figure
    assert [line.split("]")[0] for line in lines] == ["[data"] * 4 + ["[build_memory", "[build_memory", "[train",
                                                                    "[train", "[evaluate", "[evaluate"]
    assert lines[0] == "[data] train: kept 16 pairs, dropped none"  # the pair hygiene, one line per split
    lines = lines[4:]
    assert f"{summary['memory_rows']:,} train rows" in lines[1] and "best val loss" in lines[3]
    assert "pema chrF" in lines[5]
    assert not (out / "train_checkpoints").exists() or (out / "train_checkpoints" / "latest" / "final.json").is_file()


@pytest.mark.parametrize("resident", [False, True])
def test_inline_training_matches_resident_or_not(smoke_run, resident, tmp_path):
    """The training stage on the inline executor: each row once per epoch, the loss improves, the adapter lands."""
    import shutil

    from pema.stages.train import run_train

    out, *_ = smoke_run
    run = tmp_path / "run"
    for part in ("memory", "head"):
        shutil.copytree(out / part, run / part)
    cfg = load_config(SMOKE, [f"train.resident={str(resident).lower()}", "train.rct_epochs=3", "train.epochs=2",
                              "train.rct_solver=sgd"])
    logger = RecordingLogger()
    info = run_train(cfg, run, InlineExecutor(), logger, progress=False)
    assert [p["phase"] for p in info.phases] == ["rct", "rct_pd"] and info.workers == 1
    history = json.loads((run / "train_history.json").read_text())
    rct = [h for h in history if h["phase"] == "rct"]
    assert rct[-1]["val_loss"] < rct[0]["val_loss"]  # reconstruction improves from the random start
    assert info.steps_run == info.steps_total > 0 and info.adapter_dir == str(run / "adapter")
    assert (run / "adapter" / "adapter.json").is_file() and not (run / "adapter.partial").exists()


def test_the_train_result_crosses_a_process_boundary_as_a_folder(tmp_path):
    """The typed training result: recorded as a dict (phases without their history) and back, and carried by the
    executors as a folder (pema.executors.handoff), the adapter bundle beside final.json."""
    from pema.adapter.io import load_adapter
    from pema.adapter.model import PemaAdapter
    from pema.executors.handoff import is_final, read_result, write_result
    from pema.stages.ledger import as_recorded
    from pema.stages.train import TrainResult

    phase = {"phase": "rct_pd", "best_val": 1.5, "best_step": 4, "steps": 8, "stopped_early": False, "seconds": 0.1,
             "rows_per_s": 10.0, "history": [{"phase": "rct_pd", "step": 4, "val_loss": 1.5}]}
    result = TrainResult(phases=(phase,), steps_run=3, steps_total=8, workers=2, adapter=PemaAdapter(16, 4),
                         train_memory="resident")
    recorded = as_recorded(result)
    assert "history" not in recorded["phases"][0] and recorded["steps_run"] == 3 and recorded["workers"] == 2
    assert TrainResult.from_dict(recorded).to_dict() == recorded and result.history == phase["history"]
    assert not is_final(tmp_path) and not is_final(None)
    write_result(result, tmp_path, {"note": "meta"})
    back = read_result(tmp_path)
    assert is_final(tmp_path) and back == dataclasses.replace(result, adapter_dir=str(tmp_path / "adapter"))
    adapter, meta = load_adapter(back.adapter_dir)
    assert meta["note"] == "meta" and adapter.rank == 4


def test_train_device_is_validated():
    with pytest.raises(ConfigError, match="resources.device"):
        load_config(SMOKE, ["resources.device=tpu"])
    with pytest.raises(ConfigError, match="train.resident"):
        load_config(SMOKE, ["train.resident=maybe"])


def _sig(score, low, high, p):
    return {"score": score, "mean": (low + high) / 2, "ci": (high - low) / 2, "ci_low": low, "ci_high": high,
            "p_value": p, "tied": False}


def test_format_table_shows_intervals_and_p_values():
    from pema.stages.tables import format_table

    def row(bleu, chrf, p):
        return {"bleu": bleu, "chrf": chrf, "ter": 150.0,
                "significance": {"zero_shot": {"bleu": _sig(bleu, bleu - 0.3, bleu + 0.4, p),
                                               "chrf": _sig(chrf, chrf - 1.5, chrf + 1.25, p and p / 2)}}}

    summary = {"pema_gu": row(0.83, 15.86, 0.0421), "zero_shot": row(0.74, 15.93, None),
               "timings_s": {"decode_zero_shot": 1.0}}
    table = format_table(summary)
    lines = table.splitlines()
    assert "BLEU [95% CI]" in lines[0] and "p vs zero_shot" in lines[0] and "TER" in lines[0]
    assert lines[1].startswith("zero_shot") and lines[2].startswith("pema_gu")  # SYSTEMS order; only those present
    assert "0.83 [0.53, 1.23]" in lines[2] and "0.042" in lines[2] and "15.86 [14.36, 17.11]" in lines[2]
    assert "0.021" in lines[2] and "150.00" in lines[2]
    assert lines[1].split()[4] == "-"  # the baseline has no p-value against itself
    assert "pema_const" not in table and "decode_zero_shot" in table
    assert max(map(len, lines)) <= 120
    plain = format_table({"pema_gu": {"bleu": 1.0, "chrf": 2.0, "ter": 3.0}, "timings_s": {}})  # no significance
    assert "pema_gu" in plain and "1.00" in plain and "[" not in plain.splitlines()[1]


def test_format_table_prints_the_second_test_set_under_its_own_title():
    from pema.stages.tables import format_table

    def row(chrf, p):
        return {"bleu": 1.0, "chrf": chrf, "ter": 100.0,
                "significance": {"zero_shot": {"chrf": _sig(chrf, chrf - 1, chrf + 1, p)}}}

    summary = {"zero_shot": row(17.0, None), "pema": row(20.0, 0.001),
               "ood_test": {"zero_shot": row(15.0, None), "pema": row(16.0, 0.2)},
               "tables": {"test": {"file": "data/nc/test.jsonl", "pairs": 200},
                          "ood_test": {"file": "data/wmt22/test.jsonl", "pairs": 100}},
               "timings_s": {"decode_pema": 1.0}}
    lines = format_table(summary).splitlines()
    first, second = lines.index("test: 200 pairs of data/nc/test.jsonl"), \
        lines.index("ood_test: 100 pairs of data/wmt22/test.jsonl")
    assert first == 0 and "20.00 [19.00, 21.00]" in lines[3] and "0.001" in lines[3]
    assert second > first and "16.00 [15.00, 17.00]" in lines[second + 3] and "0.200" in lines[second + 3]
    assert lines[-1].startswith("decode_pema")
