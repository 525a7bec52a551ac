"""Streaming memory: training batches read from disk a chunk at a time, shuffled through a bounded buffer.

For a share of the memory too large for RAM, :class:`StreamingMemory` offers the same ``batches`` as
:class:`~pema.adapter.resident.ResidentMemory` (``{"key": (b, d) float32, "token": (b,) int64, **extra}``, torch
tensors on the CPU) while holding at most ``buffer_rows`` rows plus a few chunks (parts). An epoch of seed ``s``:

1. the chunks are visited in a shuffled order (a generator seeded from ``s``, apart from the row generator);
2. rows enter a buffer of ``buffer_rows`` rows; once it is full, each incoming row takes the place of a buffered
   row drawn at random without replacement (``torch.randperm`` of the buffer's slots on a generator seeded ``s``,
   one draw per chunk), and the displaced rows are emitted in the drawn order (two copies per row, no masks);
3. at the end the rows left in the buffer are emitted in the order of one more ``torch.randperm``.

When the buffer holds the whole share, step 2 never draws and each row is put at its stored place in the buffer, so
step 3 is the first draw of a generator seeded ``s`` over the share in stored order: exactly
:meth:`ResidentMemory.order` on the CPU, hence the same batches as the resident path (same rows, same order, same
float32 values). Emitted rows are cut into batches across chunk boundaries, so every batch but the last has
``batch_size`` rows, as with the resident path.

The next chunk is read in a background thread while the current one is shuffled and trained on (Parquet decoding
releases the GIL). ``extra`` tensors (the stored neighbours of kNN-distilled training, ``(n, k)``, small beside the
keys) stay in RAM and every batch picks its rows from them by row index.

``peak_rows`` counts the rows held at once (buffer, chunks read and not yet consumed, rows drawn and not yet
batched): at most ``buffer_rows + 3 * max_chunk_rows + batch_size``. Pure torch: the source is any object with
``len()``, ``d``, ``chunks`` (each with ``rows``) and ``load(i) -> {"key", "token", "row"}`` arrays, such as
:class:`pema.formats.memory_stream.MemoryShare`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

PART_SEED_SALT = 0x9E3779B97F4A7C15  # keeps the chunk-order generator apart from the row generator of a seed


def _tensors(data: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = torch.as_tensor(data["key"])
    if key.dtype != torch.float32:
        key = key.float()
    return key, torch.as_tensor(data["token"]).long(), torch.as_tensor(data["row"]).long()


class StreamingMemory:
    """Epoch batches of a chunked source through a shuffle buffer of ``buffer_rows`` rows (see the module)."""

    def __init__(self, source, buffer_rows: int, *, extra: dict[str, torch.Tensor] | None = None,
                 prefetch: bool = True):
        if not isinstance(buffer_rows, int) or isinstance(buffer_rows, bool) or buffer_rows <= 0:
            raise ValueError(f"buffer_rows must be a positive integer, got {buffer_rows!r}")
        n = len(source)
        if n <= 0:
            raise ValueError("the memory is empty: nothing to stream")
        if sum(c.rows for c in source.chunks) != n:
            raise ValueError(f"the source's chunks hold {sum(c.rows for c in source.chunks)} rows, not its {n}")
        self.source, self.buffer_rows, self.prefetch = source, buffer_rows, prefetch
        self.extra = dict(extra or {})
        for name, value in self.extra.items():
            if name in ("key", "token") or not isinstance(value, torch.Tensor) or value.shape[0] != n:
                raise ValueError(f"extra {name!r} must be a tensor of {n} rows, other than 'key' and 'token'")
        self._in_hand = self._buffered = self._pending = self.peak_rows = 0

    def with_extra(self, **extra: torch.Tensor) -> "StreamingMemory":
        return StreamingMemory(self.source, self.buffer_rows, extra={**self.extra, **extra}, prefetch=self.prefetch)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def d(self) -> int:
        return int(self.source.d)

    def row_bound(self, batch_size: int) -> int:
        """The most rows :attr:`peak_rows` may reach with batches of ``batch_size``."""
        return self.buffer_rows + 3 * max(c.rows for c in self.source.chunks) + batch_size

    def _note(self, more: int = 0) -> None:
        self.peak_rows = max(self.peak_rows, self._in_hand + self._buffered + self._pending + more)

    def _chunks(self, order: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The chunks in ``order`` as ``(key, token, row)``, each read while the one before is consumed (in a
        background thread with ``prefetch``); ``_in_hand`` counts the rows read or being read."""
        rows = [self.source.chunks[i].rows for i in order]
        if not self.prefetch:
            for i, m in zip(order, rows):
                self._in_hand = m
                self._note()
                yield _tensors(self.source.load(i))
            self._in_hand = 0
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-read")
        try:
            pending = pool.submit(self.source.load, order[0]) if order else None
            for j in range(len(order)):
                data = pending.result()
                pending = pool.submit(self.source.load, order[j + 1]) if j + 1 < len(order) else None
                self._in_hand = rows[j] + (rows[j + 1] if pending is not None else 0)
                self._note()
                yield _tensors(data)
                del data
        finally:
            self._in_hand = 0
            pool.shutdown(wait=True, cancel_futures=True)

    def _shuffled_rows(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(key, token, row)`` pieces whose concatenation is the epoch's row order (see the module)."""
        n_chunks, d = len(self.source.chunks), self.d
        part_gen = torch.Generator()
        part_gen.manual_seed((int(seed) ^ PART_SEED_SALT) & ((1 << 63) - 1))
        order = torch.randperm(n_chunks, generator=part_gen).tolist()
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        size = min(self.buffer_rows, len(self))
        buf = torch.empty((size, d)), torch.empty(size, dtype=torch.long), torch.empty(size, dtype=torch.long)
        whole, filled = size == len(self), 0  # whole: every row sits at its stored place, as in ResidentMemory
        for key, tok, row in self._chunks(order):
            if whole:
                for b, c in zip(buf, (key, tok, row)):
                    b.index_copy_(0, row, c)
                filled = self._buffered = filled + len(tok)
                continue
            f = min(size - filled, len(tok))
            if f:
                for b, c in zip(buf, (key, tok, row)):
                    b[filled:filled + f] = c[:f]
                filled = self._buffered = filled + f
            for lo in range(f, len(tok), size):  # the buffer is full: each incoming row displaces a random one
                hi = min(lo + size, len(tok))
                slots = torch.randperm(size, generator=gen)[:hi - lo]
                out = tuple(b.index_select(0, slots) for b in buf)  # the displaced rows, in the drawn order
                for b, c in zip(buf, (key, tok, row)):
                    b.index_copy_(0, slots, c[lo:hi])
                self._note(hi - lo)
                yield out
            del key, tok, row
        # the rows left, in the order of one more randperm, a chunk's worth at a time
        perm = torch.randperm(filled, generator=gen)
        step = max(1, max(c.rows for c in self.source.chunks))
        for s in range(0, filled, step):
            idx = perm[s:s + step]
            self._note(len(idx))
            yield tuple(b.index_select(0, idx) for b in buf)
        self._buffered = 0

    def _cut(self, pieces, batch_size: int, drop_last: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` rows cut from a stream of ``(key, token, row)`` pieces: views of a piece
        where a batch lies inside it, a copy of at most ``batch_size`` rows where it spans two."""
        carry: tuple[torch.Tensor, ...] | None = None
        self._in_hand = self._buffered = self._pending = 0  # an epoch left early (early stopping) held none now
        for piece in pieces:
            n, off = len(piece[1]), 0
            self._pending = n + (len(carry[1]) if carry is not None else 0)
            self._note()
            if carry is not None:
                need = batch_size - len(carry[1])
                if n < need:
                    carry = tuple(torch.cat((c, p)) for c, p in zip(carry, piece))
                    self._pending = len(carry[1])
                    continue
                yield self._batch(*(torch.cat((c, p[:need])) for c, p in zip(carry, piece)))
                carry, off = None, need
            while n - off >= batch_size:
                yield self._batch(*(p[off:off + batch_size] for p in piece))
                off += batch_size
            if off < n:  # copied, so the piece itself is released
                carry = tuple(p[off:].clone() for p in piece)
            del piece
            self._pending = len(carry[1]) if carry is not None else 0
        self._pending = 0
        if carry is not None and not drop_last:
            yield self._batch(*carry)

    def _batch(self, key, token, row) -> dict[str, torch.Tensor]:
        return {"key": key, "token": token, **{name: v.index_select(0, row) for name, v in self.extra.items()}}

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{"key": (b, d) float32, "token": (b,) int64, **extra}`` covering every row once: shuffled (see
        the module) or, without ``shuffle``, in stored order. The last batch is shorter unless ``drop_last``."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        pieces = self._shuffled_rows(seed) if shuffle else self._chunks(list(range(len(self.source.chunks))))
        return self._cut(pieces, batch_size, drop_last)
