"""jobs/tune.py on a real local Ray cluster with the smoke config: ASHA over the training space, the decoding sweep
reusing each surviving adapter, MLflow parent/child runs, the registered champion, and resuming after Ctrl+C."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pema.config import load_config, to_dict
from pema.executors.ray_tune import read_events

ROOT = Path(__file__).resolve().parents[1]


def tune_cmd(out: Path, samples: int, decode_samples: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(ROOT / "jobs/configs/smoke.yaml"),
            "--output-dir", str(out), "--num-samples", str(samples), "--decode-samples", str(decode_samples),
            "--no-progress", *extra]


def client_for(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")


def trial_runs(client, parent_id: str) -> list:
    exp = client.get_experiment_by_name("pema").experiment_id
    return [r for r in client.search_runs([exp], max_results=200)
            if r.data.tags.get("mlflow.parentRunId") == parent_id and r.data.tags.get("pema.stage") == "tune_trial"]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tune_job_sweeps_decoding_per_adapter_and_registers_the_best(ray_cluster, tmp_path):
    out = tmp_path / "tune"
    proc = subprocess.run(tune_cmd(out, 4, 2, "--name", "smoke-tune"), capture_output=True, text=True,
                          timeout=840, env=ray_cluster.env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "tune_summary.json").read_text())
    trials, grid, best = summary["trials"], summary["decode_grid"], summary["best"]
    assert len(trials) == 4 and len(grid) == 2 and summary["unfinished"] == 0
    # the sweep is over the recommended row's schedule (decode.pema), stop_lam included
    assert all(set(s) >= {"decode.pema.kind", "decode.pema.stop_lam"} and all(k.startswith("decode.pema.") for k in s)
               for s in grid), grid
    completed = [t for t in trials if t["status"] == "completed"]
    assert completed and all(t["status"] in ("completed", "pruned") for t in trials)

    # decoding reuses the trained adapters: one training per trial, one decode per setting per surviving trial
    for t in trials:
        events = [e["event"] for e in read_events(out / "trials" / t["trial_id"])]
        assert events.count("train_start") == 1, (t["trial_id"], events)
        assert events.count("decode") == (len(grid) if t["status"] == "completed" else 0), (t["trial_id"], events)

    # every trial is a child run of the one parent; the best dev BLEU is the maximum recorded there
    client = client_for(out)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.run_name == "tune" and parent.info.status == "FINISHED"
    runs = trial_runs(client, parent.info.run_id)
    assert sorted(r.data.tags["pema.trial_id"] for r in runs) == sorted(t["trial_id"] for t in trials)
    by_trial = {r.data.tags["pema.trial_id"]: r for r in runs}
    for t in trials:
        run = by_trial[t["trial_id"]]
        assert run.info.status == ("FINISHED" if t["status"] == "completed" else "KILLED")
        assert "dev_ce" in run.data.metrics and run.data.params["train.kappa"] == str(t["config"]["train.kappa"])
        if t["status"] == "completed":
            history = client.get_metric_history(run.info.run_id, "sweep/dev_bleu")
            assert len(history) == len(grid)
    recorded = [r.data.metrics["dev_bleu"] for r in runs if "dev_bleu" in r.data.metrics]
    assert len(recorded) == len(completed) and best["dev_bleu"] == max(recorded)
    assert by_trial[best["trial_id"]].data.metrics["dev_bleu"] == max(recorded)
    assert parent.data.metrics["best_dev_bleu"] == best["dev_bleu"]

    # the winner (its adapter and its decoding setting) is registered and holds the alias
    reg = summary["registered"]
    mv = client.get_model_version_by_alias("smoke-tune", "champion")
    assert reg["champion"] and str(mv.version) == str(reg["version"]) and float(mv.tags["dev_bleu"]) == best["dev_bleu"]
    setting = best["decode"]
    assert setting in grid
    kind, *pairs = mv.tags["schedule"].split()  # "<kind> lam=.. lam_max=.. floor=.. stop_lam=.." (YAML scalars)
    schedule = {"kind": kind, **{k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}}
    assert set(schedule) == {"kind", "lam", "lam_max", "floor", "stop_lam"}
    for key, value in setting.items():  # the registered decode.pema is the winning setting, stop_lam included
        assert schedule[key.removeprefix("decode.pema.")] == value, (key, setting, mv.tags["schedule"])
    register_run = client.get_run(mv.run_id)
    assert register_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    winner = json.loads((out / "config.json").read_text())
    assert winner["decode"]["pema"] == schedule  # the shipped config decodes the pema row with the winner
    smoke = load_config(ROOT / "jobs/configs/smoke.yaml")
    assert winner["decode"]["gu"] == to_dict(smoke.decode.gu)  # the GU ablation's schedule is not searched
    assert winner["adapter"]["rank"] == best["config"]["adapter.rank"]
    assert winner["train"]["kappa"] == best["config"]["train.kappa"]
    from safetensors.torch import load_file

    shipped = load_file(out / "adapter" / "adapter.safetensors")
    trained = load_file(out / "trials" / best["trial_id"] / "adapter" / "adapter.safetensors")
    assert shipped.keys() == trained.keys() and all((shipped[k] == trained[k]).all() for k in shipped)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_interrupted_tune_resumes_without_repeating_finished_trials(ray_cluster, tmp_path):
    out = tmp_path / "tune"
    cmd = tune_cmd(out, 3, 1)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ray_cluster.env(),
                            cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 600
    finished: set[str] = set()
    while not finished and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        for result in (out / "ray_tune" / "tune").glob("*/result.json"):
            if '"final": true' in result.read_text():
                finished.add(result.parent.name)
    assert finished, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C: Tune saves the experiment state and stops
    log = proc.communicate(timeout=300)[0]
    if proc.returncode == 0:
        pytest.skip("every trial finished before the interrupt arrived")
    assert proc.returncode == 130, log[-3000:]
    first = json.loads((out / "tune_summary.json").read_text())
    done_before = {t["trial_id"] for t in first["trials"] if t["status"] == "completed"}
    assert done_before and first["unfinished"] >= 1 and "best" not in first

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=840, env=ray_cluster.env(), cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary["unfinished"] == 0 and len(summary["trials"]) == 3 and "best" in summary
    assert summary["parent_run_id"] == first["parent_run_id"]  # the same parent run goes on
    for t in summary["trials"]:
        starts = [e for e in read_events(out / "trials" / t["trial_id"]) if e["event"] == "train_start"]
        if t["trial_id"] in done_before:
            assert len(starts) == 1 and t["status"] == "completed", t["trial_id"]  # not run again
    client = client_for(out)
    runs = trial_runs(client, summary["parent_run_id"])
    assert sorted(r.data.tags["pema.trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])


def test_tune_job_rejects_a_bad_search_space(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("adapter.rnak: {choice: [8, 16]}\n")
    proc = subprocess.run(tune_cmd(tmp_path / "o", 2, 1, "--train-space", str(space)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "adapter.rnak" in proc.stderr
    assert not (tmp_path / "o").exists()
