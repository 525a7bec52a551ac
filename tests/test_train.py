"""Tests of pema.adapter.train (phase training, early stopping, best checkpoint) and pema.adapter.io (bundles).

Synthetic memory: keys are unit-RMS random vectors (like real keys), tokens come from a fixed random linear
teacher, the head is a small random RMS head. Everything is seeded and tiny (d=16, vocab=24).
"""

import copy

import numpy as np
import pytest
import torch

import pema.adapter.train as train_mod
from pema.adapter.head import OutputHead
from pema.adapter.io import load_adapter, load_head, save_adapter
from pema.adapter.model import PemaAdapter
from pema.adapter.train import (PhaseData, PhaseHooks, phase_losses, should_stop, target_vocab, train_phase, validate,
                                vocab_remap)
from pema.errors import MemoryFormatError, MemoryMismatchError

D, V, RANK = 16, 24, 8


# ----------------------------------------------------------------------------------------------------------------
# synthetic memory
# ----------------------------------------------------------------------------------------------------------------

def make_head(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = OutputHead(norm_type="rms", eps=1e-6, norm_weight=1.0 + 0.1 * torch.randn(D, generator=g),
                      lm_head_weight=torch.randn(V, D, generator=g))
    head.requires_grad_(False)
    return head


def make_memory(n, seed, token_ids=None):
    """keys (n, D) float32 with unit RMS; tokens = token_ids[argmax(T k)] for a FIXED teacher T (seed 123)."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, D)).astype(np.float32)
    keys /= np.sqrt((keys ** 2).mean(-1, keepdims=True))
    token_ids = np.arange(V) if token_ids is None else np.asarray(token_ids)
    teacher = np.random.default_rng(123).standard_normal((len(token_ids), D)).astype(np.float32)
    tokens = token_ids[np.argmax(keys @ teacher.T, axis=-1)].astype(np.int64)
    return keys, tokens


def batches_of(keys, tokens, size, shuffle_seed=None):
    order = np.arange(len(tokens))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(tokens))
    return [{"key": keys[order[s:s + size]], "token": tokens[order[s:s + size]]} for s in range(0, len(tokens), size)]


class Memory:
    def __init__(self, n_train=256, n_dev=96, batch=32, token_ids=None):
        self.train_keys, self.train_tokens = make_memory(n_train, seed=1, token_ids=token_ids)
        self.dev_keys, self.dev_tokens = make_memory(n_dev, seed=2, token_ids=token_ids)
        self.batch, self.n_train = batch, n_train

    def train_batches(self, epoch):
        return batches_of(self.train_keys, self.train_tokens, self.batch, shuffle_seed=epoch)

    def dev_batches(self):
        return batches_of(self.dev_keys, self.dev_tokens, 40)  # 40 + 40 + 16: uneven on purpose


def new_adapter(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return PemaAdapter(D, RANK, alpha=RANK, dropout=dropout)


def snapshot(adapter):
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# should_stop
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("history, expected", [
    ([], False),
    ([1.0], False),
    ([1.0, 2.0], False),            # fewer than three checks never stop
    ([1.0, 0.9, 1.1], True),        # last > both previous
    ([1.0, 0.9, 0.95], False),      # 0.95 > 0.9 but not > 1.0
    ([3.0, 2.0, 2.5], False),
    ([2.0, 1.0, 3.0], True),
    ([1.0, 2.0, 3.0], True),
    ([1.0, 1.0, 1.0], False),       # ties are not rises
    ([0.5, 1.0, 1.0], False),       # equal to the previous check
    ([1.0, 0.5, 1.0], False),       # equal to the check before that
    ([5.0, 1.0, 1.0, 1.0], False),
    ([5.0, 4.0, 3.0, 2.0, 1.0], False),
    ([9.0, 1.0, 2.0, 3.0], True),   # only the last three matter
])
def test_should_stop(history, expected):
    assert should_stop(history) is expected


# ----------------------------------------------------------------------------------------------------------------
# helpers: vocab subset, validate
# ----------------------------------------------------------------------------------------------------------------

def test_target_vocab_and_remap():
    subset = target_vocab([np.array([5, 3, 5]), np.array([9, 3]), np.array([0])])
    assert subset.tolist() == [0, 3, 5, 9] and subset.dtype == torch.long
    table = vocab_remap(subset, 12)
    assert table.tolist() == [0, -1, -1, 1, -1, 2, -1, -1, -1, 3, -1, -1]


def test_validate_is_row_weighted_and_restores_mode():
    mem, head = Memory(), make_head()
    adapter = new_adapter(dropout=0.3)
    adapter.train()
    uneven = validate(adapter, head, mem.dev_batches, "rct_pd", 0.3)
    whole = validate(adapter, head, lambda: batches_of(mem.dev_keys, mem.dev_tokens, 10_000), "rct_pd", 0.3)
    assert uneven.keys() == whole.keys() == {"rct", "ce", "loss"}
    for k in whole:  # float32 batch means re-weighted in float64: 1e-5 relative
        assert uneven[k] == pytest.approx(whole[k], rel=1e-5)
    assert adapter.training  # mode restored
    # dropout is off during validation: two calls agree exactly
    assert validate(adapter, head, mem.dev_batches, "rct_pd", 0.3) == uneven
    with pytest.raises(ValueError):
        validate(adapter, head, lambda: [], "rct", 1.0)


# ----------------------------------------------------------------------------------------------------------------
# train_phase on the synthetic memory
# ----------------------------------------------------------------------------------------------------------------

def run_phase(adapter, mem, head, phase, epochs=3, lr=2e-2, vocab_subset=None, report=None, save=None, **kw):
    return train_phase(adapter, head, PhaseData(mem.train_batches, mem.n_train, mem.dev_batches, vocab_subset),
                       phase=phase, epochs=epochs, lr=lr, hooks=PhaseHooks(report=report, save=save, progress=False),
                       **kw)


def test_rct_phase_reduces_reconstruction_loss_and_freezes_B_pd():
    mem, head = Memory(), make_head()
    adapter = new_adapter()
    before = snapshot(adapter)
    res = run_phase(adapter, mem, head, "rct")
    first, best = res.history[0]["val_loss"], res.best_val
    # rank 8 of 16 dims: reconstruction can explain about half the variance; demand a clear 30% drop
    assert best < 0.7 * first, (first, best)
    assert set(res.history[0]) >= {"val_rct", "val_loss"} and "val_ce" not in res.history[0]
    assert torch.equal(adapter.B_pd, before["B_pd"])           # not a parameter of this phase
    assert not torch.equal(adapter.A, before["A"])
    assert not torch.equal(adapter.B_rct, before["B_rct"])
    assert res.steps == 3 * 8 and res.rows_seen == 3 * 256 and not adapter.training
    # the restored adapter really has the best validation loss (float32 re-evaluation: 1e-6 relative)
    assert validate(adapter, head, mem.dev_batches, "rct", 1.0)["loss"] == pytest.approx(best, rel=1e-6)


def test_rct_pd_phase_reduces_ce_and_keeps_B_rct_frozen():
    mem, head = Memory(), make_head()
    adapter = new_adapter()
    run_phase(adapter, mem, head, "rct", epochs=1)
    adapter.reset_B("B_pd", "from_rct")
    b_rct = adapter.B_rct.detach().clone()
    a_before = adapter.A.detach().clone()
    res = run_phase(adapter, mem, head, "rct_pd", kappa=0.3, epochs=4)
    ce = [h["val_ce"] for h in res.history]
    assert "val_rct" in res.history[0]
    best = min(range(len(res.history)), key=lambda i: res.history[i]["val_loss"])
    assert ce[best] < 0.85 * ce[0], ce  # joint objective with kappa 0.3: CE must drop clearly
    assert torch.equal(adapter.B_rct, b_rct)  # frozen in the second phase
    assert adapter.B_rct.requires_grad is False
    assert not torch.equal(adapter.A, a_before)


def test_pd_phase_with_vocab_subset_reduces_ce():
    subset_ids = [1, 4, 6, 9, 13, 17, 20, 23]
    mem, head = Memory(token_ids=subset_ids), make_head()
    subset = target_vocab([mem.train_tokens])
    assert set(subset.tolist()) <= set(subset_ids) and len(subset) >= 5
    adapter = new_adapter()
    b_rct = adapter.B_rct.detach().clone()
    remap = vocab_remap(subset, V)
    batch = {"key": mem.dev_keys, "token": mem.dev_tokens}
    sub_ce_before = phase_losses(adapter.eval(), head, batch, "pd", 0.0, subset, remap)["ce"].item()
    res = run_phase(adapter, mem, head, "pd", epochs=4, vocab_subset=subset)
    sub_ce_after = phase_losses(adapter, head, batch, "pd", 0.0, subset, remap)["ce"].item()
    # validation runs over the full vocabulary, training over the subset: both must fall clearly
    assert res.best_val < 0.8 * res.history[0]["val_loss"], [h["val_loss"] for h in res.history]
    assert sub_ce_after < 0.8 * sub_ce_before, (sub_ce_before, sub_ce_after)
    assert torch.equal(adapter.B_rct, b_rct)
    assert "val_rct" not in res.history[0]


def test_subset_rejects_target_outside_it():
    head = make_head()
    subset = torch.tensor([0, 2, 4])
    batch = {"key": np.ones((2, D), np.float32), "token": np.array([2, 3])}
    with pytest.raises(ValueError, match="subset"):
        phase_losses(new_adapter(), head, batch, "pd", 0.0, subset, vocab_remap(subset, V))


def test_train_phase_rejects_bad_arguments():
    mem, head = Memory(), make_head()
    with pytest.raises(ValueError):
        run_phase(new_adapter(), mem, head, "both")
    with pytest.raises(ValueError):
        train_phase(new_adapter(), head, PhaseData(mem.train_batches, 0, mem.dev_batches), phase="rct", epochs=1,
                    lr=1e-3, hooks=PhaseHooks(progress=False))


# ----------------------------------------------------------------------------------------------------------------
# validation bookkeeping: report, save, early stop, best checkpoint (validate scripted by monkeypatch)
# ----------------------------------------------------------------------------------------------------------------

class ScriptedValidate:
    """Replaces train.validate: returns the scripted losses and snapshots the adapter at each call."""

    def __init__(self, losses):
        self.losses, self.states = list(losses), []

    def __call__(self, adapter, head, dev_batches, phase, kappa, mixture_lam=None):
        self.states.append(snapshot(adapter))
        return {"loss": self.losses[len(self.states) - 1]}


def scripted_run(monkeypatch, losses, epochs=2, evals_per_epoch=4):
    """4 batches of 8 rows per epoch and 4 validations per epoch: one validation after every step."""
    mem, head = Memory(n_train=32, batch=8), make_head()
    fake = ScriptedValidate(losses)
    monkeypatch.setattr(train_mod, "validate", fake)
    reports, saves = [], []
    adapter = new_adapter()
    res = run_phase(adapter, mem, head, "rct", epochs=epochs, lr=1e-2, evals_per_epoch=evals_per_epoch,
                    report=reports.append, save=lambda state, metrics: saves.append((copy.deepcopy(state), metrics)))
    return adapter, res, fake, reports, saves


def test_early_stop_restores_best_checkpoint(monkeypatch):
    # checks: initial 5, then 4 (best), 3 (best), 3.5 (not above both), 4.5 (above 3.5 and 3 -> stop)
    adapter, res, fake, reports, saves = scripted_run(monkeypatch, [5.0, 4.0, 3.0, 3.5, 4.5, 1.0, 1.0, 1.0, 1.0])
    assert res.stopped_early and res.steps == 4
    assert len(fake.states) == 5
    assert res.best_val == 3.0 and res.best_step == 2
    assert states_equal(snapshot(adapter), fake.states[2])        # the best checkpoint is restored ...
    assert not states_equal(fake.states[4], fake.states[2])        # ... and it is not the last state
    assert len(reports) == len(res.history) == 5                   # once per validation, initial check included
    assert [r["val_loss"] for r in reports] == [5.0, 4.0, 3.0, 3.5, 4.5]
    assert [r["step"] for r in reports] == [0, 1, 2, 3, 4]
    assert "train_loss" not in reports[0] and all("train_loss" in r for r in reports[1:])
    assert [m["step"] for _, m in saves] == [1, 2]                 # one save per improvement
    assert states_equal(saves[-1][0], fake.states[2])
    assert states_equal(saves[0][0], fake.states[1])


def test_no_early_stop_when_validation_keeps_falling(monkeypatch):
    losses = [9.0 - i for i in range(9)]
    adapter, res, fake, reports, saves = scripted_run(monkeypatch, losses)
    assert not res.stopped_early and res.steps == 8 and res.rows_seen == 64
    assert len(reports) == 9 and len(saves) == 8
    assert res.best_step == 8 and res.best_val == 1.0
    assert states_equal(snapshot(adapter), fake.states[-1])
    assert [r["epoch"] for r in reports] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


def test_initial_check_can_be_the_best(monkeypatch):
    # 2.0 (only two checks), 1.5 (not above 2.0), 3.0 (above both -> stop); the untrained state is best
    adapter, res, fake, reports, saves = scripted_run(monkeypatch, [1.0, 2.0, 1.5, 3.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert res.stopped_early and res.steps == 3
    assert res.best_step == 0 and res.best_val == 1.0
    assert saves == []
    assert states_equal(snapshot(adapter), fake.states[0])
    assert not states_equal(snapshot(adapter), fake.states[-1])
    assert len(reports) == 4


def test_one_validation_per_epoch(monkeypatch):
    adapter, res, fake, reports, saves = scripted_run(monkeypatch, [3.0, 2.0, 1.0, 0.5], epochs=3, evals_per_epoch=1)
    assert len(fake.states) == 4 and res.steps == 12
    assert [r["step"] for r in reports] == [0, 4, 8, 12]


# ----------------------------------------------------------------------------------------------------------------
# adapter bundles
# ----------------------------------------------------------------------------------------------------------------

def test_save_load_adapter_roundtrip_exact(tmp_path):
    mem, head = Memory(), make_head()
    adapter = new_adapter(dropout=0.2)
    with torch.no_grad():
        adapter.B_pd.normal_()  # make B_pd differ from its init
    adapter.eval()
    save_adapter(adapter, tmp_path / "adapter", {"model_id": "org/m", "note": "x"})
    loaded, meta = load_adapter(tmp_path / "adapter", {"d": D, "model_id": "org/m"})
    assert not loaded.training
    assert (loaded.d, loaded.rank, loaded.alpha, loaded.p) == (D, RANK, float(RANK), 0.2)
    assert meta["note"] == "x" and meta["model_id"] == "org/m"
    keys = torch.as_tensor(mem.dev_keys)
    assert torch.equal(loaded.log_probs(keys, head), adapter.log_probs(keys, head))
    assert states_equal(snapshot(loaded), snapshot(adapter))


def test_load_adapter_checks_head_meta(tmp_path):
    adapter = new_adapter()
    save_adapter(adapter, tmp_path / "a", {"model_id": "org/m"})
    with pytest.raises(MemoryMismatchError):
        load_adapter(tmp_path / "a", {"d": D + 1, "model_id": "org/m"})
    with pytest.raises(MemoryMismatchError):
        load_adapter(tmp_path / "a", {"d": D, "model_id": "other/model"})
    load_adapter(tmp_path / "a")  # no head_meta: no check
    with pytest.raises(MemoryFormatError):
        load_adapter(tmp_path / "missing")


def test_adapter_roundtrip_with_exported_tiny_head(tmp_path):
    from pema.owner.export import export_head
    from pema.owner.plm import tiny_model

    model = tiny_model("llama", vocab_size=100)
    meta_out = export_head(model, tmp_path / "head", model_id="tiny://llama")
    head, head_meta = load_head(tmp_path / "head")
    assert head_meta["d"] == meta_out["d"] == 64 and head.vocab_size == 100
    torch.manual_seed(0)
    adapter = PemaAdapter(head.d, 4, alpha=4.0, dropout=0.0).eval()
    save_adapter(adapter, tmp_path / "adapter", {"model_id": head_meta["model_id"]})
    loaded, _ = load_adapter(tmp_path / "adapter", head_meta)
    keys = torch.randn(5, head.d)
    assert torch.equal(loaded.log_probs(keys, head), adapter.log_probs(keys, head))
    with pytest.raises(MemoryMismatchError):
        load_adapter(tmp_path / "adapter", dict(head_meta, d=32))
