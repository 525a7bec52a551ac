"""The training memory's stored neighbours (kNN-distilled training): ``<memory>/neighbours.{safetensors,json}``.

For every memory row, the ``k`` nearest keys of OTHER examples (squared L2; :func:`pema.baselines.knn.
neighbours_outside_group`): ``index`` (rows, k) int64 row numbers into the memory (-1: none) and ``distance``
(rows, k) float32. The JSON records ``k``, how they were searched and the sha256 of the memory's ``manifest.json``
they belong to: a memory rebuilt or edited after them makes them stale, and :func:`load_neighbours` says so
instead of pairing rows with another memory's neighbours. Written atomically (tensors, then the JSON).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from pema.errors import MemoryFormatError
from pema.formats.bundle import write_bundle
from pema.formats.memory import file_sha256

NAME, FORMAT = "neighbours", "pema-neighbours"


def manifest_digest(mem_dir: str | os.PathLike) -> str:
    return file_sha256(Path(mem_dir) / "manifest.json")


def save_neighbours(mem_dir: str | os.PathLike, distance: torch.Tensor, index: torch.Tensor, *, search: str) -> Path:
    """Store ``distance`` / ``index`` (rows, k) beside the memory at ``mem_dir``, tied to its manifest."""
    if distance.shape != index.shape or distance.dim() != 2:
        raise ValueError(f"distance {tuple(distance.shape)} and index {tuple(index.shape)} must both be (rows, k)")
    meta = {"format": FORMAT, "k": int(index.shape[1]), "rows": int(index.shape[0]), "search": search,
            "exclude": "same example", "manifest_sha256": manifest_digest(mem_dir)}
    return write_bundle(mem_dir, NAME, {"distance": distance.float(), "index": index.long()}, meta)


def neighbours_status(mem_dir: str | os.PathLike, k: int) -> str | None:
    """None when ``mem_dir`` holds usable neighbours for ``k`` (at least k per row, this manifest); else why not."""
    js = Path(mem_dir) / f"{NAME}.json"
    if not js.is_file():
        return "none stored"
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{js} is unreadable ({exc})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{js} is not a {FORMAT} file"
    if meta.get("manifest_sha256") != manifest_digest(mem_dir):
        return "stale (the memory changed after they were computed)"
    if not isinstance(meta.get("k"), int) or meta["k"] < k:
        return f"{meta.get('k')} per row stored, {k} wanted"
    return None


def load_neighbours(mem_dir: str | os.PathLike, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance, index)`` (rows, k) of the memory at ``mem_dir``; MemoryFormatError naming the file when they are
    missing, stale, damaged or fewer than ``k`` per row."""
    if (why := neighbours_status(mem_dir, k)) is not None:
        raise MemoryFormatError(f"{mem_dir}: no usable stored neighbours ({why}); rerun training with "
                                "train.distill_beta > 0 to compute them")
    st = Path(mem_dir) / f"{NAME}.safetensors"
    try:
        t = load_file(str(st))
        distance, index = t["distance"], t["index"]
    except Exception as exc:  # SafetensorError, OSError, KeyError
        raise MemoryFormatError(f"{st} is not a readable neighbours file ({exc}); delete it and rerun") from exc
    rows = json.loads((Path(mem_dir) / f"{NAME}.json").read_text())["rows"]
    if distance.shape != index.shape or distance.dim() != 2 or distance.shape[0] != rows:
        raise MemoryFormatError(f"{st} holds tensors of shapes {tuple(distance.shape)} / {tuple(index.shape)}, not "
                                f"({rows}, k); delete it and rerun")
    return distance[:, :k].contiguous(), index[:, :k].contiguous()
