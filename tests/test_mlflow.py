"""MLflow against a real tracking server: the smoke pipeline's parent and child runs, metrics, artifacts and lineage;
the registry's champion alias; loading the champion; failing fast when the server is down."""
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pema.config import load_config, with_overrides

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
STAGES = {"build_memory", "train", "evaluate"}


def api(uri, endpoint, body=None, **query):
    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def runs_of(uri):
    exp = api(uri, "experiments/get-by-name", experiment_name="pema")["experiment"]["experiment_id"]
    return api(uri, "runs/search", {"experiment_ids": [exp], "max_results": 1000})["runs"]


def tags(run):
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def artifacts(uri, run, path=""):
    return {f["path"] for f in api(uri, "artifacts/list", run_id=run["info"]["run_id"], path=path).get("files", [])}


def job(name, out, env, *args, timeout=600):
    cmd = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--config", str(SMOKE), "--output-dir", str(out),
           "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_mlflow_folder_does_not_shadow_the_package():
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import mlflow; "
                            "print(mlflow.__file__)"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert "site-packages" in probe.stdout and not probe.stdout.startswith(str(ROOT / "mlflow"))


def test_stage_run_nests_under_an_active_run(tmp_path, monkeypatch):
    import mlflow

    from pema.tracking.runs import connect, stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE)
    with stage_run("alone", cfg, tmp_path) as alone:
        pass
    connect(tmp_path)
    with mlflow.start_run(run_name="outer") as outer:  # as inside a Ray Tune trial
        with stage_run("inner", cfg, tmp_path) as inner:
            mlflow.log_metric("x", 1.0)
    client = mlflow.tracking.MlflowClient()
    assert "mlflow.parentRunId" not in client.get_run(alone.info.run_id).data.tags
    got = client.get_run(inner.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == outer.info.run_id and got.info.status == "FINISHED"
    assert got.data.params["train.kappa"] == str(cfg.train.kappa) and got.data.tags["pema.stage"] == "inner"
    assert (tmp_path / "mlflow.db").is_file()  # the embedded default store


KILLED_STORE = """
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from pema.tracking.runs import connect, experiment_id
count = [0]
@event.listens_for(Engine, "after_cursor_execute")
def kill(conn, cursor, statement, *args):  # SIGKILL right after the chosen SQL statement of MLflow's migration
    count[0] += 1
    if count[0] == int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2] in statement:
        os.kill(os.getpid(), signal.SIGKILL)
connect(sys.argv[1])
experiment_id()  # what a stage's run does first: a fresh store gets its tables here at the latest
"""


def test_store_creation_killed_at_any_instant_leaves_a_usable_folder(tmp_path, monkeypatch):
    """SIGKILL while MLflow creates the tables of a fresh mlflow.db used to leave it half-migrated, and every later
    open failed with ``table _alembic_tmp_trace_info already exists``. Kill the creating job at several instants
    (the first statement, the issue's one, late in the migration), then open the folder's store and log a run."""
    import mlflow

    from pema.tracking.runs import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for kill_at in ("1", "CREATE TABLE _alembic_tmp_trace_info", "1500"):
        proc = subprocess.run([sys.executable, "-c", KILLED_STORE, str(out), kill_at], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, f"not killed at {kill_at!r}: {proc.stderr[-2000:]}"
    (out / "mlflow.db.init-1-deadbeef").write_bytes(b"half a database")  # a partial file as a kill leaves it
    cfg = load_config(SMOKE)
    with stage_run("after_kill", cfg, out) as run:
        mlflow.log_metric("x", 1.0)
    got = mlflow.tracking.MlflowClient().get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["x"] == 1.0
    # the killed attempts' files are gone; the run's artifacts sit beside the store, not in ./mlruns
    assert sorted(p.name for p in out.iterdir()) == ["mlartifacts", "mlflow.db"] and not (tmp_path / "mlruns").exists()


def test_a_half_migrated_store_is_named_with_the_fix(tmp_path, monkeypatch):
    import sqlite3

    from pema.errors import TrackingError
    from pema.tracking.runs import connect

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with sqlite3.connect(tmp_path / "mlflow.db") as con:  # what a kill left before stores were made atomically
        con.execute("CREATE TABLE experiments (id INTEGER)")
        con.execute("CREATE TABLE _alembic_tmp_trace_info (id INTEGER)")
    with pytest.raises(TrackingError, match=r"mlflow\.db was left half-migrated.*_alembic_tmp_trace_info.*delete"):
        connect(tmp_path)


def test_log_scores_logs_intervals_and_p_values_of_every_system_present(tmp_path, monkeypatch):
    import mlflow

    from pema.stages.scoring import significance_against
    from pema.stages.decode import log_scores
    from pema.tracking.logger import MLflowLogger
    from pema.tracking.runs import connect, experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    refs = ["Das Haus ist klein.", "Der Hund bellt.", "Ich trinke gern Kaffee.", "Es regnet heute."]
    hyps = {"zero_shot": ["x"] * 4, "pema_gu": refs, "some_new_system": ["Das Haus.", "Hund.", "Kaffee.", "Es."]}
    sig = significance_against(hyps, refs, ["zero_shot"])
    scores = {s: {"bleu": v["zero_shot"]["bleu"]["score"], "chrf": v["zero_shot"]["chrf"]["score"],
                  "ter": v["zero_shot"]["ter"]["score"], "seconds_per_token": 0.01, "significance": v}
              for s, v in sig.items()}
    scores["timings_s"] = {"decode_zero_shot": 1.0}
    connect(tmp_path)
    with mlflow.start_run(experiment_id=experiment_id()) as run:
        log_scores(MLflowLogger(None, tmp_path), scores)
    metrics = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data.metrics
    for system in hyps:  # not only pema.stages.decode.SYSTEMS: whatever the scores hold
        assert metrics[f"{system}/bleu"] == pytest.approx(scores[system]["bleu"])
        for m in ("bleu", "chrf", "ter"):
            entry = sig[system]["zero_shot"][m]
            assert metrics[f"{system}/{m}_ci_low"] == pytest.approx(entry["ci_low"])
            assert metrics[f"{system}/{m}_ci_high"] == pytest.approx(entry["ci_high"])
            if system != "zero_shot":
                assert metrics[f"{system}/{m}_p"] == pytest.approx(entry["p_value"])
    assert "zero_shot/bleu_p" not in metrics and metrics["pema_gu/bleu_p"] < 0.05


@pytest.fixture(scope="module")
def tracked(ray_cluster, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    env = ray_cluster.env(MLFLOW_TRACKING_URI=mlflow_server)
    proc = job("pipeline", out, env, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, env, mlflow_server


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_pipeline_is_a_parent_run_with_stage_children(tracked):
    out, _, uri = tracked
    runs = {r["info"]["run_name"]: r for r in runs_of(uri)}
    parent = runs["pipeline"]
    assert {n for n, r in runs.items() if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]} >= STAGES
    for name in STAGES | {"pipeline"}:
        t = tags(runs[name])
        assert runs[name]["info"]["status"] == "FINISHED"
        assert t["pema.base_model"] == "tiny://llama" and len(t["pema.memory_sha256"]) == 64
        assert len(t["pema.git_commit"]) == 40
        params = {p["key"]: p["value"] for p in runs[name]["data"]["params"]}
        assert params["adapter.rank"] == "16" and params["decode.gu.kind"] == "gu_quadratic"
        assert "config.yaml" in artifacts(uri, runs[name])
    metrics = {m["key"]: m["value"] for m in runs["evaluate"]["data"]["metrics"]}
    summary = json.loads((out / "summary.json").read_text())
    for system in ("zero_shot", "pema_const", "pema_gu"):
        for k in ("bleu", "chrf", "ter"):
            assert metrics[f"{system}/{k}"] == pytest.approx(summary[system][k])
            sig = summary[system]["significance"]["zero_shot"][k]
            assert metrics[f"{system}/{k}_ci_low"] == pytest.approx(sig["ci_low"])
            assert (f"{system}/{k}_p" in metrics) == (system != "zero_shot")
    history = api(uri, "metrics/get-history", run_id=runs["train"]["info"]["run_id"], metric_key="rct_pd/val_loss")
    assert len(history["metrics"]) >= 2  # one point per validation
    assert {"loss_curves.png", "train_history.json"} <= artifacts(uri, runs["train"])
    assert {"lambda_schedule.png", "predictions"} <= artifacts(uri, runs["evaluate"])
    assert "predictions/pema_gu.jsonl" in artifacts(uri, runs["evaluate"], "predictions")
    assert "memory/train/manifest.json" in artifacts(uri, runs["build_memory"], "memory/train")
    build = {m["key"] for m in runs["build_memory"]["data"]["metrics"]}
    assert {"train_rows", "build_s", "build_rows_per_s"} <= build
    assert summary["mlflow"]["run_id"] == parent["info"]["run_id"]


# what is registered and deployed is the recommended row (decode.pema), set apart here from the GU ablation's
PEMA_SCHEDULE = {"decode.pema.kind": "gu_linear", "decode.pema.lam_max": 0.8, "decode.pema.floor": 0.3,
                 "decode.pema.stop_lam": 0.9}


def schedule_cfg():
    return with_overrides(load_config(SMOKE), PEMA_SCHEDULE)


def test_schedule_tag_describes_decode_pema_with_stop_lam():
    from pema.tracking.registry import schedule_tag

    cfg = schedule_cfg()
    assert cfg.decode.pema != cfg.decode.gu
    assert schedule_tag(cfg) == "gu_linear lam=0.5 lam_max=0.8 floor=0.3 stop_lam=0.9"
    assert schedule_tag(load_config(SMOKE)).endswith(" stop_lam=null")  # the default: the schedule's lambda


def test_dev_bleu_of_decodes_the_pema_system_on_dev(monkeypatch):
    from pema.executors.ray_executor import RayExecutor
    from pema.jobs.stages import dev_bleu_of
    from pema.stages.decode import decode_and_score
    from pema.stages.logger import RecordingLogger

    calls = []

    def fake_call(self, fn, cfg, output_dir, **kwargs):  # the Ray task, not run: what it is asked to do
        assert fn is decode_and_score
        calls.append(kwargs)
        return {system: {"bleu": 1.25 if system == "pema" else 9.0} for system in kwargs["systems"]}

    monkeypatch.setattr(RayExecutor, "call", fake_call)
    logger = RecordingLogger()
    assert dev_bleu_of(schedule_cfg(), "unused", progress=False, logger=logger) == 1.25
    assert [(c["split"], c["systems"]) for c in calls] == [("dev", ("pema",))]
    assert [call[1] for call in logger.calls if call[0] == "metrics"] == [{"dev/pema/bleu": 1.25}]


def test_registered_translator_decodes_with_decode_pema(monkeypatch):
    import pema.stages.decode
    from pema.tracking.pyfunc_model import PemaTranslator

    got = {}

    def fake_translate(model, tokenizer, sources, cfg, **kw):
        got.update(sources=sources, **kw)
        return [s.upper() for s in sources], None

    monkeypatch.setattr(pema.stages.decode, "translate", fake_translate)
    translator = PemaTranslator()
    translator.cfg = schedule_cfg()
    translator.model = translator.tokenizer = translator.adapter = translator.head = object()
    translator.ratio = 1.1
    assert translator.predict(None, ["a b", "c"]) == ["A B", "C"]
    assert got["schedule"] == translator.cfg.decode.pema and got["schedule"] != translator.cfg.decode.gu
    assert got["sources"] == ["a b", "c"] and got["ratio"] == 1.1


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_register_moves_champion_only_when_better(tracked):
    import mlflow

    from pema.tracking.registry import schedule_tag

    out, env, uri = tracked
    schedule = [f"{k}={v}" for k, v in PEMA_SCHEDULE.items()]
    first = job("register", out, env, "--name", "pema-smoke", *schedule)
    assert first.returncode == 0, first.stderr[-3000:]
    v1 = json.loads(first.stdout.strip().splitlines()[-1])
    assert v1["champion"] and v1["version"] == "1"
    alias = api(uri, "registered-models/alias", name="pema-smoke", alias="champion")["model_version"]
    assert alias["version"] == "1"
    # the version's dev BLEU is the pema row's (decode.pema), decoded on dev, and its schedule tag says so
    version = api(uri, "model-versions/get", name="pema-smoke", version="1")["model_version"]
    version_tags = {t["key"]: t["value"] for t in version["tags"]}
    assert version_tags["schedule"] == schedule_tag(schedule_cfg())
    assert version_tags["schedule"] == "gu_linear lam=0.5 lam_max=0.8 floor=0.3 stop_lam=0.9"
    assert float(version_tags["dev_bleu"]) == v1["dev_bleu"]
    register_run = api(uri, "runs/get", run_id=version["run_id"])["run"]
    register_metrics = {m["key"]: m["value"] for m in register_run["data"]["metrics"]}
    assert register_metrics["dev/pema/bleu"] == pytest.approx(v1["dev_bleu"])
    assert not any(k.startswith("dev/pema_gu/") for k in register_metrics)

    worse = job("register", out, env, "--name", "pema-smoke", "--dev-bleu", str(v1["dev_bleu"] - 1.0), *schedule)
    assert worse.returncode == 0, worse.stderr[-3000:]
    assert not json.loads(worse.stdout.strip().splitlines()[-1])["champion"]
    assert api(uri, "registered-models/alias", name="pema-smoke", alias="champion")["model_version"]["version"] == "1"

    better = job("register", out, env, "--name", "pema-smoke", "--dev-bleu", str(v1["dev_bleu"] + 1.0), *schedule)
    assert json.loads(better.stdout.strip().splitlines()[-1])["version"] == "3"
    assert api(uri, "registered-models/alias", name="pema-smoke", alias="champion")["model_version"]["version"] == "3"

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/pema-smoke@champion")
    assert model.unwrap_python_model().cfg.decode.pema == schedule_cfg().decode.pema  # the deployed schedule
    hyps = model.predict(["An English sentence.", "The weather is nice today."])
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)
    local = mlflow.artifacts.download_artifacts(f"models:/pema-smoke/3")
    assert not list(Path(local).rglob("*.pkl")) and not list(Path(local).rglob("*.pickle"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_server_down_fails_fast_naming_the_uri_and_keeps_outputs(tracked):
    from local_ray import free_port

    out, env, _ = tracked
    dead = f"http://127.0.0.1:{free_port()}"
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "mlflow" not in p.name)
    start = time.monotonic()
    proc = job("evaluate", out, {**env, "MLFLOW_TRACKING_URI": dead})
    assert proc.returncode == 2 and dead in proc.stderr
    assert time.monotonic() - start < 60
    for kept in ("memory/train/manifest.json", "adapter/adapter.json", "predictions/pema_gu.jsonl", "summary.json"):
        assert (out / kept).is_file()
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "mlflow" not in p.name) == before


def test_embedded_store_keeps_artifacts_and_datasets_in_the_output_folder(tmp_path, monkeypatch):
    """With no MLFLOW_TRACKING_URI: artifacts under <out>/mlartifacts (not ./mlruns of the working directory), the
    experiment tagged with its kind (the pinned UI ignores the tag: what opens its runs table is in
    tests/test_mlflow_ui.py), and the pairs a stage reads logged as dataset inputs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pema.tracking.runs import STAGE_SPLITS, stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a ./mlruns would appear here
    out = tmp_path / "out"
    cfg = load_config(SMOKE, [f"data.{s}={ROOT / 'data' / 'wmt22' / (s + '.jsonl')}" for s in ("train", "dev", "test")])
    with stage_run("pipeline", cfg, out) as run:
        mlflow.log_text("x", "probe.txt")
    client = MlflowClient()
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (out / "mlartifacts").resolve().as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert list((out / "mlartifacts").rglob("probe.txt")) and not (tmp_path / "mlruns").exists()
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == list(STAGE_SPLITS["pipeline"]) == ["train", "dev", "test"]
    assert all(i.dataset.digest and i.tags[0].value in ("train", "dev", "test") for i in inputs)
    assert json.loads(inputs[2].dataset.source)["uri"] == str(ROOT / "data" / "wmt22" / "test.jsonl")
    limited = with_overrides(cfg, {"data.train_limit": 3})
    with stage_run("build_memory", limited, out) as other:
        pass
    train_digest = client.get_run(other.info.run_id).inputs.dataset_inputs[0].dataset.digest
    assert train_digest != inputs[0].dataset.digest  # the digest follows the rows used (train_limit)
