"""PEMA's losses. Pure functions.

- RCT (method 1):  MSE(B_rct u, k), mean over batch and d.
- PD (method 2):   CE(head(norm(B_pd u)), y), mean over the batch.
- RCT_PD (method 3): kappa * RCT + (1 - kappa) * PD, kappa in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pema.errors import ConfigError


def rct_loss(k_hat: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(batch, d), (batch, d) -> scalar mean squared error."""
    if k_hat.shape != key.shape:
        raise ValueError(f"reconstruction shape {tuple(k_hat.shape)} != key shape {tuple(key.shape)}")
    return F.mse_loss(k_hat, key)


def pd_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) logits, (batch,) token ids -> scalar cross-entropy (natural log)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    return F.cross_entropy(logits, target)


def joint_loss(rct: torch.Tensor, pd: torch.Tensor, kappa: float) -> torch.Tensor:
    """kappa * rct + (1 - kappa) * pd; at the ends the other term is dropped exactly (no 0 * nan)."""
    if not 0.0 <= kappa <= 1.0:
        raise ConfigError(f"kappa={kappa} is invalid: expected a number in [0, 1]")
    if kappa == 0.0:
        return pd
    if kappa == 1.0:
        return rct
    return kappa * rct + (1.0 - kappa) * pd


def distill_ce(logits: torch.Tensor, nb_token: torch.Tensor, nb_weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the kNN distribution of the stored neighbours: mean over rows of
    ``-sum_j w_j log softmax(logits)[tok_j]`` = ``-sum_y p_kNN(y) log P(y)``, with logits (batch, vocab),
    nb_token (batch, k) token ids and nb_weight (batch, k) summing to 1 per row (0 for a missing neighbour)."""
    if nb_token.shape != nb_weight.shape or nb_token.shape[0] != logits.shape[0]:
        raise ValueError(f"nb_token {tuple(nb_token.shape)}, nb_weight {tuple(nb_weight.shape)} and logits "
                         f"{tuple(logits.shape)} do not match")
    logp = torch.log_softmax(logits, dim=-1).gather(1, nb_token.clamp_min(0).long())
    return -(nb_weight * logp).sum(1).mean()
