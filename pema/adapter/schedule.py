"""Interpolation weights lambda_t and the log-space mixture. Pure functions.

    log P = logsumexp(log(1 - lam_t) + log P_LM, log(lam_t) + log P_PEMA)

Schedules (t = tokens generated so far in that row, H = the row's expected output length):

- ``constant``:      lam_t = lam
- ``gu_quadratic``:  lam_t = q + (1 - q) * (lam_max * max(0, 1 - t / H))**2      (Gradual Unrolling, paper)
- ``gu_linear``:     lam_t = q + (1 - q) * lam_max * max(0, 1 - t / H)

H is estimated per row BEFORE decoding, from the source alone: ``ceil(source_tokens * ratio)`` where ratio is the
target/source token ratio measured on the training memory. It never looks at the reference, and rows never
affect each other (the seed code took H from the reference and stopped the decay when the batch's shortest row
ended).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from pema.errors import ScheduleError

KINDS = ("constant", "gu_quadratic", "gu_linear")


def _unit(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ScheduleError(f"{name}={value!r} is outside [0, 1]")
    return float(value)


@dataclass(frozen=True)
class Schedule:
    kind: str = "gu_quadratic"
    lam: float = 0.5
    lam_max: float = 0.9
    floor: float = 0.0
    stop_lam: float | None = None  # PEMA's weight in the stop decision (see own_stop); None: lam_t like every token

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ScheduleError(f"schedule kind {self.kind!r} is not one of {KINDS}")
        for name in ("lam", "lam_max", "floor"):
            _unit(name, getattr(self, name))
        if self.stop_lam is not None:
            _unit("stop_lam", self.stop_lam)

    def __call__(self, t: int | torch.Tensor, horizons: torch.Tensor) -> torch.Tensor:
        """lam for each row: ``t`` scalar or (rows,), ``horizons`` (rows,) > 0 -> (rows,) float64 in [0, 1]."""
        horizons = horizons.to(torch.float64)
        if (horizons <= 0).any():
            raise ScheduleError("every horizon H must be > 0")
        t = torch.as_tensor(t, dtype=torch.float64).expand_as(horizons)
        if self.kind == "constant":
            return torch.full_like(horizons, self.lam)
        remaining = torch.clamp(1.0 - t / horizons, min=0.0)
        decay = self.lam_max * remaining
        if self.kind == "gu_quadratic":
            decay = decay * decay
        return self.floor + (1.0 - self.floor) * decay


def estimate_horizons(source_lengths: Sequence[int], ratio: float) -> torch.Tensor:
    """(rows,) expected output lengths ``max(1, ceil(src * ratio))`` from source token counts."""
    if not ratio > 0 or math.isinf(ratio):
        raise ScheduleError(f"target/source ratio must be a positive finite number, got {ratio}")
    return torch.tensor([max(1, math.ceil(n * ratio)) for n in source_lengths], dtype=torch.float64)


def length_caps(horizons: torch.Tensor, cap: float) -> torch.Tensor:
    """(rows,) int64 most tokens per row: ``max(1, ceil(cap * H))`` for horizons H (rows,)."""
    if not cap > 0 or math.isinf(cap):
        raise ScheduleError(f"length cap must be a positive finite multiple of H, got {cap}")
    return torch.clamp(torch.ceil(horizons.to(torch.float64) * cap), min=1).to(torch.long)


def interpolate(log_p_lm: torch.Tensor, log_p_pema: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Mix two log-distributions (rows, vocab) with per-row lam (rows,) or a scalar, in log space.

    lam = 0 returns ``log_p_lm`` exactly and lam = 1 returns ``log_p_pema`` exactly (no log 0 is evaluated), except
    that entries that are -inf in ``log_p_lm`` (hard constraints from earlier logits processors: no_repeat_ngram,
    bad words) stay -inf at every lam, 1 included.
    """
    lam = torch.as_tensor(lam, dtype=torch.float64, device=log_p_lm.device)
    if lam.dim() == 0:
        lam = lam.expand(log_p_lm.shape[0])
    if lam.shape != log_p_lm.shape[:1]:
        raise ScheduleError(f"lam has shape {tuple(lam.shape)}, expected ({log_p_lm.shape[0]},)")
    if ((lam < 0) | (lam > 1) | torch.isnan(lam)).any():
        raise ScheduleError(f"lambda must lie in [0, 1], got min {lam.min().item()} max {lam.max().item()}")
    lam_c = lam.clamp(1e-12, 1 - 1e-12).to(log_p_lm.dtype)[:, None]
    mixed = torch.logaddexp(torch.log1p(-lam_c) + log_p_lm, torch.log(lam_c) + log_p_pema)
    out = torch.where((lam == 0)[:, None], log_p_lm, mixed)
    out = torch.where((lam == 1)[:, None], log_p_pema, out)
    return out.masked_fill(torch.isneginf(log_p_lm), float("-inf"))  # banned stays banned at every lam, 1 included


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (-inf at x = 0)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def own_stop(mixed: torch.Tensor, log_p_lm: torch.Tensor, log_p_pema: torch.Tensor, stop_id: int,
             stop_lam: float) -> torch.Tensor:
    """The stop decision with its own lambda: a two-level distribution (rows, vocab), in log space.

        P(stop)  = (1 - stop_lam) P_LM(stop) + stop_lam P_PEMA(stop)
        P(y)     = (1 - P(stop)) * mixed(y) / sum_{y' != stop} mixed(y')        for y != stop

    ``mixed`` is the token mixture under the schedule's lam_t (:func:`interpolate`); the other tokens keep their
    relative odds. A stop that is -inf in ``log_p_lm`` (banned by an earlier processor, e.g. a minimum length)
    stays banned and leaves the row as it was.
    """
    if not 0.0 <= stop_lam <= 1.0:
        raise ScheduleError(f"stop_lam={stop_lam!r} is outside [0, 1]")
    lm_s, pema_s = log_p_lm[:, stop_id], log_p_pema[:, stop_id]
    if stop_lam == 0.0:
        new_s = lm_s
    elif stop_lam == 1.0:
        new_s = pema_s
    else:
        new_s = torch.logaddexp(lm_s + math.log1p(-stop_lam), pema_s + math.log(stop_lam))
    others = mixed.clone()
    others[:, stop_id] = float("-inf")
    rest = torch.logsumexp(others, dim=-1)
    rest = torch.where(torch.isneginf(rest), torch.zeros_like(rest), rest)  # every other token banned: no 0/0
    out = others - rest[:, None] + _log1mexp(new_s)[:, None]
    out[:, stop_id] = new_s
    banned = torch.isneginf(lm_s)
    return torch.where(banned[:, None], mixed, out)
