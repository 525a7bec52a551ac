"""The memory's keys, computed by the PLM owner, in two modes (``memory.keys``).

Teacher-forced (the default, :class:`MemoryEncoder`): ONE forward pass per batch over prompt + target. For an
example with prompt ids p (length P) and target ids y (length T, ending with the stop token) the model reads
``p + y[:-1]``; the key that predicts ``y[t]`` is the final-norm input at sequence position ``P - 1 + t``. The LM
head is never computed (the base model runs without it). The data owner sends the gold targets to the PLM owner.

Owner-greedy (label-private, :class:`FreeRunningEncoder`, the seed code's way): the data owner sends only the prompt
and the number of target tokens T; the PLM owner greedy-decodes its OWN continuation g for T steps and answers the
key of ``p + g[:t]`` for t = 0..T-1; the data owner pairs key t with its gold token ``y[t]`` locally, so the labels
never leave it. The key at t = 0 is the teacher-forced one; from the first t with g_t != y_t on, the keys are of
contexts that the gold target never has, paired with gold tokens that do not follow them (the seed code's drift).
It costs T forward steps (with a KV cache) instead of one pass.

Both encoders are plain callables so that a Ray Data actor can wrap them unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pema.formats.keys import normalize, target_tokens
from pema.formats.tasks import OverlengthError, context_window
from pema.owner.respond import ContextTap, left_padded, mask_positions


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


@dataclass(frozen=True)
class FreeRunningRequest:
    """One example as the label-private mode sends it: the prompt and the NUMBER of target tokens, never the targets."""

    example: int
    prompt_ids: tuple[int, ...]
    target_length: int

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        if not self.prompt_ids:
            raise ValueError(f"example {self.example}: empty prompt")
        if isinstance(self.target_length, bool) or not isinstance(self.target_length, (int, np.integer)) \
                or self.target_length < 1:
            raise ValueError(f"example {self.example}: target_length={self.target_length!r} must be an integer >= 1")
        object.__setattr__(self, "target_length", int(self.target_length))

    @property
    def input_length(self) -> int:
        return len(self.prompt_ids) + self.target_length - 1


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


def check_lengths(examples: Sequence[EncodeExample | FreeRunningRequest], max_length: int | None,
                  what: str = "") -> None:
    """OverlengthError naming the first example whose sequence (``input_length``: prompt + target - 1, teacher-forced
    or the owner's own continuation) is over ``max_length`` (None: no bound); ``what`` says where the bound comes
    from."""
    if max_length is not None and (over := [e for e in examples if e.input_length > max_length]):
        e = over[0]
        kind = "free-running" if isinstance(e, FreeRunningRequest) else "teacher-forced"
        target = e.input_length - len(e.prompt_ids) + 1
        raise OverlengthError(f"example {e.example}: its {kind} sequence has {e.input_length:,} tokens "
                              f"(prompt {len(e.prompt_ids):,} + target {target:,} - 1), over the bound of "
                              f"{max_length:,}{what} ({len(over)} example(s) over it); nothing was encoded")


def key_positions(target_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, position)`` (n,) for target lengths (batch,): row i repeated ``target_len[i]`` times, with positions
    0..T-1 within each: the memory's row order."""
    rows = np.repeat(np.arange(len(target_len)), target_len)
    return rows, np.arange(len(rows)) - np.repeat(np.cumsum(target_len) - target_len, target_len)


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
    rows, position = key_positions(target_len)
    cols = np.repeat(prompt_len - 1, target_len) + position  # column P - 1 + t predicts target token t
    return TeacherForcedInputs(ids, mask, rows, cols, position, target_len)


class _KeyEncoder:
    """What both encoders share: the model, its ContextTap, the pad id, the keys' dtype and the length bound."""

    def __init__(self, model: nn.Module, pad_id: int = 0, key_dtype: str = "float32", max_length: int | None = None):
        if key_dtype not in ("float16", "float32"):
            raise ValueError(f"key_dtype {key_dtype!r} must be 'float16' or 'float32'")
        self.max_length = max_length if max_length is not None else context_window(model)
        self.bound_from = " (data.max_tokens)" if max_length is not None else " (the model's context window)"
        self.model = model
        self.tap = ContextTap(model)
        self.pad_id = pad_id
        self.key_dtype = getattr(torch, key_dtype)
        self.device = next(model.parameters()).device

    def host_keys(self, keys: torch.Tensor) -> np.ndarray:
        """float32 keys (n, d) cast to ``key_dtype`` on the device (float16 halves the device-to-host copy) and
        copied through pinned memory when they are on a GPU."""
        keys = keys.to(self.key_dtype)
        if keys.is_cuda:
            host = torch.empty(keys.shape, dtype=keys.dtype, pin_memory=True)
            keys = host.copy_(keys)
        return keys.cpu().numpy()


class MemoryEncoder(_KeyEncoder):
    """``encoder(examples) -> {"key": (n, d), "token": int32, "example": int64, "position": int32}``, teacher-forced.

    Rows come example by example in the order given, positions 0..T-1 within each. Keys are gathered at the target
    positions on the device in one indexing op, normalized in float32, cast to ``key_dtype`` there (float16 halves
    the device-to-host copy) and copied through pinned memory when the model is on a GPU.

    ``max_length``: the longest teacher-forced sequence encoded (the build passes the one that follows from
    ``data.max_tokens``); by default the model's context window. A longer one is an OverlengthError before anything
    is allocated for it.
    """

    def __init__(self, model: nn.Module, pad_id: int = 0, key_dtype: str = "float32", max_length: int | None = None):
        super().__init__(model, pad_id, key_dtype, max_length)
        self.base = model.base_model  # the decoder stack without the LM head

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
        return {
            "key": self.host_keys(normalize(picked, self.tap.norm_type, self.tap.eps)),
            "token": target_tokens(examples),
            "example": np.repeat(np.array([e.example for e in examples], dtype=np.int64), layout.target_len),
            "position": layout.position.astype(np.int32),
        }


class FreeRunningEncoder(_KeyEncoder):
    """``encoder(requests) -> {"key": (n, d), "example": int64, "position": int32, "greedy": int32}``, the owner's
    greedy continuation (label-private; see the module docstring).

    Rows come example by example in the order given, positions 0..target_length-1 within each; row j's key is that
    of ``prompt + g[:t]`` and ``greedy[j]`` is g_t, the owner's argmax from that context. The data owner adds the gold
    tokens itself. Batched as ``generate()`` runs: prompts left-padded (mask 0, ``position_ids`` counting real tokens
    only), one prefill with a KV cache, then ``max(target_length) - 1`` single-token steps, each row fed its own
    greedy token (a row with all its positions keeps being decoded; its extra keys are dropped). Only the last
    position's logits are computed; decoding goes on past the stop token.

    ``max_length``: the longest ``prompt + target_length - 1`` sequence decoded (default: the model's context
    window); a longer one is an OverlengthError before anything is allocated.
    """

    @torch.no_grad()
    def __call__(self, requests: Sequence[FreeRunningRequest]) -> dict[str, np.ndarray]:
        if not requests:
            raise ValueError("encode called with no requests")
        check_lengths(requests, self.max_length, self.bound_from)
        batch = len(requests)
        ids, mask = left_padded([r.prompt_ids for r in requests], self.pad_id, self.device)
        positions = mask_positions(mask)
        target_len = np.array([r.target_length for r in requests], dtype=np.int64)
        keys, greedy, past = [], [], None
        with self.tap:
            for step in range(int(target_len.max())):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                                 use_cache=True, logits_to_keep=1)
                keys.append(self.tap.last_key())  # (batch, d) float32: the key of prompt + g[:step]
                ids = out.logits[:, -1, :].argmax(-1, keepdim=True)  # (batch, 1): g_step, fed back next step
                greedy.append(ids[:, 0])
                past, positions = out.past_key_values, positions[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
        rows, position = key_positions(target_len)
        keys, greedy = torch.stack(keys, 1), torch.stack(greedy, 1).cpu().numpy()  # (batch, steps, d), (batch, steps)
        r, t = torch.from_numpy(rows).to(keys.device), torch.from_numpy(position).to(keys.device)  # the norm's device
        return {
            "key": self.host_keys(keys[r, t]),
            "example": np.repeat(np.array([q.example for q in requests], dtype=np.int64), target_len),
            "position": position.astype(np.int32),
            "greedy": greedy[rows, position].astype(np.int32),
        }
