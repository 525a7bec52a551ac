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
