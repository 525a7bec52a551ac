"""Writing a memory from rows in hand: :class:`MemoryWriter` buffers rows and writes parts of ``rows_per_part`` rows
and the manifest last (:mod:`pema.formats.memory` has the format). Tests, benchmarks and baselines use it to write
memories of synthetic or recorded keys; the memory build stage writes its parts with
:func:`~pema.formats.memory.write_part` directly, one per planned shard.
"""
from __future__ import annotations

import json
import os

import numpy as np

from pema.errors import MemoryFormatError
from pema.formats.memory import (MANIFEST_NAME, SCHEMA_VERSION, MemoryManifest, PartInfo, _check_dtype, _columns,
                                 _is_int, write_part)


def _part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _is_memory_file(name: str) -> bool:
    return name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp") or (
        name.startswith("part-") and (name.endswith(".parquet") or name.endswith(".parquet.tmp")))


class MemoryWriter:
    """Buffers rows and writes parts of exactly ``rows_per_part`` rows (the last may be shorter).

    Use as a context manager: an exception inside the block (or a missing ``close()``) removes
    every file this writer wrote, so no half-written memory remains.
    """

    def __init__(self, out_dir, *, d: int, vocab_size: int, dtype: str = "float16", rows_per_part: int = 65536,
                 model_id: str, model_revision: str | None, tokenizer_hash: str, template: str,
                 key_definition: str, extra: dict | None = None, overwrite: bool = False):
        _check_dtype(dtype)
        for name, v in (("d", d), ("vocab_size", vocab_size), ("rows_per_part", rows_per_part)):
            if not _is_int(v, 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        self.out_dir = os.fspath(out_dir)
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise MemoryFormatError(f"memory folder {self.out_dir} exists and is not a directory")
        os.makedirs(self.out_dir, exist_ok=True)
        existing = sorted(n for n in os.listdir(self.out_dir) if _is_memory_file(n))
        if existing and not overwrite:
            raise MemoryFormatError(f"{self.out_dir} already holds a memory ({existing[0]}, ...); "
                                    "pass overwrite=True or choose an empty folder")
        for name in existing:
            os.remove(os.path.join(self.out_dir, name))
        self._meta = dict(model_id=model_id, model_revision=model_revision, tokenizer_hash=tokenizer_hash,
                          template=template, key_definition=key_definition, extra=dict(extra or {}))
        self.d, self.vocab_size, self.dtype, self.rows_per_part = int(d), int(vocab_size), dtype, int(rows_per_part)
        self._buf: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0
        self._parts: list[PartInfo] = []
        self._attempted: list[str] = []
        self._closed = self._aborted = False

    def add(self, *, key: np.ndarray, token, example, position) -> None:
        """Buffer n rows: key (n, d); token, example, position (n,)."""
        if self._closed or self._aborted:
            raise MemoryFormatError(f"writer for {self.out_dir} is already closed/aborted")
        key, token, example, position = _columns(key, token, example, position)
        if key.shape[1] != self.d:
            raise ValueError(f"key width {key.shape[1]} != d={self.d}; keys must have shape (n, {self.d})")
        if token.size and (token.min() < 0 or token.max() >= self.vocab_size):
            raise ValueError(f"token ids span [{token.min()}, {token.max()}] but must lie in "
                             f"[0, vocab_size={self.vocab_size})")
        with np.errstate(over="ignore"):
            key = key.astype(self.dtype)  # copy: the caller may reuse its buffer
        if not np.isfinite(key).all():
            raise ValueError(f"key has non-finite values after casting to {self.dtype}; "
                             "check the hidden states or build the memory with dtype='float32'")
        self._buf.append((key, token.astype(np.int64), example.astype(np.int64), position.astype(np.int64)))
        self._buffered += key.shape[0]
        if self._buffered >= self.rows_per_part:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._buffered:
            return
        cols = [np.concatenate([b[i] for b in self._buf]) for i in range(4)]
        start, n = 0, cols[0].shape[0]
        while n - start >= self.rows_per_part or (final and start < n):
            stop = min(start + self.rows_per_part, n)
            name = _part_name(len(self._parts))
            self._attempted.append(name)
            self._parts.append(write_part(os.path.join(self.out_dir, name), key=cols[0][start:stop],
                                          token=cols[1][start:stop], example=cols[2][start:stop],
                                          position=cols[3][start:stop], dtype=self.dtype))
            start = stop
        self._buf = [tuple(c[start:].copy() for c in cols)] if start < n else []
        self._buffered = n - start

    def close(self, *, num_examples: int, source_tokens: int) -> MemoryManifest:
        """Flush the remainder, then write manifest.json atomically; returns the manifest."""
        if self._closed or self._aborted:
            raise MemoryFormatError(f"writer for {self.out_dir} is already closed/aborted")
        for name, v in (("num_examples", num_examples), ("source_tokens", source_tokens)):
            if not _is_int(v, 0):
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        self._flush(final=True)
        manifest = MemoryManifest(
            schema_version=SCHEMA_VERSION, d=self.d, vocab_size=self.vocab_size, dtype=self.dtype,
            rows_per_part=self.rows_per_part, total_rows=sum(p.rows for p in self._parts),
            num_examples=int(num_examples), source_tokens=int(source_tokens), parts=tuple(self._parts),
            **self._meta)
        path = os.path.join(self.out_dir, MANIFEST_NAME)
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(manifest.to_dict(), f, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)
        except BaseException:  # a full disk: no half manifest, not even a .tmp (the parts go with abort())
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Remove every part and .tmp file this writer wrote (and its manifest, if any)."""
        names = [MANIFEST_NAME, MANIFEST_NAME + ".tmp"] if self._closed else [MANIFEST_NAME + ".tmp"]
        for name in names + [n + s for n in self._attempted for s in (".tmp", "")]:
            path = os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        self._buf, self._buffered, self._parts, self._attempted = [], 0, [], []
        self._aborted, self._closed = True, False

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        if not self._closed and not self._aborted:
            self.abort()
            raise MemoryFormatError(f"close() was not called on the memory writer for {self.out_dir}; "
                                    "call close(num_examples=..., source_tokens=...) inside the with-block")
        return False
