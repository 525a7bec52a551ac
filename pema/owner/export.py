"""Export the PLM's output head: final norm (type, gain, bias, eps), optional projection and LM head.

This is all the data owner ever receives of the PLM's weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from pema.formats.bundle import HEAD_FORMAT, write_bundle
from pema.owner.plm import architecture_of, head_modules

HEAD_VERSION = 1


def export_head(model: nn.Module, out_dir: str | os.PathLike, *, model_id: str, model_revision: str | None = None,
                tokenizer_hash: str = "", extra: dict | None = None) -> dict:
    """Write ``head.safetensors`` + ``head.json`` into ``out_dir``; returns the metadata written."""
    heads = head_modules(model)
    tensors = {"norm.weight": heads.norm.weight}
    if getattr(heads.norm, "bias", None) is not None:
        tensors["norm.bias"] = heads.norm.bias
    if heads.proj is not None:
        if heads.proj.bias is not None:
            raise ValueError("a biased projection after the final norm is not supported")
        tensors["proj.weight"] = heads.proj.weight
    tensors["lm_head.weight"] = heads.lm_head.weight
    if heads.lm_head.bias is not None:
        tensors["lm_head.bias"] = heads.lm_head.bias
    tensors = {k: v.float() for k, v in tensors.items()}
    meta = {
        "format": HEAD_FORMAT,
        "version": HEAD_VERSION,
        "model_id": model_id,
        "model_revision": model_revision,
        "model_type": model.config.model_type,
        "norm_path": architecture_of(model)[1],
        "norm_type": heads.norm_type,
        "eps": heads.eps,
        "d": int(heads.norm.weight.shape[0]),
        "vocab_size": int(heads.lm_head.weight.shape[0]),
        "logit_scale": 1.0,
        "tokenizer_hash": tokenizer_hash,
        "extra": extra or {},
    }
    write_bundle(out_dir, "head", tensors, meta)
    return meta


def tokenizer_files(tokenizer) -> bytes:
    """The tokenizer's files as JSON ``{name: base64}`` (vocabulary, merges, chat template; no weights): what
    the owner's service hands out at ``GET /tokenizer``."""
    import base64
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return json.dumps(files).encode()
