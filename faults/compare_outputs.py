"""What a rerun after a kill must give: the uninterrupted run's outputs, and an MLflow store with nothing left
RUNNING. Used by :mod:`faults.kill_sweep` (each check returns a list of problems; empty: equal)."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
from safetensors.numpy import load, load_file

PER_TRIAL = {"tune_trial"}  # stages with one run per trial, not one per job


def _tensors_equal(a: Path, b: Path, what: str) -> list[str]:
    problems = []
    for fa in sorted(a.glob("*.safetensors")):
        fb = b / fa.name
        if not fb.is_file():
            problems.append(f"{what}: {fb} is missing")
            continue
        ta, tb = load_file(fa), load_file(fb)
        if ta.keys() != tb.keys():
            problems.append(f"{what}: {fa.name} holds {sorted(tb)} instead of {sorted(ta)}")
        for k in ta.keys() & tb.keys():
            if ta[k].shape != tb[k].shape or not np.array_equal(ta[k], tb[k]):
                diff = (np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max()
                        if ta[k].shape == tb[k].shape else "shape")
                problems.append(f"{what}: {fa.name}[{k}] differs (max |diff| {diff})")
    if not list(a.glob("*.safetensors")):
        problems.append(f"{what}: the reference {a} holds no tensors")
    return problems


def memory_problems(ref: Path, out: Path) -> list[str]:
    from pema.formats.memory import MemoryReader

    problems = []
    for split in ("train", "dev"):
        try:
            a, b = MemoryReader(ref / "memory" / split).read_all(), MemoryReader(out / "memory" / split).read_all()
        except Exception as exc:  # noqa: BLE001  (reported, not raised: the sweep goes on)
            return [f"memory/{split}: {type(exc).__name__}: {exc}"]
        for column in a:
            if not np.array_equal(a[column], b[column]):
                problems.append(f"memory/{split}: column {column} differs ({len(a[column])} vs {len(b[column])} rows)")
        pairs = set(zip(b["example"].tolist(), b["position"].tolist()))
        if len(pairs) != len(b["example"]):
            problems.append(f"memory/{split}: {len(b['example']) - len(pairs)} (example, position) rows twice")
    return problems


def _scores(summary: dict) -> dict:
    return {k: {m: v.get(m) for m in ("bleu", "chrf", "ter")} for k, v in summary.items() if isinstance(v, dict)
            and "bleu" in v}


def _champions(folder: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    found = {}
    for model in client.search_registered_models():
        mv = client.get_model_version_by_alias(model.name, "champion")
        found[model.name] = mv.tags.get("dev_bleu")
    return found


def service_answer(port: int, tokens: dict) -> dict:
    """The owner service's head fingerprint and its answer to one fixed /context request (compared by
    :func:`same_answer`: a replica's CPU thread count changes the last bits of a float32 matmul, so two healthy
    replicas need not give the same bytes)."""
    token = next(iter(tokens.values()))
    base = f"http://127.0.0.1:{port}/owner"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(base + "/health", headers=headers), timeout=60) as r:
        health = json.loads(r.read())
    body = json.dumps({"examples": [{"example": 0, "prompt_ids": [5, 9, 13, 2], "target_ids": [7, 3, 11]}]})
    req = urllib.request.Request(base + "/context", data=body.encode(), method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = load(r.read())
    return {"head_fingerprint": health["head_fingerprint"],
            "context": {name: a.astype(np.float64).tolist() if a.dtype.kind == "f" else a.tolist()
                        for name, a in sorted(answer.items())}}


def same_answer(a: dict, b: dict) -> bool:
    """Same fingerprint and integer columns, float columns within 1e-4 (see :func:`service_answer`)."""
    if a["head_fingerprint"] != b["head_fingerprint"] or a["context"].keys() != b["context"].keys():
        return False
    for name, x in a["context"].items():
        x, y = np.asarray(x), np.asarray(b["context"][name])
        if x.shape != y.shape or not (np.allclose(x, y, rtol=0, atol=1e-4) if x.dtype.kind == "f"
                                      else np.array_equal(x, y)):
            return False
    return True


def compare(outputs: tuple[str, ...], ref: Path, out: Path, *, port: int | None = None,
            tokens: dict | None = None) -> list[str]:
    problems: list[str] = []
    for what in outputs:
        if what == "memory":
            problems += memory_problems(ref, out)
        elif what in ("head", "adapter"):
            problems += _tensors_equal(ref / what, out / what, what)
        elif what == "predictions":
            for fa in sorted((ref / "predictions").glob("*.jsonl")):
                fb = out / "predictions" / fa.name
                if not fb.is_file() or fa.read_bytes() != fb.read_bytes():
                    problems.append(f"predictions/{fa.name} differs or is missing")
        elif what == "summary":
            a = json.loads((ref / "summary.json").read_text())
            b = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
            if _scores(a) != _scores(b):
                problems.append("summary.json: the scores differ")
        elif what == "champion":
            if (a := _champions(ref)) != (b := _champions(out)):
                problems.append(f"champion: {b} instead of {a}")
        elif what == "service":
            ref_file = ref / "service.json"
            if not ref_file.is_file():
                ref_file.write_text(json.dumps(service_answer(port, tokens)))  # the reference, read once
            try:
                answer = service_answer(port, tokens)
            except OSError as exc:
                problems.append(f"service: no answer at port {port} ({exc})")
                continue
            if not same_answer(json.loads(ref_file.read_text()), answer):
                problems.append(f"service: another answer than the reference's ({ref_file})")
    return problems


def mlflow_problems(out: Path, killed: bool, *, owner: bool = False) -> dict:
    """The store opens, no run is RUNNING and every stage has a FINISHED run; counts stages finished twice (the
    kill came after the stage's run had ended, before the process did)."""
    if owner:
        return {"problems": [], "finished_twice": 0}
    db = out / "mlflow.db"
    if not db.is_file():
        return {"problems": [f"no MLflow store at {db}"], "finished_twice": 0}
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    except Exception as exc:  # noqa: BLE001
        return {"problems": [f"the MLflow store {db} does not open: {type(exc).__name__}: {exc}"],
                "finished_twice": 0}
    problems, finished = [], {}
    for run in runs:
        # a stage's run, or one of its per-system child runs (compare: one per system, tagged pema.system)
        stage = (run.data.tags.get("pema.stage", "?"), run.data.tags.get("pema.system", ""))
        if run.info.status == "RUNNING":
            problems.append(f"MLflow run {run.info.run_id} ({'/'.join(filter(None, stage))}) is left RUNNING")
        if run.info.status == "FINISHED":
            finished[stage] = finished.get(stage, 0) + 1
    stages = {(r.data.tags.get("pema.stage", "?"), r.data.tags.get("pema.system", "")) for r in runs}
    problems += [f"MLflow: no FINISHED run of stage {'/'.join(filter(None, s))}" for s in sorted(stages)
                 if s not in finished]
    twice = sum(1 for s, n in finished.items() if n > 1 and s[0] not in PER_TRIAL)
    return {"problems": problems, "finished_twice": twice}
