"""A Ray Train run whose controller fails (its worker group lost outside a training step, as when a job is rerun
right after its driver was killed) is started again from its checkpoint, a bounded number of times; any other
error is raised at once."""
from __future__ import annotations

import contextlib
import types

import pytest


class FakeTrainer:
    """TorchTrainer's place: ``fit()`` returns the next of ``outcomes`` (an error, or None for success)."""
    outcomes: list = []
    built = 0

    def __init__(self, *args, **kwargs):
        FakeTrainer.built += 1

    def fit(self):
        error = FakeTrainer.outcomes.pop(0)
        if isinstance(error, tuple):  # ("raise", error): Ray 2.x's fit() raises the run's error
            raise error[1]
        checkpoint = types.SimpleNamespace(as_directory=lambda: contextlib.nullcontext("/final"))
        return types.SimpleNamespace(error=error, checkpoint=checkpoint)


def run_fit(monkeypatch, outcomes):
    import pema.executors.ray_train as ray_train
    from pema.config import load_config

    monkeypatch.setattr(ray_train, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(ray_train.time, "sleep", lambda s: None)
    FakeTrainer.outcomes, FakeTrainer.built = list(outcomes), 0
    cfg = load_config(None)
    layout = types.SimpleNamespace(ray_train="/tmp/unused")
    return list(ray_train._fit(lambda c, ctx: None, {}, cfg.train, cfg.resources, False, layout, "train"))


def test_a_controller_error_restarts_the_run(monkeypatch):
    from ray.train import ControllerError

    lost = ControllerError(RuntimeError("placement group removed"))
    assert run_fit(monkeypatch, [lost, lost, None]) == ["/final"] and FakeTrainer.built == 3


def test_controller_retries_are_bounded_and_other_errors_are_not_retried(monkeypatch):
    from ray.train import ControllerError

    from pema.executors.ray_train import CONTROLLER_RETRIES

    lost = ControllerError(RuntimeError("placement group removed"))
    with pytest.raises(ControllerError):
        run_fit(monkeypatch, [lost] * (CONTROLLER_RETRIES + 1))
    assert FakeTrainer.built == CONTROLLER_RETRIES + 1
    with pytest.raises(ValueError):
        run_fit(monkeypatch, [ValueError("a bug in the loop"), None])
    assert FakeTrainer.built == 1


def test_a_controller_error_raised_by_fit_restarts_the_run_too(monkeypatch):
    from ray.train import ControllerError

    from pema.executors.ray_train import CONTROLLER_RETRIES

    lost = ("raise", ControllerError(RuntimeError("placement group removed")))
    assert run_fit(monkeypatch, [lost, None]) == ["/final"] and FakeTrainer.built == 2
    with pytest.raises(ControllerError):
        run_fit(monkeypatch, [lost] * (CONTROLLER_RETRIES + 1))
    with pytest.raises(ValueError):
        run_fit(monkeypatch, [("raise", ValueError("a bug in the loop")), None])
    assert FakeTrainer.built == 1
