"""Teacher-forced memory building: ONE forward pass per batch over prompt + target.

For an example with prompt ids p (length P) and target ids y (length T, ending with the stop token) the model
reads ``p + y[:-1]``; the key that predicts ``y[t]`` is the final-norm input at sequence position ``P - 1 + t``.
The LM head is never computed (the base model runs without it). Free-running ``generate()`` keys, as in the
seed code, are slower and misaligned with gold targets; they are not built here.

:class:`MemoryEncoder` is a plain callable so that a Ray Data actor can wrap it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pema.owner.respond import ContextTap


@dataclass(frozen=True)
class EncodeExample:
    """One training pair, already tokenized exactly as at inference."""

    example: int
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError(f"example {self.example}: empty prompt")
        if not self.target_ids:
            raise ValueError(f"example {self.example}: empty target")

    @property
    def input_length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids) - 1


def length_batches(examples: Sequence[EncodeExample], max_tokens: int) -> list[list[EncodeExample]]:
    """Group examples sorted by length into batches of at most ``max_tokens`` padded tokens (>= 1 example each).

    Deterministic: ties keep input order.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    ordered = sorted(examples, key=lambda e: e.input_length)
    batches: list[list[EncodeExample]] = []
    current: list[EncodeExample] = []
    for ex in ordered:
        if current and ex.input_length * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    return batches


class MemoryEncoder:
    """``encoder(examples) -> {"key": (n, d) float32, "token": int32, "example": int64, "position": int32}``.

    Rows come example by example in the order given, positions 0..T-1 within each.
    """

    def __init__(self, model: nn.Module, pad_id: int = 0):
        self.model = model
        self.base = model.base_model  # the decoder stack without the LM head
        self.tap = ContextTap(model)
        self.pad_id = pad_id
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, examples: Sequence[EncodeExample]) -> dict[str, np.ndarray]:
        if not examples:
            raise ValueError("encode called with no examples")
        width = max(e.input_length for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            seq = list(e.prompt_ids) + list(e.target_ids[:-1])
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        with self.tap:
            self.base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
            keys = self.tap.keys()
        rows = [keys[i, len(e.prompt_ids) - 1 : e.input_length] for i, e in enumerate(examples)]
        out_key = torch.cat(rows).cpu().numpy()
        return {
            "key": out_key,
            "token": np.concatenate([np.asarray(e.target_ids, np.int32) for e in examples]),
            "example": np.concatenate([np.full(len(e.target_ids), e.example, np.int64) for e in examples]),
            "position": np.concatenate([np.arange(len(e.target_ids), dtype=np.int32) for e in examples]),
        }
