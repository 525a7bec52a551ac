"""The two-phase driver: RCT, then RCT_PD (or PD only, or RCT only), resumable from a checkpoint.

Between the phases A is carried over or re-initialised (``train.phase2_init_A``) and B_pd starts from B_rct, at
random or at zero (``train.b_pd_init``). A :class:`TrainCheckpoint` names the phase in progress, the results of the
finished ones and the :class:`~pema.adapter.train.PhaseState` of the current one; passing it back as ``resume``
continues where it was taken. Pure torch: data comes in as callables, side effects as callbacks.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from pema.adapter.head import OutputHead
from pema.adapter.model import PemaAdapter
from pema.adapter.rct_exact import fit_rct_exact
from pema.adapter.train import PhaseData, PhaseHooks, PhaseResult, PhaseState, train_phase, validate
from pema.config import TrainConfig


@dataclass
class TrainCheckpoint:
    phase_index: int  # index into phase_plan(cfg)
    results: list[dict]  # dataclasses.asdict(PhaseResult) of the finished phases
    state: PhaseState


def phase_plan(t: TrainConfig) -> list[dict]:
    """``[{"phase", "epochs", "lr", "kappa"}, ...]`` in training order. ``train.warm_start``: the last phase only
    (the adapter starts from the one trained before, so neither RCT nor the second phase's initialisation runs)."""
    plan = []
    if t.method in ("rct_pd", "rct"):
        plan.append({"phase": "rct", "epochs": t.rct_epochs, "lr": t.rct_lr, "kappa": 1.0})
    if t.method != "rct":
        plan.append({"phase": t.method, "epochs": t.epochs, "lr": t.lr, "kappa": t.kappa})
    return plan[-1:] if t.warm_start else plan


def _prepare_second_phase(adapter: PemaAdapter, t: TrainConfig) -> None:
    if t.method == "rct_pd" and t.phase2_init_A == "reinit":
        adapter.reset_A()
    adapter.reset_B("B_pd", t.b_pd_init)


def _exact_rct(adapter: PemaAdapter, head: OutputHead, train_batches, dev_batches, report) -> PhaseResult:
    """The RCT phase in closed form (``train.rct_solver: exact``): no optimizer steps, one dev check after."""
    start = time.perf_counter()
    rows = fit_rct_exact(adapter, train_batches(0))
    check = validate(adapter, head, dev_batches, "rct", 1.0)
    metrics = {"phase": "rct", "epoch": 1.0, "step": 0, "solver": "exact", **{"val_" + k: v for k, v in check.items()}}
    if report:
        report(metrics)
    adapter.eval()
    return PhaseResult("rct", check["loss"], 0, 0, False, time.perf_counter() - start, rows, [metrics])


def run_phases(adapter: PemaAdapter, head: OutputHead, t: TrainConfig, *,
               train_batches: Callable[[int], Iterable[dict]], train_rows: int,
               dev_batches: Callable[[], Iterable[dict]], vocab_subset: Callable[[], torch.Tensor] | None = None,
               report: Callable[[dict], None] | None = None, progress: bool = True,
               checkpoint: Callable[[TrainCheckpoint, dict], None] | None = None,
               resume: TrainCheckpoint | None = None, wrap=None,
               steps_done: Callable[[int], None] | None = None) -> list[PhaseResult]:
    """Run every phase of ``t`` (seeded by the caller); returns one result per phase, best state restored.

    ``vocab_subset()`` is called once, for the PD phase, when ``t.pd_vocab == "targets"``.
    """
    plan = phase_plan(t)
    start = 0
    results: list[PhaseResult] = []
    if resume is not None:
        if not 0 <= resume.phase_index < len(plan) or resume.state.phase != plan[resume.phase_index]["phase"]:
            raise ValueError(f"checkpoint of phase {resume.state.phase!r} (index {resume.phase_index}) does not "
                             f"fit the phases {[p['phase'] for p in plan]} of train.method={t.method!r}")
        start = resume.phase_index
        results = [PhaseResult(**r) for r in resume.results]
    for index in range(start, len(plan)):
        p = plan[index]
        state = resume.state if resume is not None and index == resume.phase_index else None
        if index > 0 and state is None:
            _prepare_second_phase(adapter, t)
        subset = None
        if p["phase"] != "rct" and t.pd_vocab == "targets":
            if vocab_subset is None:
                raise ValueError("train.pd_vocab='targets' needs the vocab_subset callable")
            subset = vocab_subset()
        if p["phase"] == "rct" and t.rct_solver == "exact":
            results.append(_exact_rct(adapter, head, train_batches, dev_batches, report))
            continue
        done = [dataclasses.asdict(r) for r in results]
        on_check = None
        if checkpoint:
            on_check = lambda st, metrics, i=index, done=done: checkpoint(TrainCheckpoint(i, done, st), metrics)
        results.append(train_phase(
            adapter, head, PhaseData(train_batches, train_rows, dev_batches, subset), phase=p["phase"],
            epochs=p["epochs"], lr=p["lr"], kappa=p["kappa"], weight_decay=t.weight_decay,
            evals_per_epoch=t.evals_per_epoch, resume=state,
            hooks=PhaseHooks(report=report, checkpoint=on_check, steps_done=steps_done, wrap=wrap, progress=progress),
            mixture_lam=t.mixture_lam if t.pd_objective == "mixture" else None, distill_beta=t.distill_beta))
    return results
