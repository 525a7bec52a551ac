"""Read the owner's head bundle and read/write adapter bundles (safetensors + JSON, no pickles).

Both readers check a bundle against itself before anything else: its JSON's fields and types, and every tensor's
shape against what the JSON says (d, vocabulary, rank). A bundle that is damaged or edited, down to a header that
lies about a shape, is a MemoryFormatError naming the file and the two values; a good bundle of another PLM is a
MemoryMismatchError."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pema.adapter.head import OutputHead
from pema.adapter.model import PemaAdapter
from pema.formats.bundle import ADAPTER_FORMAT, HEAD_FORMAT, RECOVER, check_meta, read_bundle, write_bundle
from pema.errors import MemoryFormatError, MemoryMismatchError

_NUM = (int, float)


def _head_shapes_ok(shapes: dict[str, tuple]) -> bool:
    """The head's tensors fit together: norm (d,), optional proj (p, d), LM head (V, p or d), biases (d,) / (V,)."""
    norm, lm, proj = shapes["norm.weight"], shapes["lm_head.weight"], shapes.get("proj.weight")
    if len(norm) != 1 or len(lm) != 2 or (proj is not None and len(proj) != 2):
        return False
    width = norm[0] if proj is None else proj[0]
    return ((proj is None or proj[1] == norm[0]) and lm[1] == width and shapes.get("norm.bias", norm) == norm
            and shapes.get("lm_head.bias", lm[:1]) == lm[:1])


def load_head(bundle_dir: str | os.PathLike) -> tuple[OutputHead, dict]:
    tensors, meta = read_bundle(bundle_dir, "head", HEAD_FORMAT)
    return head_from_tensors(tensors, meta, Path(bundle_dir) / "head.json", Path(bundle_dir) / "head.safetensors")


def head_from_tensors(tensors: dict, meta: dict, js, st) -> tuple[OutputHead, dict]:
    """The head of a bundle's tensors and head.json (``js`` and ``st`` name where they came from in errors)."""
    fix = RECOVER[HEAD_FORMAT]
    missing = [k for k in ("norm.weight", "lm_head.weight") if k not in tensors]
    if missing:
        raise MemoryFormatError(f"head bundle {st} lacks tensors {missing}; {fix}")
    check_meta(meta, js, {"norm_type": str, "eps": _NUM, "d": int, "vocab_size": int}, HEAD_FORMAT)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if not _head_shapes_ok(shapes):
        raise MemoryFormatError(f"the tensors of {st} do not fit together ({shapes}); {fix}")
    d, vocab = shapes["norm.weight"][0], shapes["lm_head.weight"][0]
    if d != meta["d"] or vocab != meta["vocab_size"]:
        raise MemoryMismatchError(f"{js} says d={meta['d']}, vocab_size={meta['vocab_size']} but the tensors of "
                                  f"{Path(str(st)).name} have d={d}, vocab_size={vocab}; {fix}")
    try:
        head = OutputHead(
            norm_type=meta["norm_type"], eps=meta["eps"], norm_weight=tensors["norm.weight"],
            norm_bias=tensors.get("norm.bias"), proj_weight=tensors.get("proj.weight"),
            lm_head_weight=tensors["lm_head.weight"], lm_head_bias=tensors.get("lm_head.bias"),
            logit_scale=meta.get("logit_scale", 1.0),
        )
    except (ValueError, TypeError) as e:  # an unknown norm_type, a logit_scale that is not a number
        raise MemoryFormatError(f"{js} holds values no head has ({e}); {fix}") from e
    head.requires_grad_(False)
    return head, meta


def save_adapter(adapter: PemaAdapter, out_dir: str | os.PathLike, meta: dict | None = None) -> None:
    info = {"format": ADAPTER_FORMAT, "version": 1, "d": adapter.d, "rank": adapter.rank, "alpha": adapter.alpha,
            "dropout": adapter.p, "mlp_hidden": adapter.mlp_hidden, **(meta or {})}
    write_bundle(out_dir, "adapter", {k: v for k, v in adapter.state_dict().items()}, info)


def load_adapter(bundle_dir: str | os.PathLike, head_meta: dict | None = None) -> tuple[PemaAdapter, dict]:
    """Load an adapter; with ``head_meta`` also check it was trained for that head (d and model id)."""
    tensors, meta = read_bundle(bundle_dir, "adapter", ADAPTER_FORMAT)
    js, fix = Path(bundle_dir) / "adapter.json", RECOVER[ADAPTER_FORMAT]
    check_meta(meta, js, {"d": int, "rank": int, "alpha": _NUM, "dropout": _NUM}, ADAPTER_FORMAT)
    d, rank, hidden = meta["d"], meta["rank"], meta.get("mlp_hidden", 0)
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 0:
        raise MemoryFormatError(f"{js}: field 'mlp_hidden'={hidden!r} is not an integer >= 0; {fix}")
    want = {"A": (rank, d), "B_rct": (d, rank), "B_pd": (d, rank)}
    if hidden:
        want.update(W_1=(hidden, d), W_2=(d, hidden))
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise MemoryFormatError(f"{js} says d={d}, rank={rank}, mlp_hidden={hidden}, so adapter.safetensors should "
                                f"hold {want}, but it "
                                f"holds {got}; {fix}")
    if head_meta is not None:
        if d != head_meta["d"]:
            raise MemoryMismatchError(f"adapter {bundle_dir} has d={d} but the head bundle has d={head_meta['d']}")
        if meta.get("model_id") and meta["model_id"] != head_meta.get("model_id"):
            raise MemoryMismatchError(f"adapter {bundle_dir} was trained for model {meta['model_id']!r} but the head "
                                      f"bundle is for {head_meta.get('model_id')!r}")
    try:
        adapter = PemaAdapter(d, rank, meta["alpha"], meta["dropout"], hidden)
    except ValueError as e:  # d or rank <= 0, dropout outside [0, 1)
        raise MemoryFormatError(f"{js} holds values no adapter has ({e}); {fix}") from e
    adapter.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
    adapter.eval()
    return adapter, meta
