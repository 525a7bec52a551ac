"""The two-phase driver and resumable training: a run resumed from any checkpoint ends exactly where an
uninterrupted run ends, runs fewer steps, and checkpoints survive a safetensors + JSON round trip."""
import copy
import dataclasses
import json

import pytest
import torch

from pema.adapter.checkpoint import load_checkpoint, save_checkpoint
from pema.adapter.phases import TrainCheckpoint, phase_plan, run_phases
from pema.config import TrainConfig
from pema.errors import CheckpointError
from test_train import Memory, make_head, new_adapter, snapshot, states_equal

CFG = TrainConfig(rct_epochs=2, rct_lr=1e-2, epochs=3, lr=1e-2, kappa=0.2, evals_per_epoch=2, batch_size=32)


def run(mem, head, cfg=CFG, seed=0, dropout=0.0, **kw):
    adapter = new_adapter(seed, dropout)
    steps = []
    results = run_phases(adapter, head, cfg, train_batches=mem.train_batches, train_rows=mem.n_train,
                         dev_batches=mem.dev_batches, progress=False, steps_done=steps.append, **kw)
    return adapter, results, sum(steps)


@pytest.fixture(scope="module")
def fresh():
    mem, head = Memory(), make_head()
    checkpoints = []
    adapter, results, steps = run(mem, head, checkpoint=lambda c, m: checkpoints.append(copy.deepcopy(c)))
    return mem, head, adapter, results, steps, checkpoints


def test_phase_plan_follows_method():
    assert [p["phase"] for p in phase_plan(CFG)] == ["rct", "rct_pd"]
    assert [p["phase"] for p in phase_plan(dataclasses.replace(CFG, method="pd", b_pd_init="random"))] == ["pd"]
    assert [p["phase"] for p in phase_plan(dataclasses.replace(CFG, method="rct", b_pd_init="random"))] == ["rct"]


def test_checkpoints_at_every_validation(fresh):
    _, _, _, results, steps, checkpoints = fresh
    assert steps == sum(r.steps for r in results)
    assert len(checkpoints) == sum(len(r.history) for r in results)  # one per check, the step-0 check included
    assert [c.phase_index for c in checkpoints] == [0] * len(results[0].history) + [1] * len(results[1].history)
    assert checkpoints[-1].results[0]["best_val"] == results[0].best_val


@pytest.mark.parametrize("which", [1, 3, -2, "phase2_start"])
def test_resume_reproduces_the_uninterrupted_run_with_fewer_steps(fresh, which):
    mem, head, adapter, results, steps, checkpoints = fresh
    if which == "phase2_start":
        ckpt = next(c for c in checkpoints if c.phase_index == 1)
    else:
        ckpt = checkpoints[which]
    resumed, resumed_results, resumed_steps = run(mem, head, seed=99, resume=copy.deepcopy(ckpt))
    assert states_equal(snapshot(resumed), snapshot(adapter))  # same ops, same order: bit-identical
    assert [r.best_val for r in resumed_results] == [r.best_val for r in results]
    assert [r.steps for r in resumed_results] == [r.steps for r in results]
    assert resumed_steps == steps - ckpt.state.step - sum(r["steps"] for r in ckpt.results) < steps


def test_checkpoint_round_trip_on_disk(fresh, tmp_path):
    mem, head, adapter, results, _, checkpoints = fresh
    ckpt = checkpoints[len(results[0].history) + 1]  # inside phase 2, optimizer state populated
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "ck"))
    assert loaded.phase_index == ckpt.phase_index and loaded.results == json.loads(json.dumps(ckpt.results))
    assert states_equal(loaded.state.adapter, ckpt.state.adapter) and states_equal(loaded.state.best, ckpt.state.best)
    for i, slots in ckpt.state.optimizer["state"].items():
        for name, value in slots.items():
            assert torch.equal(loaded.state.optimizer["state"][i][name], value)
    resumed, _, _ = run(mem, head, seed=5, resume=loaded)
    assert states_equal(snapshot(resumed), snapshot(adapter))
    assert not list(tmp_path.glob("ck/*.tmp"))


def test_bad_resume_and_bad_checkpoint_folders(fresh, tmp_path):
    mem, head, _, _, _, checkpoints = fresh
    wrong = TrainCheckpoint(0, [], copy.deepcopy(checkpoints[-1].state))  # a phase-2 state claimed as phase 0
    with pytest.raises(ValueError, match="does not fit"):
        run(mem, head, resume=wrong)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(checkpoints[0], tmp_path / "bad")
    (tmp_path / "bad" / "state.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "bad")


def test_resume_with_dropout_restores_the_generator(tmp_path):
    """Dropout draws from torch's generator: a resumed run must draw the same masks (state saved in the checkpoint)."""
    mem, head = Memory(), make_head()
    checkpoints = []
    adapter, _, _ = run(mem, head, dropout=0.3, checkpoint=lambda c, m: checkpoints.append(copy.deepcopy(c)))
    ckpt = load_checkpoint(save_checkpoint(checkpoints[2], tmp_path / "ck"))
    torch.manual_seed(1234)  # a different generator state than at the checkpoint
    resumed, _, _ = run(mem, head, seed=7, dropout=0.3, resume=ckpt)
    assert states_equal(snapshot(resumed), snapshot(adapter))


def test_exact_rct_phase_takes_no_steps_and_beats_sgd_reconstruction():
    """train.rct_solver=exact: the RCT phase is the closed form (0 steps, its dev MSE below SGD's), phase 2 starts
    from it (B_pd = B_rct) and the mixture objective is what phase 2 reports and selects on."""
    mem, head = Memory(), make_head()
    _, sgd, _ = run(mem, head)
    exact_cfg = dataclasses.replace(CFG, rct_solver="exact", pd_objective="mixture", mixture_lam=0.5)
    history = []
    adapter, exact, steps = run(mem, head, exact_cfg, report=history.append)
    assert exact[0].phase == "rct" and exact[0].steps == 0 and exact[0].best_val < sgd[0].best_val
    assert steps == exact[1].steps > 0
    pd_checks = [h for h in history if h["phase"] == "rct_pd"]
    assert all("val_mix_ce" in h and "val_ce" in h for h in pd_checks)
    # the selected loss is kappa * rct + (1 - kappa) * mixture NLL (float32 batch means: 1e-5)
    for h in pd_checks:
        assert h["val_loss"] == pytest.approx(0.2 * h["val_rct"] + 0.8 * h["val_mix_ce"], abs=1e-5)
    assert exact[1].best_val == pytest.approx(min(h["val_loss"] for h in pd_checks), abs=0)
