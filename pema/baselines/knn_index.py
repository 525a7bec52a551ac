"""Build the kNN-LM scorer from a memory folder: exact torch search, or a FAISS IVF-PQ index (Jégou et al. 2011;
the index kNN-LM itself uses).

``knn.index: auto`` searches every key exactly while the memory has at most ``knn.exact_max_rows`` rows, and
switches to IVF-PQ above that. IVF-PQ settings are adapted to the memory so that training is well posed:
``nlist <= rows // 39`` (FAISS wants >= 39 training points per cell), ``pq_m`` = the largest divisor of d that is
<= ``knn.pq_m``, and ``nprobe <= nlist``. FAISS runs on the CPU; results come back on the query's device.
"""
from __future__ import annotations

import numpy as np
import torch

from pema.baselines.knn import ExactIndex, KnnScorer, _check_k, _check_query
from pema.config import KnnConfig
from pema.errors import MemoryMismatchError
from pema.formats.memory import MemoryReader

PQ_BITS = 8  # bits per PQ code: 256 centroids per sub-quantizer
MIN_IVFPQ_ROWS = 2**PQ_BITS  # PQ k-means needs at least one training point per centroid


def nearest_divisor(d: int, at_most: int) -> int:
    """The largest divisor of ``d`` that is <= ``at_most`` (1 at worst)."""
    return max(m for m in range(1, min(d, at_most) + 1) if d % m == 0)


def ivfpq_settings(rows: int, d: int, cfg: KnnConfig) -> dict:
    """``{"nlist", "nprobe", "pq_m"}`` for a memory of ``rows`` keys of width ``d``."""
    nlist = max(1, min(cfg.nlist, rows // 39))
    return {"nlist": nlist, "nprobe": min(cfg.nprobe, nlist), "pq_m": nearest_divisor(d, cfg.pq_m)}


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is pinned in the requirements
        raise ImportError("knn.index='ivfpq' needs FAISS: pip install faiss-cpu (or use knn.index='exact')") from exc
    return faiss


class FaissIndex:
    """A trained FAISS index (any ``faiss.Index`` over L2) behind the torch ``search`` interface."""

    def __init__(self, index):
        self.index, self.d = index, int(index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def ivfpq(cls, keys: np.ndarray, *, nlist: int, nprobe: int, pq_m: int, seed: int = 0) -> "FaissIndex":
        """Train an IVF-PQ index on ``keys`` (N, d) float32 and add them all (row i keeps id i)."""
        faiss = _faiss()
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        n, d = keys.shape
        if n < MIN_IVFPQ_ROWS:
            raise ValueError(f"the memory has {n} rows but IVF-PQ needs at least {MIN_IVFPQ_ROWS} to train its "
                             "product quantizer; use knn.index='exact' (or 'auto')")
        if d % pq_m:
            raise ValueError(f"pq_m={pq_m} does not divide d={d}; pick a divisor of d")
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, pq_m, PQ_BITS)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.train(keys)
        index.add(keys)
        index.nprobe = nprobe
        return cls(index)

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` (rows, d) -> dist (rows, k) float32 (squared L2, approximate), idx (rows, k) int64 (-1 where
        fewer than k keys were found in the probed cells), both on the query's device."""
        _check_query(query, self.d)
        _check_k(k, len(self))
        q = np.ascontiguousarray(query.detach().to("cpu", torch.float32).numpy())
        dist, idx = self.index.search(q, k)
        return (torch.from_numpy(dist).to(query.device), torch.from_numpy(idx).long().to(query.device))


def load_knn(mem_dir, cfg: KnnConfig, vocab_size: int, device: str | torch.device = "cpu", *,
             d: int | None = None) -> KnnScorer:
    """kNN-LM scorer over the memory at ``mem_dir`` (keys and tokens read whole with :class:`MemoryReader`).

    ``vocab_size`` is the PLM's (the scorer's output width); ``d``, when given (the head bundle's or the PLM's key
    width), is checked against the memory's. Exact keys live on ``device`` (float32 on the CPU, the memory's dtype
    elsewhere); an IVF-PQ index lives in FAISS on the CPU. The tokens live on ``device``.
    """
    if not isinstance(cfg, KnnConfig):
        raise TypeError(f"cfg must be a KnnConfig, got {type(cfg).__name__}")
    if cfg.index not in ("auto", "exact", "ivfpq"):  # KnnConfig validates too; guards a hand-made object
        raise ValueError(f"knn.index={cfg.index!r} is not one of ('auto', 'exact', 'ivfpq')")
    reader = MemoryReader(mem_dir)
    m = reader.manifest
    for name, mine, theirs in (("d", m.d, d), ("vocab_size", m.vocab_size, vocab_size)):
        if theirs is not None and mine != theirs:
            raise MemoryMismatchError(f"memory {reader.mem_dir} has {name}={mine} but the PLM has {name}={theirs}; "
                                      "use a memory built with the same PLM")
    rows = len(reader)
    if cfg.k > rows:
        raise ValueError(f"knn.k={cfg.k} is larger than the memory's {rows} rows; lower knn.k")
    data = reader.read_all()
    tokens = torch.from_numpy(data["token"]).long().to(device)
    kind = cfg.index if cfg.index != "auto" else ("exact" if rows <= cfg.exact_max_rows else "ivfpq")
    if kind == "exact":
        keys = torch.from_numpy(data.pop("key"))
        dtype = torch.float32 if torch.device(device).type == "cpu" else getattr(torch, m.dtype)
        index = ExactIndex(keys.to(device=device, dtype=dtype))
    else:
        index = FaissIndex.ivfpq(data.pop("key"), **ivfpq_settings(rows, m.d, cfg))
    return KnnScorer(index, tokens, vocab_size, cfg.k, cfg.temperature)
