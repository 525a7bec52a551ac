"""Read the owner's head bundle and read/write adapter bundles (safetensors + JSON, no pickles)."""
from __future__ import annotations

import os

import torch

from pema.adapter.head import OutputHead
from pema.adapter.model import PemaAdapter
from pema.formats.bundle import ADAPTER_FORMAT, HEAD_FORMAT, read_bundle, write_bundle
from pema.errors import MemoryFormatError, MemoryMismatchError



def load_head(bundle_dir: str | os.PathLike) -> tuple[OutputHead, dict]:
    tensors, meta = read_bundle(bundle_dir, "head", HEAD_FORMAT)
    missing = [k for k in ("norm.weight", "lm_head.weight") if k not in tensors]
    if missing:
        raise MemoryFormatError(f"head bundle {bundle_dir} lacks tensors {missing}; re-export it with pema.owner.export")
    head = OutputHead(
        norm_type=meta["norm_type"], eps=meta["eps"], norm_weight=tensors["norm.weight"],
        norm_bias=tensors.get("norm.bias"), proj_weight=tensors.get("proj.weight"),
        lm_head_weight=tensors["lm_head.weight"], lm_head_bias=tensors.get("lm_head.bias"),
        logit_scale=meta.get("logit_scale", 1.0),
    )
    if head.d != meta["d"] or head.vocab_size != meta["vocab_size"]:
        raise MemoryMismatchError(f"{bundle_dir}: head.json says d={meta['d']}, vocab={meta['vocab_size']} but the "
                                  f"tensors have d={head.d}, vocab={head.vocab_size}")
    head.requires_grad_(False)
    return head, meta


def save_adapter(adapter: PemaAdapter, out_dir: str | os.PathLike, meta: dict | None = None) -> None:
    info = {"format": ADAPTER_FORMAT, "version": 1, "d": adapter.d, "rank": adapter.rank, "alpha": adapter.alpha,
            "dropout": adapter.p, **(meta or {})}
    write_bundle(out_dir, "adapter", {k: v for k, v in adapter.state_dict().items()}, info)


def load_adapter(bundle_dir: str | os.PathLike, head_meta: dict | None = None) -> tuple[PemaAdapter, dict]:
    """Load an adapter; with ``head_meta`` also check it was trained for that head (d and model id)."""
    tensors, meta = read_bundle(bundle_dir, "adapter", ADAPTER_FORMAT)
    if head_meta is not None:
        if meta["d"] != head_meta["d"]:
            raise MemoryMismatchError(f"adapter {bundle_dir} has d={meta['d']} but the head bundle has d={head_meta['d']}")
        if meta.get("model_id") and meta["model_id"] != head_meta.get("model_id"):
            raise MemoryMismatchError(f"adapter {bundle_dir} was trained for model {meta['model_id']!r} but the head "
                                      f"bundle is for {head_meta.get('model_id')!r}")
    adapter = PemaAdapter(meta["d"], meta["rank"], meta["alpha"], meta["dropout"])
    adapter.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
    adapter.eval()
    return adapter, meta
