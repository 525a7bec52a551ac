"""Resident memory: the whole training memory held as two tensors on the training device.

When the memory fits on the device (an OPT-1.3B memory of 1M rows is 4 GiB in bfloat16), training need not read
Parquet or run a per-row DataLoader at all: the keys ``(n, d)`` and tokens ``(n,)`` are loaded once, and each epoch
is a ``torch.randperm`` on the device whose slices pick the rows of each batch. On one H200 this path trained
RCT_PD at about 10x the seed's memmap + DataLoader loop (DESIGN.md section 4).

Plugs into :func:`pema.adapter.train.train_phase` unchanged::

    mem = ResidentMemory.from_reader(train_reader, "cuda", torch.bfloat16)
    dev = ResidentMemory.from_reader(dev_reader, "cuda", torch.bfloat16)
    data = PhaseData(train_batches=lambda epoch: mem.batches(512, seed=epoch), train_rows=len(mem),
                     dev_batches=lambda: dev.batches(4096, shuffle=False))
    train_phase(adapter.cuda(), head.cuda(), data, ...)

``phase_losses`` upcasts the keys to float32 (``torch.as_tensor(key, dtype=torch.float32)``), so bfloat16 or
float16 storage halves the device memory and costs one cast per batch. The batch order of a seed is reproducible
on one device type; the CPU and CUDA generators give different orders for the same seed.

Pure torch: no files, Ray or MLflow. :meth:`ResidentMemory.from_reader` only calls the reader object's methods.
"""
from __future__ import annotations

from typing import Iterator

import torch

KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ResidentMemory:
    """Keys ``(n, d)`` (float32, bfloat16 or float16) and tokens ``(n,)`` int64, both on one device; ``extra``:
    more row-aligned tensors ``(n, ...)`` that every batch carries under their names (the stored neighbours'
    ``nb_token`` and ``nb_weight`` of kNN-distilled training)."""

    def __init__(self, key: torch.Tensor, token: torch.Tensor, extra: dict[str, torch.Tensor] | None = None):
        if not isinstance(key, torch.Tensor) or not isinstance(token, torch.Tensor):
            raise TypeError(f"key and token must be torch tensors, got {type(key).__name__} and "
                            f"{type(token).__name__}")
        if key.dim() != 2 or token.dim() != 1 or token.shape[0] != key.shape[0]:
            raise ValueError(f"expected key (n, d) and token (n,), got key {tuple(key.shape)} and token "
                             f"{tuple(token.shape)}")
        if key.dtype not in KEY_DTYPES:
            raise TypeError(f"key dtype {key.dtype} is not one of {KEY_DTYPES}")
        if token.dtype.is_floating_point or token.dtype.is_complex or token.dtype == torch.bool:
            raise TypeError(f"token must hold integer ids, got dtype {token.dtype}")
        if key.device != token.device:
            raise ValueError(f"key is on {key.device} but token is on {token.device}; put both on one device")
        self.key = key
        self.token = token.long()
        self.extra = dict(extra or {})
        for name, value in self.extra.items():
            if name in ("key", "token") or not isinstance(value, torch.Tensor) or value.shape[:1] != token.shape \
                    or value.device != key.device:
                raise ValueError(f"extra {name!r} must be a tensor of {len(token)} rows on {key.device}, other than "
                                 "'key' and 'token'")

    def with_extra(self, **extra: torch.Tensor) -> "ResidentMemory":
        """The same rows with more row-aligned tensors."""
        return ResidentMemory(self.key, self.token, {**self.extra, **extra})

    @classmethod
    def from_reader(cls, reader, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                    read_batch_size: int = 65536) -> "ResidentMemory":
        """Load a whole memory (a :class:`pema.formats.memory.MemoryReader` or anything with ``len()``,
        ``manifest.d`` and ``iter_batches(batch_size, shuffle=False)`` yielding ``{"key": (m, d), "token": (m,)}``)
        into preallocated device tensors, in the reader's order. Host memory holds one read batch at a time."""
        if dtype not in KEY_DTYPES:
            raise TypeError(f"dtype {dtype} is not one of {KEY_DTYPES}")
        if read_batch_size <= 0:
            raise ValueError(f"read_batch_size must be > 0, got {read_batch_size}")
        n, d = len(reader), int(reader.manifest.d)
        if n <= 0:
            raise ValueError("the memory is empty: nothing to load")
        device = torch.device(device)
        key = torch.empty((n, d), dtype=dtype, device=device)
        token = torch.empty((n,), dtype=torch.long, device=device)
        pos = 0
        for batch in reader.iter_batches(read_batch_size, shuffle=False):
            k, t = torch.as_tensor(batch["key"]), torch.as_tensor(batch["token"])
            m = t.shape[0]
            if k.shape != (m, d) or pos + m > n:
                raise ValueError(f"reader yielded key {tuple(k.shape)} / token {tuple(t.shape)} at row {pos}, "
                                 f"but its manifest says {n} rows of width {d}")
            key[pos:pos + m].copy_(k)  # cast (and host->device copy) into the preallocated slot
            token[pos:pos + m].copy_(t)
            pos += m
        if pos != n:
            raise ValueError(f"reader yielded {pos} rows but its manifest says {n}")
        return cls(key, token)

    def __len__(self) -> int:
        return int(self.token.shape[0])

    @property
    def d(self) -> int:
        return int(self.key.shape[1])

    @property
    def device(self) -> torch.device:
        return self.key.device

    @property
    def dtype(self) -> torch.dtype:
        return self.key.dtype

    @property
    def nbytes(self) -> int:
        """Device bytes held by the keys and tokens."""
        return self.key.numel() * self.key.element_size() + self.token.numel() * self.token.element_size()

    def order(self, seed: int = 0) -> torch.Tensor:
        """The row permutation ``(n,)`` int64 of epoch ``seed``, drawn on the memory's device."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        return torch.randperm(len(self), generator=gen, device=self.device)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{"key": (b, d) in the memory's dtype, "token": (b,) int64}`` covering every row once.

        With ``shuffle`` the rows follow :meth:`order` (``seed``); without it they come in stored order as views.
        The last batch is shorter unless ``drop_last``.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        perm = self.order(seed) if shuffle else None
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if perm is None:
                yield {"key": self.key[start:end], "token": self.token[start:end],
                       **{name: v[start:end] for name, v in self.extra.items()}}
            else:
                idx = perm[start:end]
                yield {"key": self.key.index_select(0, idx), "token": self.token.index_select(0, idx),
                       **{name: v.index_select(0, idx) for name, v in self.extra.items()}}
