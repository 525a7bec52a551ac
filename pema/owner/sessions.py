"""Decoding sessions of the PLM owner's service: the KV cache of each session, what it costs, and the steps of
concurrent sessions run as one forward.

Only keys leave (PEMA's boundary): a step answers, per row, the key of the new context; the data owner holds the
exact output head and computes the PLM's next-token distribution from it (``OutputHead.from_key``). So the forward
runs the decoder stack without the LM head, and no logits are ever allocated for a session.

Batching. A step waits in :class:`SessionDecoder`'s queue; whichever waiting thread takes the model next runs
every queued step it can in one forward (a combining queue: no timer, no extra thread; under load, steps gather
while a forward runs). The steps are taken in rounds, one per tenant per round, oldest first, up to
``max_batch_rows`` rows, so one tenant's many sessions cannot push another's step out of the next forward. Caches
of different lengths are left-padded to the longest and the padding masked (positions follow the mask, as
``generate()`` sets them), then split back after the forward; a step alone keeps its cache as it is. A cache
layer that is not a plain :class:`~transformers.DynamicCache` layer (a sliding window) is stepped alone.

Cost. ``bytes_per_cell`` is the memory one token of one row costs at its peak during a forward (``COST_FACTOR``
times its KV cache); a request is bounded by its padded cells (rows x longest row), and the caches of all open
sessions by ``kv_budget_bytes`` (:class:`~pema.owner.service.Limits`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pema.owner.respond import ContextTap, left_padded, mask_positions

# peak bytes of one token of one row in a forward, as a multiple of its KV cache: measured 2.2-2.7x on
# SmolLM2-135M (100-122 KB against 46 KB of KV per token, 1 to 64 rows, 256 to 8,192 tokens; docs/results.md)
COST_FACTOR = 3.0


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token of one row holds: 2 x layers x KV heads x head dim x the dtype's size."""
    c = model.config.get_text_config(decoder=True)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    d = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or d // heads
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


class Session:
    """One decoding session: its rows' KV cache and attention mask (rows, length), the tenant that opened it (the
    only one that may step or close it) and the key dtype it asked for."""

    def __init__(self, past, mask: torch.Tensor, tenant: str, dtype: str):
        self.past, self.mask, self.tenant, self.dtype = past, mask, tenant, dtype
        self.used, self.busy = time.monotonic(), False
        self.shared_in = None  # the batch whose cache this session's views (SessionDecoder._run_group)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def kv_bytes(self, per_token: int) -> int:
        return self.rows * self.length * per_token


@dataclass(eq=False)
class Step:
    """A step waiting for the model: the session, one token per kept row, the rows kept (None: all)."""

    session: Session
    tokens: list[int]
    keep: list[int] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    key: np.ndarray | None = None
    error: BaseException | None = None


def _plain(cache) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _cache(pairs) -> DynamicCache:
    """A DynamicCache holding the (keys, values) tensors of each layer as they are (no copy)."""
    cache = DynamicCache()
    cache.layers = []
    for k, v in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def _left_padded(parts: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """``parts`` stacked along dim 0, each left-padded with zeros to ``width`` along ``dim``: one copy each."""
    first = parts[0]
    shape = list(first.shape)
    shape[0], shape[dim] = sum(p.shape[0] for p in parts), width
    out, row = first.new_zeros(shape), 0
    for p in parts:
        index = [slice(row, row + p.shape[0])] + [slice(None)] * (first.dim() - 1)
        index[dim] = slice(width - p.shape[dim], width)
        out[tuple(index)] = p
        row += p.shape[0]
    return out


class SessionDecoder:
    """The model's side of the sessions: :meth:`prefill` opens one, :meth:`step` advances one, batched with the
    steps of other sessions waiting at the same time (see the module docstring). ``lock`` serialises every use of
    the model (the service's ``/context`` takes it too)."""

    def __init__(self, model, pad_id: int, *, max_batch_rows: int = 256, lock: threading.Lock | None = None):
        self.base, self.pad_id = model.base_model, pad_id
        self.device = next(model.parameters()).device
        self.tap = ContextTap(model)
        self.max_batch_rows = max_batch_rows
        self.lock = lock or threading.Lock()
        self._queue: list[Step] = []
        self._queue_lock = threading.Lock()
        self._arrived = threading.Condition(self._queue_lock)
        self._recent: dict[int, float] = {}  # id(session) -> when it last stepped: the sessions decoding now
        self._last_forward_s = 0.0
        self._shared = None  # the last batch: the next forward of the same sessions reuses its cache
        self.forwards = self.stepped = 0  # batched forwards run, and the steps they served (for /health and tests)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, past):
        positions = mask_positions(mask)[:, -ids.shape[1]:]
        with self.tap:
            out = self.base(input_ids=ids, attention_mask=mask, past_key_values=past, position_ids=positions,
                            use_cache=True)
            key = self.tap.last_key().float()
        return out.past_key_values, key

    def prefill(self, prompts: list[list[int]]) -> tuple[object, torch.Tensor, torch.Tensor]:
        """``(cache, mask, key (rows, d) float32)`` of left-padded ``prompts``, as ``generate()`` pads them."""
        ids, mask = left_padded(prompts, self.pad_id, self.device)
        with self.lock:
            past, key = self._forward(ids, mask, None)
        return past, mask, key

    def step(self, step: Step) -> np.ndarray:
        """The keys (kept rows, d) float32 of ``step``'s new contexts; the session's cache and mask advance."""
        with self._queue_lock:
            self._queue.append(step)
            self._arrived.notify_all()
        while not step.done.is_set():
            with self.lock:
                if step.done.is_set():
                    break
                self._gather()
                batch = self._take()
                if batch:
                    self._run(batch)
        if step.error is not None:
            raise step.error
        return step.key

    def forget(self, session: Session) -> None:
        """A closed session: no forward waits for its steps any more."""
        with self._queue_lock:
            self._recent.pop(id(session), None)

    def _gather(self) -> None:
        """Before a forward: wait for the steps of every session that stepped in the last second (each is likely
        a client computing its next token), at most half the last forward's time. Without it, the steps that a
        forward answers come back just after the next one started, and forwards alternate big and small."""
        now = time.monotonic()
        deadline = now + 0.5 * self._last_forward_s
        with self._arrived:
            self._recent = {k: t for k, t in self._recent.items() if now - t < 1.0}
            while len(self._queue) < len(self._recent) and (left := deadline - time.monotonic()) > 0:
                self._arrived.wait(left)

    def _take(self) -> list[Step]:
        """Queued steps for one forward: rounds of one step per tenant, oldest first, up to ``max_batch_rows``
        rows (the first step always)."""
        with self._queue_lock:
            by_tenant: dict[str, list[Step]] = {}
            for s in self._queue:
                by_tenant.setdefault(s.session.tenant, []).append(s)
            taken, rows = [], 0
            while any(by_tenant.values()):
                for queue in by_tenant.values():
                    if queue and (not taken or rows + len(queue[0].tokens) <= self.max_batch_rows):
                        rows += len(queue[0].tokens)
                        taken.append(queue.pop(0))
                    elif queue:
                        queue.clear()  # this tenant's next step does not fit: it waits for the next forward
            for s in taken:
                self._queue.remove(s)
        return taken

    def _run(self, batch: list[Step]) -> None:
        try:
            for s in batch:
                if s.keep is not None:  # the rows that stopped decoding leave the session for good
                    index = torch.tensor(s.keep, dtype=torch.long, device=self.device)
                    s.session.past.batch_select_indices(index)
                    s.session.mask, s.session.shared_in = s.session.mask.index_select(0, index), None
            plain = [s for s in batch if _plain(s.session.past)]
            groups = ([plain] if plain else []) + [[s] for s in batch if s not in plain]
            start = time.perf_counter()
            for group in groups:
                self._run_group(group)
            self._last_forward_s = (time.perf_counter() - start) / len(groups)
            now = time.monotonic()
            with self._queue_lock:
                self._recent.update({id(s.session): now for s in batch})
            self.forwards += len(groups)
            self.stepped += len(batch)
        except BaseException as exc:  # every waiting step learns of it; the sessions' state is not to be trusted
            for s in batch:
                s.error = exc
        finally:
            for s in batch:
                s.done.set()

    def _run_group(self, group: list[Step]) -> None:
        ids = torch.tensor([t for s in group for t in s.tokens], dtype=torch.long, device=self.device)[:, None]
        if len(group) == 1:
            session = group[0].session
            mask = torch.cat([session.mask, session.mask.new_ones((session.rows, 1))], 1)
            past, key = self._forward(ids, mask, session.past)  # the cache's cat gives it tensors of its own
            session.past, session.mask, session.shared_in, group[0].key = past, mask, None, key.cpu().numpy()
            return
        members, last = [s.session for s in group], self._shared
        if last is not None and last.members == members and all(m.shared_in is last for m in members):
            past, mask = last.past, last.mask  # the same sessions as the last forward: its cache as it is
        else:  # left-padded copies of each session's cache
            width = max(m.length for m in members)
            mask = _left_padded([m.mask for m in members], width, 1)
            layers = [m.past.layers for m in members]
            past = _cache([(_left_padded([ls[i].keys for ls in layers], width, 2),
                            _left_padded([ls[i].values for ls in layers], width, 2)) for i in range(len(layers[0]))])
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        past, key = self._forward(ids, mask, past)
        shared = _Shared(members, past, mask)
        key, start = key.cpu().numpy(), 0
        for s in group:
            rows, keep_from = s.session.rows, mask.shape[1] - 1 - s.session.length  # its columns, and the new one
            sl = slice(start, start + rows)
            s.session.past = _cache([(layer.keys[sl, :, keep_from:], layer.values[sl, :, keep_from:])
                                     for layer in past.layers])
            s.session.mask, s.session.shared_in, s.key = mask[sl, keep_from:], shared, key[sl]
            start += rows
        if last is not None and last is not shared:  # sessions still viewing the last batch get copies of their own,
            for m in last.members:                   # so at most one batch's cache is ever shared
                if m.shared_in is last:
                    m.past = _cache([(layer.keys.clone(), layer.values.clone()) for layer in m.past.layers])
                    m.mask, m.shared_in = m.mask.clone(), None
        self._shared = shared


@dataclass(eq=False)
class _Shared:
    """The cache of the last batched forward: its members' caches are views of it, in this order."""

    members: list[Session]
    past: object
    mask: torch.Tensor
