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

from pema.formats.keys import normalize
from pema.formats.tasks import OverlengthError, context_window
from pema.owner.respond import ContextTap


@dataclass(frozen=True)
class EncodeExample:
    """One training pair, already tokenized exactly as at inference."""

    example: int
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        object.__setattr__(self, "target_ids", tuple(self.target_ids))
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


@dataclass(frozen=True)
class TeacherForcedInputs:
    """Right-padded ``prompt + target[:-1]`` ids and mask (batch, width), and where every key sits: row ``rows[j]``,
    column ``cols[j]`` holds the context that predicts target token ``position[j]`` of its example (n,)."""

    ids: np.ndarray
    mask: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    position: np.ndarray
    target_len: np.ndarray


def check_lengths(examples: Sequence[EncodeExample], max_length: int | None, what: str = "") -> None:
    """OverlengthError naming the first example whose teacher-forced sequence (``input_length``) is over
    ``max_length`` (None: no bound); ``what`` says where the bound comes from."""
    if max_length is not None and (over := [e for e in examples if e.input_length > max_length]):
        e = over[0]
        raise OverlengthError(f"example {e.example}: its teacher-forced sequence has {e.input_length:,} tokens "
                              f"(prompt {len(e.prompt_ids):,} + target {len(e.target_ids):,} - 1), over the bound of "
                              f"{max_length:,}{what} ({len(over)} example(s) over it); nothing was encoded")


def teacher_forced_inputs(examples: Sequence[EncodeExample], pad_id: int) -> TeacherForcedInputs:
    if not examples:
        raise ValueError("encode called with no examples")
    prompt_len = np.array([len(e.prompt_ids) for e in examples], dtype=np.int64)
    target_len = np.array([len(e.target_ids) for e in examples], dtype=np.int64)
    lengths = prompt_len + target_len - 1
    ids = np.full((len(examples), int(lengths.max())), pad_id, dtype=np.int64)
    for i, e in enumerate(examples):
        ids[i, : lengths[i]] = e.prompt_ids + e.target_ids[:-1]
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    rows = np.repeat(np.arange(len(examples)), target_len)
    position = np.arange(len(rows)) - np.repeat(np.cumsum(target_len) - target_len, target_len)
    cols = np.repeat(prompt_len - 1, target_len) + position  # column P - 1 + t predicts target token t
    return TeacherForcedInputs(ids, mask, rows, cols, position, target_len)


class MemoryEncoder:
    """``encoder(examples) -> {"key": (n, d), "token": int32, "example": int64, "position": int32}``.

    Rows come example by example in the order given, positions 0..T-1 within each. Keys are gathered at the target
    positions on the device in one indexing op, normalized in float32, cast to ``key_dtype`` there (float16 halves
    the device-to-host copy) and copied through pinned memory when the model is on a GPU.

    ``max_length``: the longest teacher-forced sequence encoded (the build passes the one that follows from
    ``data.max_tokens``); by default the model's context window. A longer one is an OverlengthError before anything
    is allocated for it.
    """

    def __init__(self, model: nn.Module, pad_id: int = 0, key_dtype: str = "float32", max_length: int | None = None):
        if key_dtype not in ("float16", "float32"):
            raise ValueError(f"key_dtype {key_dtype!r} must be 'float16' or 'float32'")
        self.max_length = max_length if max_length is not None else context_window(model)
        self.bound_from = " (data.max_tokens)" if max_length is not None else " (the model's context window)"
        self.model = model
        self.base = model.base_model  # the decoder stack without the LM head
        self.tap = ContextTap(model)
        self.pad_id = pad_id
        self.key_dtype = getattr(torch, key_dtype)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, examples: Sequence[EncodeExample]) -> dict[str, np.ndarray]:
        check_lengths(examples, self.max_length, self.bound_from)
        layout = teacher_forced_inputs(examples, self.pad_id)
        ids, mask, rows, cols = layout.ids, layout.mask, layout.rows, layout.cols
        with self.tap:
            self.base(input_ids=torch.from_numpy(ids).to(self.device),
                      attention_mask=torch.from_numpy(mask).to(self.device), use_cache=False)
            hidden = self.tap.hidden()
            picked = hidden[torch.from_numpy(rows).to(hidden.device), torch.from_numpy(cols).to(hidden.device)]
        keys = normalize(picked, self.tap.norm_type, self.tap.eps).to(self.key_dtype)
        if keys.is_cuda:
            host = torch.empty(keys.shape, dtype=keys.dtype, pin_memory=True)
            keys = host.copy_(keys)
        return {
            "key": keys.cpu().numpy(),
            "token": np.concatenate([np.asarray(e.target_ids, np.int32) for e in examples]),
            "example": np.repeat(np.array([e.example for e in examples], dtype=np.int64), layout.target_len),
            "position": layout.position.astype(np.int32),
        }
