"""The training memory's neighbours for kNN-distilled training, computed once and stored beside the memory.

:func:`ensure_neighbours` runs on the driver before the training workers start: it computes, for every row of
``memory/train``, the ``train.distill_k`` nearest keys of other examples (exact in torch up to
``knn.exact_max_rows`` rows, a FAISS IVF-PQ search with over-fetch above) and stores them
(:mod:`pema.formats.neighbours`); a memory that already has fresh ones is left alone. :func:`distill_targets`
turns a worker's share of them into the batch columns the loss reads (``nb_token``, ``nb_weight``).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from pema.baselines.knn import neighbour_weights, neighbours_outside_group
from pema.config import PipelineConfig
from pema.formats.memory import MemoryReader
from pema.formats.neighbours import load_neighbours, neighbours_status, save_neighbours

OVERFETCH = 4  # an approximate search asks for this many times k, then drops the key's own example


def ensure_neighbours(cfg: PipelineConfig, mem_dir: str | os.PathLike, log=print) -> bool:
    """Compute and store the neighbours of ``mem_dir`` when ``train.distill_beta`` > 0 and none fresh are stored;
    returns whether it computed them."""
    t = cfg.train
    if t.distill_beta <= 0 or neighbours_status(mem_dir, t.distill_k) is None:
        return False
    start = time.perf_counter()
    data = MemoryReader(mem_dir).read_all()
    keys, groups = torch.from_numpy(data["key"]), torch.from_numpy(data["example"])
    rows = keys.shape[0]
    if t.distill_k > rows - 1:
        raise ValueError(f"train.distill_k={t.distill_k} is not below the memory's {rows} rows; lower it")
    if rows <= cfg.knn.exact_max_rows:
        dist, idx = neighbours_outside_group(keys, groups, t.distill_k)
        search = "exact"
    else:
        dist, idx = _approximate(keys, groups, t.distill_k, cfg)
        search = "ivfpq"
    save_neighbours(mem_dir, dist, idx, search=search)
    log(f"[train] stored {t.distill_k} neighbours per row for {rows:,} memory rows ({search} search, "
        f"{time.perf_counter() - start:.0f} s)")
    return True


def _approximate(keys: torch.Tensor, groups: torch.Tensor, k: int, cfg: PipelineConfig):
    from pema.baselines.knn_index import FaissIndex, ivfpq_settings

    index = FaissIndex.ivfpq(keys.numpy(), **ivfpq_settings(keys.shape[0], keys.shape[1], cfg.knn))
    dist_all, idx_all = [], []
    for start in range(0, keys.shape[0], 8192):
        d, i = index.search(keys[start:start + 8192], min(len(index), k * OVERFETCH))
        own = (i < 0) | (groups[i.clamp_min(0)] == groups[start:start + 8192, None])
        d = torch.where(own, float("inf"), d)
        d, order = d.sort(dim=1)
        i = torch.where(torch.isfinite(d), i.gather(1, order), -1)
        dist_all.append(d[:, :k]), idx_all.append(i[:, :k])
    return torch.cat(dist_all), torch.cat(idx_all)


def distill_targets(cfg: PipelineConfig, mem_dir: str | os.PathLike, start: int, stop: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """``{"nb_token", "nb_weight"}`` (rows, k) for memory rows ``[start, stop)``: the neighbours' tokens and their
    p_kNN weights at ``train.distill_temperature`` (0 for a missing neighbour)."""
    t = cfg.train
    dist, idx = load_neighbours(mem_dir, t.distill_k)
    tokens = torch.from_numpy(np.concatenate([b["token"] for b in MemoryReader(mem_dir).iter_batches(1 << 16)]))
    dist, idx = dist[start:stop], idx[start:stop]
    nb_token = torch.where(idx >= 0, tokens[idx.clamp_min(0)], 0)
    nb_weight = neighbour_weights(torch.where(idx >= 0, dist, float("inf")), t.distill_temperature)
    return {"nb_token": nb_token.to(device), "nb_weight": nb_weight.to(device)}
