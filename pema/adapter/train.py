"""Training loop for one phase (RCT, RCT_PD or PD) and the two-phase driver.

Side effects are passed in: ``report(metrics)`` after each validation and ``save(state, metrics)`` on each new best.
Data comes in as callables that yield batches ``{"key": (n, d) float32, "token": (n,) int}``, so this module reads
no files and imports no Ray or MLflow.

Early stopping follows the seed's rule: stop when the validation loss rises above BOTH of the two previous
checks. The best checkpoint (lowest validation loss, the check before training included) is restored at the end.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from pema.adapter.head import OutputHead
from pema.adapter.losses import distill_ce, joint_loss, pd_loss, rct_loss
from pema.adapter.model import PemaAdapter

Batches = Callable[[], Iterable[dict]]
PHASES = {"rct": ("A", "B_rct"), "rct_pd": ("A", "B_pd"), "pd": ("A", "B_pd")}
PHASE_KAPPA = {"rct": 1.0, "pd": 0.0}


@dataclass
class PhaseResult:
    phase: str
    best_val: float
    best_step: int
    steps: int
    stopped_early: bool
    seconds: float
    rows_seen: int
    history: list[dict] = field(default_factory=list)

    @property
    def entries_per_s(self) -> float:
        return self.rows_seen / self.seconds if self.seconds > 0 else float("nan")


def should_stop(val_losses: list[float]) -> bool:
    """The seed's rule: the latest check is worse than both of the two before it."""
    return len(val_losses) >= 3 and val_losses[-1] > val_losses[-2] and val_losses[-1] > val_losses[-3]


def vocab_remap(subset: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Lookup table token id -> index in ``subset`` (-1 where absent)."""
    table = torch.full((vocab_size,), -1, dtype=torch.long, device=subset.device)
    table[subset] = torch.arange(len(subset), device=subset.device)
    return table


def mixture_nll(logits_pema: torch.Tensor, logits_lm: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Mean ``-log((1 - lam) P_LM(y) + lam P_PEMA(y))`` over the batch, in log space: logits (batch, vocab),
    target (batch,), lam in (0, 1]. The loss of what decoding uses (the mixture), not of P_PEMA alone."""
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"mixture lam={lam} must be in (0, 1]")
    lp_pema = -torch.nn.functional.cross_entropy(logits_pema, target, reduction="none")
    if lam == 1.0:
        return -lp_pema.mean()
    lp_lm = -torch.nn.functional.cross_entropy(logits_lm, target, reduction="none")
    return -torch.logaddexp(lp_lm + math.log1p(-lam), lp_pema + math.log(lam)).mean()


def phase_losses(adapter: PemaAdapter, head: OutputHead, batch: dict, phase: str, kappa: float,
                 vocab_subset: torch.Tensor | None = None, remap: torch.Tensor | None = None,
                 mixture_lam: float | None = None, distill_beta: float = 0.0) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: ``{"loss", "rct"?, "ce"?, "mix_ce"?, "knn_ce"?}``.

    ``ce`` is P_PEMA's cross-entropy. With ``mixture_lam`` the prediction term of the loss is ``mix_ce``, the
    mixture's NLL with P_LM = the head applied to the stored key (:func:`mixture_nll`), instead of ``ce``. With
    ``distill_beta`` > 0 and a batch that carries its rows' neighbours (``nb_token``, ``nb_weight``: the training
    memory's, from :func:`pema.baselines.knn.neighbours_outside_group`), the prediction term is
    ``(1 - beta) ce + beta knn_ce``: the cross-entropy against ``(1 - beta) onehot(y) + beta p_kNN``. A batch
    without neighbours (the dev memory) is scored on ``ce`` alone, so validation stays P_PEMA's dev CE."""
    device = next(adapter.parameters()).device
    key = torch.as_tensor(batch["key"]).to(device=device, dtype=torch.float32)
    kappa = PHASE_KAPPA.get(phase, kappa)
    k_hat, h = adapter(key, rct=kappa > 0, pd=kappa < 1)  # through forward(): DDP-wrapped adapters sync here
    out: dict[str, torch.Tensor] = {}
    if kappa > 0:
        out["rct"] = rct_loss(k_hat, key)
    if kappa < 1:
        target = torch.as_tensor(batch["token"], dtype=torch.long, device=device)
        if vocab_subset is not None:
            target = remap[target]
            if (target < 0).any():
                raise ValueError("a target token is outside the training vocabulary subset")
        logits = head(h, vocab_subset)
        out["ce"] = pd_loss(logits, target)
        if mixture_lam is not None:
            with torch.no_grad():
                logits_lm = head.from_key(key, vocab_subset)
            out["mix_ce"] = mixture_nll(logits, logits_lm, target, mixture_lam)
        if distill_beta > 0 and "nb_token" in batch:
            nb_token = torch.as_tensor(batch["nb_token"], device=device).long()
            if remap is not None:
                nb_token = remap[nb_token.clamp_min(0)]
            nb_weight = torch.as_tensor(batch["nb_weight"], device=device, dtype=torch.float32)
            out["knn_ce"] = distill_ce(logits, nb_token, nb_weight)
            out["distill_ce"] = (1.0 - distill_beta) * out.get("mix_ce", out["ce"]) + distill_beta * out["knn_ce"]
    pred = out.get("distill_ce", out.get("mix_ce", out.get("ce", torch.zeros(()))))
    out["loss"] = joint_loss(out.get("rct", torch.zeros(())), pred, kappa)
    return out


@torch.no_grad()
def validate(adapter: PemaAdapter, head: OutputHead, dev_batches: Batches, phase: str, kappa: float,
             mixture_lam: float | None = None) -> dict[str, float]:
    """Row-weighted mean of each loss term over the dev memory (full vocabulary, dropout off)."""
    was_training = adapter.training
    adapter.eval()
    sums: dict[str, float] = {}
    rows = 0
    for batch in dev_batches():
        n = len(batch["token"])
        for name, value in phase_losses(adapter, head, batch, phase, kappa, mixture_lam=mixture_lam).items():
            sums[name] = sums.get(name, 0.0) + float(value) * n
        rows += n
    adapter.train(was_training)
    if rows == 0:
        raise ValueError("the dev memory is empty")
    return {name: total / rows for name, total in sums.items()}


def _check_metrics(phase: str, epoch: float, step: int, check: dict, **extra) -> dict:
    return {"phase": phase, "epoch": epoch, "step": step, **extra, **{"val_" + k: v for k, v in check.items()}}


@dataclass
class PhaseState:
    """Where a phase stands at a validation: enough to resume it exactly (the batch order of an epoch is a pure
    function of the epoch, so the ``batches`` already taken in epoch ``epoch`` are skipped on resume).

    ``adapter``, ``best`` and ``optimizer`` are state dicts; the rest is plain data."""

    phase: str
    epoch: int
    batches: int
    epoch_rows: int
    mark: int
    step: int
    rows_seen: int
    best_val: float
    best_step: int
    seconds: float
    history: list[dict]
    adapter: dict
    best: dict
    optimizer: dict
    stopped: bool = False
    rng: dict = field(default_factory=dict)  # torch's generator states (dropout masks): "cpu", and "cuda" on a GPU


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(frozen=True)
class PhaseData:
    """What a phase reads: ``train_batches(epoch)``, the batches of one epoch (``train_rows`` rows in all);
    ``dev_batches()``, the validation batches; ``vocab_subset``, the token ids the PD distribution is restricted to
    (None: the whole vocabulary)."""
    train_batches: Callable[[int], Iterable[dict]]
    train_rows: int
    dev_batches: Batches
    vocab_subset: torch.Tensor | None = None


@dataclass(frozen=True)
class PhaseHooks:
    """What a phase tells its caller, and how it runs: ``report(metrics)`` at each validation,
    ``save(best_state, metrics)`` on each new best, ``checkpoint(state, metrics)`` at each validation (the check
    before training included) with a :class:`PhaseState` to pass back as ``resume`` after a crash,
    ``steps_done(n)`` told how many optimizer steps the call ran (a resumed call runs only the remaining ones),
    ``wrap(adapter)`` the module the training steps run through (a ``DistributedDataParallel`` wrapper for
    data-parallel workers), ``progress`` a progress bar."""
    report: Callable[[dict], None] | None = None
    save: Callable[[dict, dict], None] | None = None
    checkpoint: Callable[[PhaseState, dict], None] | None = None
    steps_done: Callable[[int], None] | None = None
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    progress: bool = True


def train_phase(adapter: PemaAdapter, head: OutputHead, data: PhaseData, *, phase: str, epochs: int, lr: float,
                kappa: float = 0.2, weight_decay: float = 0.0, evals_per_epoch: int = 1,
                hooks: PhaseHooks = PhaseHooks(), resume: PhaseState | None = None,
                mixture_lam: float | None = None, distill_beta: float = 0.0) -> PhaseResult:
    """Train the parameters of ``phase`` (``rct``: A, B_rct; ``rct_pd``/``pd``: A, B_pd, B_rct frozen) on
    ``data`` (:class:`PhaseData`), calling ``hooks`` (:class:`PhaseHooks`); ``resume``: a ``checkpoint`` hook's
    state, to go on from after a crash. ``mixture_lam``: train and select on the mixture's NLL
    (:func:`phase_losses`); ignored by the RCT phase. ``distill_beta``: the weight of the kNN-distilled target in
    the training loss (:func:`phase_losses`; batches must carry neighbours).
    """
    train_batches, train_rows, dev_batches, vocab_subset = (data.train_batches, data.train_rows, data.dev_batches,
                                                            data.vocab_subset)
    report, save, checkpoint, steps_done = hooks.report, hooks.save, hooks.checkpoint, hooks.steps_done
    wrap, progress = hooks.wrap, hooks.progress
    mixture_lam = None if phase == "rct" else mixture_lam
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {sorted(PHASES)}")
    if train_rows <= 0:
        raise ValueError("the training memory is empty")
    if resume is not None and resume.phase != phase:
        raise ValueError(f"cannot resume phase {phase!r} from a checkpoint of phase {resume.phase!r}")
    trainable = PHASES[phase] + (("W_1", "W_2") if phase != "rct" and getattr(adapter, "mlp_hidden", 0) else ())
    for name, param in adapter.named_parameters():
        param.requires_grad_(name in trainable)
    opt = torch.optim.AdamW([getattr(adapter, n) for n in trainable], lr=lr, weight_decay=weight_decay)
    remap = vocab_remap(vocab_subset, head.vocab_size) if vocab_subset is not None else None
    model = wrap(adapter) if wrap else adapter
    device = next(adapter.parameters()).device
    marks = [train_rows * (i + 1) // evals_per_epoch for i in range(evals_per_epoch)]
    if resume is None:
        check = validate(model, head, dev_batches, phase, kappa, mixture_lam)
        st = PhaseState(phase, 0, 0, 0, 0, 0, 0, check["loss"], 0, 0.0, [_check_metrics(phase, 0.0, 0, check)],
                        adapter={}, best=_snapshot(adapter), optimizer={})
        if report:
            report(st.history[-1])
        if checkpoint:
            st.adapter, st.optimizer = _snapshot(adapter), copy.deepcopy(opt.state_dict())
            st.rng = _rng_state(device)
            checkpoint(st, st.history[-1])
    else:
        st = copy.copy(resume)
        st.history = list(resume.history)
        adapter.load_state_dict(resume.adapter)
        if resume.optimizer:
            opt.load_state_dict(resume.optimizer)
        _set_rng_state(resume.rng, device)  # the same dropout masks as the uninterrupted run
    ran, start = 0, time.perf_counter() - st.seconds
    bar = tqdm(total=epochs * train_rows, initial=min(st.rows_seen, epochs * train_rows), desc=f"train {phase}",
               unit="row", disable=not progress, leave=False)
    model.train()
    while st.epoch < epochs and not st.stopped:
        running, running_rows = 0.0, 0
        for batch in itertools.islice(train_batches(st.epoch), st.batches, None):
            n = len(batch["token"])
            loss = phase_losses(model, head, batch, phase, kappa, vocab_subset, remap, mixture_lam,
                                distill_beta if phase != "rct" else 0.0)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ran += 1
            st.step, st.rows_seen, st.epoch_rows, st.batches = st.step + 1, st.rows_seen + n, st.epoch_rows + n, st.batches + 1
            running, running_rows = running + loss.item() * n, running_rows + n
            bar.update(n)
            if st.mark >= len(marks) or st.epoch_rows < marks[st.mark]:
                continue
            while st.mark < len(marks) and st.epoch_rows >= marks[st.mark]:
                st.mark += 1
            check = validate(model, head, dev_batches, phase, kappa, mixture_lam)
            metrics = _check_metrics(phase, st.epoch + min(1.0, st.epoch_rows / train_rows), st.step, check,
                                     train_loss=running / max(1, running_rows))
            running, running_rows = 0.0, 0
            st.history.append(metrics)
            bar.set_postfix(val=f"{check['loss']:.4f}")
            if report:
                report(metrics)
            if check["loss"] < st.best_val:
                st.best_val, st.best_step, st.best = check["loss"], st.step, _snapshot(adapter)
                if save:
                    save(st.best, metrics)
            st.stopped = should_stop([h["val_loss"] for h in st.history])
            if checkpoint:
                st.seconds = time.perf_counter() - start
                st.adapter, st.optimizer = _snapshot(adapter), copy.deepcopy(opt.state_dict())
                st.rng = _rng_state(device)
                checkpoint(st, metrics)
            if st.stopped:
                break
        if not st.stopped:
            st.epoch, st.batches, st.epoch_rows, st.mark = st.epoch + 1, 0, 0, 0
    bar.close()
    adapter.load_state_dict(st.best)
    adapter.eval()
    if steps_done:
        steps_done(ran)
    return PhaseResult(phase, st.best_val, st.best_step, st.step, st.stopped, time.perf_counter() - start,
                       st.rows_seen, st.history)


def target_vocab(token_arrays: Iterable[np.ndarray]) -> torch.Tensor:
    """Sorted unique token ids over the training memory (for ``pd_vocab: targets``)."""
    uniq = np.unique(np.concatenate([np.asarray(t) for t in token_arrays]))
    return torch.as_tensor(uniq, dtype=torch.long)
