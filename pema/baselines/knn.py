"""kNN-LM (Khandelwal et al., ICLR 2020) over PEMA's external memory. Pure torch: tensors in, tensors out.

The memory holds (key_i, y_i): key_i = f(c_i), the PLM's final-norm input normalized without the norm's gain
(``pema.formats.keys``), and y_i the token that followed c_i. For a query key q (the current context's f(c)):

    d_j          = ||q - key_j||^2 for the k nearest keys j (squared L2)
    p_kNN(y)     = sum_{j: y_j = y} exp(-d_j / temperature) / sum_j exp(-d_j / temperature)
    log P        = log((1 - lam) P_LM + lam p_kNN)          (``pema.adapter.schedule.interpolate``)

Tokens without a neighbour get p_kNN = 0 (-inf in log space); with lam in (0, 1) the mixture stays finite
wherever P_LM is, and lam = 0 is exactly P_LM.
"""
from __future__ import annotations

from typing import Protocol

import torch

DEFAULT_CHUNK = 65536


def _check_query(query: torch.Tensor, d: int) -> None:
    if query.dim() != 2 or query.shape[1] != d:
        raise ValueError(f"query has shape {tuple(query.shape)} but the memory's keys have d={d}; "
                         "query with keys of the PLM that built the memory, shaped (rows, d)")


def _check_k(k, rows: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    if k > rows:
        raise ValueError(f"k={k} is larger than the memory's {rows} rows; lower knn.k or use a larger memory")


def exact_search(query: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = DEFAULT_CHUNK,
                 key_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest ``keys`` (N, d) of each ``query`` row (rows, d) by squared L2 distance.

    Returns ``dist`` (rows, k) float32, ascending, and ``idx`` (rows, k) int64 row numbers into ``keys``, on the
    query's device. ``keys`` is read ``chunk`` rows at a time (cast to float32 per chunk) with a running top-k
    merge, so extra memory is O(rows * (chunk + k)). ``key_sq`` (N,) caches ||key||^2. Candidates are ranked by
    ||q||^2 - 2 q.key + ||key||^2; the returned distances are recomputed directly as sum((q - key)^2).
    """
    _check_query(query, keys.shape[1] if keys.dim() == 2 else -1)
    _check_k(k, keys.shape[0])
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an integer >= 1")
    q = query.to(device=keys.device, dtype=torch.float32)
    q_sq = (q * q).sum(1, keepdim=True)
    best_d = torch.empty(q.shape[0], 0, device=keys.device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=keys.device)
    for start in range(0, keys.shape[0], chunk):
        block = keys[start : start + chunk].float()
        sq = (block * block).sum(1) if key_sq is None else key_sq[start : start + chunk].float()
        dist = (q_sq - 2.0 * (q @ block.T) + sq[None, :]).clamp_min_(0.0)  # (rows, chunk)
        d_c, i_c = torch.topk(dist, min(k, dist.shape[1]), dim=1, largest=False)
        best_d, pos = torch.topk(torch.cat([best_d, d_c], 1), min(k, best_d.shape[1] + d_c.shape[1]), dim=1,
                                 largest=False)
        best_i = torch.cat([best_i, i_c + start], 1).gather(1, pos)
    exact = ((q[:, None, :] - keys[best_i].float()) ** 2).sum(-1)  # (rows, k): no cancellation error
    exact, order = exact.sort(dim=1)
    return exact.to(query.device), best_i.gather(1, order).to(query.device)


def knn_log_probs(dist: torch.Tensor, tokens: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log p_kNN (rows, vocab_size) float32 from neighbour distances ``dist`` (rows, k) and their ``tokens`` (rows, k).

    log p_kNN(y) = logsumexp_{j: tokens_j = y}(-dist_j / T) - logsumexp_j(-dist_j / T), computed per token group
    (scatter of the group max, then scatter-add), so no weight underflows to 0 by itself; distances are taken
    relative to the nearest one first (p_kNN is invariant to the shift). -inf where no neighbour
    has token y. Neighbours with dist = +inf (a search that found fewer than k) are ignored; a row without any
    neighbour is -inf everywhere.
    """
    if dist.shape != tokens.shape or dist.dim() != 2:
        raise ValueError(f"dist {tuple(dist.shape)} and tokens {tuple(tokens.shape)} must both be (rows, k)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    dist = dist.float()
    valid = torch.isfinite(dist)
    nearest = torch.where(valid, dist, float("inf")).amin(1, keepdim=True)
    logits = -(dist - torch.where(torch.isfinite(nearest), nearest, 0.0)) / temperature  # shift: no float32 offset
    tok = torch.where(valid, tokens.long(), 0)
    if bool(((tok < 0) | (tok >= vocab_size)).any()):
        raise ValueError(f"neighbour tokens lie outside [0, {vocab_size}); the memory belongs to another vocabulary")
    neg_inf = torch.full((logits.shape[0], vocab_size), float("-inf"), device=logits.device)
    group_max = neg_inf.scatter_reduce(1, tok, torch.where(valid, logits, float("-inf")), "amax")
    shifted = torch.where(valid, torch.exp(logits - group_max.gather(1, tok)), 0.0)
    group_sum = torch.zeros_like(neg_inf).scatter_add_(1, tok, shifted)
    log_group = torch.where(group_sum > 0, group_max + torch.log(group_sum), neg_inf)
    total = torch.logsumexp(torch.where(valid, logits, float("-inf")), dim=1, keepdim=True)
    return torch.where(torch.isfinite(total), log_group - total, neg_inf)


class Index(Protocol):
    """A nearest-neighbour index over N keys of width d."""

    d: int

    def __len__(self) -> int: ...
    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ExactIndex:
    """Every key, searched exactly with :func:`exact_search`; ``keys`` (N, d) stay on their device and dtype."""

    def __init__(self, keys: torch.Tensor, chunk: int = DEFAULT_CHUNK):
        if keys.dim() != 2 or keys.shape[0] == 0 or not keys.is_floating_point():
            raise ValueError(f"keys must be a non-empty float tensor (N, d), got {tuple(keys.shape)} {keys.dtype}")
        self.keys, self.chunk, self.d = keys, chunk, int(keys.shape[1])
        self.key_sq = (keys.float() ** 2).sum(1)  # (N,) cached ||key||^2

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` (rows, d) -> dist (rows, k) float32, idx (rows, k) int64 on the query's device."""
        return exact_search(query, self.keys, k, self.chunk, self.key_sq)


class KnnScorer:
    """``scorer(key (rows, d)) -> log p_kNN (rows, vocab_size)``: the kNN-LM's distribution for the decode path.

    ``index`` has ``.search(query, k)`` (and ``len``); ``tokens`` (N,) holds the memory's next token per key row.
    """

    def __init__(self, index: Index, tokens: torch.Tensor, vocab_size: int, k: int, temperature: float = 1.0):
        if tokens.dim() != 1 or tokens.shape[0] != len(index):
            raise ValueError(f"tokens {tuple(tokens.shape)} must be (N,) with N = the index's {len(index)} rows")
        _check_k(k, len(index))
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size:
            raise ValueError(f"memory tokens span [{int(tokens.min())}, {int(tokens.max())}] but vocab_size="
                             f"{vocab_size}; use the vocabulary size of the PLM that built the memory")
        self.index, self.tokens, self.vocab_size = index, tokens.long(), int(vocab_size)
        self.k, self.temperature = k, float(temperature)

    @torch.no_grad()
    def __call__(self, key: torch.Tensor) -> torch.Tensor:
        dist, idx = self.index.search(key, self.k)
        valid = idx >= 0  # FAISS marks missing neighbours with -1
        tok = self.tokens[idx.clamp_min(0).to(self.tokens.device)].to(dist.device)
        dist = torch.where(valid.to(dist.device), dist.float(), float("inf"))
        return knn_log_probs(dist, tok, self.vocab_size, self.temperature).to(key.device)


def neighbours_outside_group(keys: torch.Tensor, groups: torch.Tensor, k: int, *, block: int = 2048,
                             chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``keys`` (N, d): its ``k`` nearest other rows by squared L2 whose ``groups`` (N,) value
    differs from its own (a key's neighbours never come from its own example, whose later positions would leak its
    target). Returns ``dist`` (N, k) float32 ascending and ``idx`` (N, k) int64; rows with fewer than k candidates
    get ``inf`` / -1 in the missing slots. Exact: query blocks of ``block`` rows against key chunks of ``chunk``
    rows with a running top-k, O(block * (chunk + k)) extra memory."""
    if keys.dim() != 2 or groups.shape != keys.shape[:1]:
        raise ValueError(f"keys {tuple(keys.shape)} and groups {tuple(groups.shape)} must be (N, d) and (N,)")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    n = keys.shape[0]
    sq = (keys.float() ** 2).sum(1)
    out_d = torch.empty(n, k)
    out_i = torch.empty(n, k, dtype=torch.long)
    for qs in range(0, n, block):
        q, g = keys[qs:qs + block].float(), groups[qs:qs + block]
        best_d = torch.full((q.shape[0], k), float("inf"))
        best_i = torch.full((q.shape[0], k), -1, dtype=torch.long)
        for cs in range(0, n, chunk):
            c = keys[cs:cs + chunk].float()
            dist = (sq[qs:qs + block, None] - 2.0 * (q @ c.T) + sq[None, cs:cs + chunk]).clamp_min_(0.0)
            dist.masked_fill_(g[:, None] == groups[None, cs:cs + chunk], float("inf"))
            d_c, i_c = torch.topk(dist, min(k, dist.shape[1]), dim=1, largest=False)
            merged_d, pos = torch.topk(torch.cat([best_d, d_c], 1), k, dim=1, largest=False)
            best_i = torch.cat([best_i, i_c + cs], 1).gather(1, pos)
            best_d = merged_d
        best_i[~torch.isfinite(best_d)] = -1
        out_d[qs:qs + block], out_i[qs:qs + block] = best_d, best_i
    return out_d, out_i


def neighbour_weights(dist: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_kNN's weight of each neighbour (rows, k): softmax(-dist / T) over the finite distances (0 elsewhere); a row
    without a neighbour is all 0."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    logits = torch.where(torch.isfinite(dist), -dist.float() / temperature, float("-inf"))
    w = torch.softmax(logits, dim=1)
    return torch.nan_to_num(w, nan=0.0)
