"""The frozen output head: the PLM's final norm + optional projection + LM head, from the owner's bundle.

``from_key(k)`` applies the norm's gain/bias to a stored key (already normalized, see :mod:`pema.formats.keys`) and the LM
head: it reproduces the PLM's own logits. ``forward(h)`` is the full head ``lm_head(proj(norm(h)))`` applied to an
adapter output ``h = B_pd u``; it uses the PLM's REAL final norm (the seed code used the last layer's pre-FFN norm).
Pure torch.
"""
from __future__ import annotations

import torch
from torch import nn

from pema.formats.keys import NORM_TYPES, normalize


class OutputHead(nn.Module):
    """Frozen head. Keys/hidden ``(..., d)`` -> logits ``(..., vocab)`` (or ``(..., len(vocab_subset))``)."""

    def __init__(self, *, norm_type: str, eps: float, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 norm_bias: torch.Tensor | None = None, proj_weight: torch.Tensor | None = None,
                 lm_head_bias: torch.Tensor | None = None, logit_scale: float = 1.0):
        super().__init__()
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type {norm_type!r} is not one of {NORM_TYPES}")
        self.norm_type, self.eps, self.logit_scale = norm_type, float(eps), float(logit_scale)
        self.register_buffer("norm_weight", norm_weight.float())
        self.register_buffer("norm_bias", None if norm_bias is None else norm_bias.float())
        self.register_buffer("proj_weight", None if proj_weight is None else proj_weight.float())
        self.register_buffer("lm_head_weight", lm_head_weight.float())
        self.register_buffer("lm_head_bias", None if lm_head_bias is None else lm_head_bias.float())
        width = lm_head_weight.shape[1] if proj_weight is None else proj_weight.shape[1]
        if width != norm_weight.shape[0]:
            raise ValueError(f"head shapes disagree: norm d={norm_weight.shape[0]}, projection/LM head input {width}")

    @property
    def d(self) -> int:
        return int(self.norm_weight.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head_weight.shape[0])

    def from_key(self, key: torch.Tensor, vocab_subset: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a stored key: ``W (g * k + b) + c``; restricted to ``vocab_subset`` rows when given."""
        x = key * self.norm_weight
        if self.norm_bias is not None:
            x = x + self.norm_bias
        if self.proj_weight is not None:
            x = x @ self.proj_weight.T
        w, c = self.lm_head_weight, self.lm_head_bias
        if vocab_subset is not None:
            w = w.index_select(0, vocab_subset)
            c = None if c is None else c.index_select(0, vocab_subset)
        logits = x @ w.T
        if c is not None:
            logits = logits + c
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def forward(self, hidden: torch.Tensor, vocab_subset: torch.Tensor | None = None) -> torch.Tensor:
        """Full head on an unnormalized hidden state: ``lm_head(proj(norm(hidden)))``."""
        return self.from_key(normalize(hidden, self.norm_type, self.eps), vocab_subset)
