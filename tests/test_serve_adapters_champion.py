"""The champion alias moves atomically (pema/tracking/registry.py): two registers of one model name at once read
the champion one after the other, so the better dev BLEU ends as champion and the worse one reports
``champion: true`` only when it truly came first."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_serve_adapters import SMOKE, make_run, register

pytestmark = pytest.mark.timeout(600)


def test_two_registers_at_once_leave_the_better_champion(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pema.config import load_config
    from pema.owner.plm import load_plm
    from pema.tracking import registry
    from pema.tracking.runs import connect, experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE)
    model, _ = load_plm("tiny://llama")
    runs = [make_run(tmp_path / f"run{seed}", seed, cfg, model)[0] for seed in (1, 2)]
    store = tmp_path / "store"
    connect(store)
    experiment_id(output_dir=store)  # made once, before the two threads

    # Each register, once it has read the champion, waits until the other has read it too, or is waiting for the
    # lock: without the lock both read "no champion" before either moves it (the race, made certain); with it the
    # second reads only after the first moved. No timing decides the outcome.
    cond, seen = threading.Condition(), {"read": 0, "waiting": 0}
    real_champion, real_lock = registry.champion, getattr(registry, "champion_lock", None)

    def champion(name):
        found = real_champion(name)
        with cond:
            seen["read"] += 1
            cond.notify_all()
            assert cond.wait_for(lambda: seen["read"] >= 2 or seen["waiting"] > 0, timeout=300)
        return found

    @contextmanager
    def champion_lock(name):
        with cond:
            seen["waiting"] += 1
            cond.notify_all()
        with real_lock(name) as path:
            with cond:
                seen["waiting"] -= 1
            yield path

    monkeypatch.setattr(registry, "champion", champion)
    monkeypatch.setattr(registry, "champion_lock", champion_lock, raising=False)
    results, errors = {}, []

    def go(run, bleu):
        try:
            results[bleu] = register(cfg, run, store, "pema-race", bleu)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(run, bleu)) for run, bleu in zip(runs, (2.0, 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    better, worse = results[2.0], results[1.0]
    final = MlflowClient().get_model_version_by_alias("pema-race", "champion")
    assert str(final.version) == better["version"] and final.tags["dev_bleu"] == "2.0"
    assert better["champion"]
    # the worse one is champion only if it registered first, and then the better one saw it and beat it
    assert worse["champion"] == (worse["previous_champion"] is None)
    if worse["champion"]:
        assert better["previous_champion"] == worse["version"] and better["previous_dev_bleu"] == 1.0
    else:
        assert worse["previous_champion"] == better["version"]
    assert [better["champion"], worse["champion"]].count(True) == 1 + (better["previous_champion"] is not None)


def test_lock_file_sits_next_to_the_store(tmp_path):
    from pema.tracking.registry import champion_lock, lock_path

    db = tmp_path / "mlflow.db"
    assert lock_path("pema/x", f"sqlite:///{db}") == tmp_path / "mlflow.db.pema_x.champion.lock"
    assert lock_path("m", str(tmp_path / "mlruns")) == tmp_path / "mlruns.m.champion.lock"
    server = lock_path("m", "http://127.0.0.1:5000")
    assert server.parent.name == "pema-locks" and server.name.endswith(".m.champion.lock")
    assert server != lock_path("m", "http://127.0.0.1:5001")  # one lock per server


def test_the_lock_is_exclusive_across_processes(tmp_path, monkeypatch):
    import fcntl
    import subprocess
    import sys

    from pema.tracking.registry import lock_path

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = ("import sys\nfrom pema.tracking.registry import champion_lock\n"
            "with champion_lock('m'):\n    print('held', flush=True)\n    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == "held"
        with open(lock_path("m", f"sqlite:///{tmp_path / 'mlflow.db'}"), "a") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(60) == 0
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the holder let go
    finally:
        if child.poll() is None:
            child.kill()
