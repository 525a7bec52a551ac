"""The key definition shared by both parties: what f(c) is, numerically.

The PLM's final norm maps its input x (batch, ..., d) to ``g * n(x) + b``, where ``n`` is the norm's
parameter-free part:

- ``rms``:   n(x) = x / sqrt(mean(x**2) + eps)                      (Llama, Mistral, Qwen2, SmolLM2)
- ``layer``: n(x) = (x - mean(x)) / sqrt(var(x) + eps)               (GPT-2, OPT; biased variance)

The memory key is **k = n(x)**: the final norm's input normalized WITHOUT the learned gain g and bias b.
Two reasons:

1. Scale. Raw pre-norm states of Llama-family models carry outlier dimensions (on SmolLM2 a raw-key
   reconstruction MSE was ~1,000 against a cross-entropy of ~6); n(x) has unit RMS, so the RCT MSE is O(1).
2. Exactness. The exported head applies ``g * k + b`` and the LM head, which reproduces the PLM's logits at
   that position from k alone (see ``pema.adapter.head.OutputHead.from_key``).

Pure torch; no files, Ray or MLflow.
"""
from __future__ import annotations

import numpy as np
import torch

from pema.errors import MemoryMismatchError

NORM_TYPES = ("rms", "layer")
KEY_DEFINITION = "final-norm input, normalized without gain/bias (rms: x/sqrt(mean(x^2)+eps); layer: (x-mean)/sqrt(var+eps))"


def normalize(x: torch.Tensor, norm_type: str, eps: float) -> torch.Tensor:
    """Parameter-free part of the final norm, computed in float32. ``x``: (..., d) -> (..., d) float32."""
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type {norm_type!r} is not one of {NORM_TYPES}")
    x = x.float()
    if norm_type == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def target_tokens(examples) -> np.ndarray:
    """The gold target tokens of ``examples`` (each with ``target_ids``) in the memory's row order: example by
    example, positions 0..T-1 within each (int32)."""
    return np.concatenate([np.asarray(e.target_ids, np.int32) for e in examples])


def paired_with_gold(rows: dict[str, np.ndarray], examples) -> tuple[dict[str, np.ndarray], int]:
    """Label-private rows (``memory.keys: owner_greedy``) made memory rows on the data owner's side: the owner's own
    choices (``greedy``) give way to the gold tokens of ``examples``, row for row. Also returns how many of the
    owner's choices were the gold token. MemoryMismatchError when the rows are not one per target token."""
    rows, gold = dict(rows), target_tokens(examples)
    greedy = rows.pop("greedy")
    if len(greedy) != len(gold):
        raise MemoryMismatchError(f"{len(greedy)} keys came back for {len(gold)} target tokens")
    return {**rows, "token": gold}, int((greedy == gold).sum())
