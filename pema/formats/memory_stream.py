"""A worker's share of a memory read one part at a time: what streaming training reads (no whole share in RAM).

:class:`MemoryShare` covers rows ``[start, stop)`` of a :class:`~pema.formats.memory.MemoryReader` as a list of
chunks, one per part that overlaps the range, each clipped to it. :meth:`MemoryShare.load` reads one chunk (the
whole part is decoded, then sliced) and returns its keys as float32 ``(m, d)``, its tokens and the share-relative
row index of each row, so a shuffling reader can look up row-aligned data (the stored neighbours of kNN-distilled
training) by row. The shuffling itself is torch's and lives in :mod:`pema.adapter.streaming`.
Pure numpy + pyarrow (through the reader): no torch, Ray or MLflow here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pema.formats.memory import MemoryReader, PartInfo, _is_int


@dataclass(frozen=True)
class Chunk:
    part: PartInfo
    part_start: int  # memory row of the part's first row
    lo: int  # first memory row of the chunk (inside the share)
    hi: int  # one past its last

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class MemoryShare:
    """Rows ``[start, stop)`` of ``reader`` as per-part chunks, in stored order."""

    def __init__(self, reader: MemoryReader, start: int, stop: int):
        if not (_is_int(start, 0) and _is_int(stop, 0) and start <= stop <= len(reader)):
            raise ValueError(f"row range [{start}, {stop}) is not inside the memory's {len(reader)} rows")
        self.reader, self.start, self.stop = reader, int(start), int(stop)
        self.manifest = reader.manifest
        self.chunks: list[Chunk] = []
        offset = 0
        for info in self.manifest.parts:
            lo, hi = max(self.start, offset), min(self.stop, offset + info.rows)
            if lo < hi:
                self.chunks.append(Chunk(info, offset, lo, hi))
            offset += info.rows

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def d(self) -> int:
        return int(self.manifest.d)

    @property
    def max_chunk_rows(self) -> int:
        return max((c.rows for c in self.chunks), default=0)

    def load(self, i: int) -> dict[str, np.ndarray]:
        """Chunk ``i``: ``{"key": (m, d) float32, "token": (m,) int64, "row": (m,) int64}``, ``row`` counted from
        the share's first row."""
        c = self.chunks[i]
        part = self.reader._load(c.part)
        a, b = c.lo - c.part_start, c.hi - c.part_start
        return {"key": part["key"][a:b], "token": part["token"][a:b],
                "row": np.arange(c.lo - self.start, c.hi - self.start, dtype=np.int64)}

    def iter_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self.chunks)):
            yield self.load(i)
