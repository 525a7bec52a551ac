"""On-disk bundles exchanged between the parties: ``<name>.safetensors`` + ``<name>.json``.

The head bundle (``head/``) is what the PLM owner hands out; the adapter bundle (``adapter/``) is what the data
owner trains. Both are written atomically: tensors and metadata go to temporary files, then are renamed, metadata
last, so a reader that finds the JSON finds complete tensors. No pickles anywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pema.errors import MemoryFormatError

HEAD_FORMAT = "pema-head"
ADAPTER_FORMAT = "pema-adapter"


def write_bundle(out_dir: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``out_dir/name.safetensors`` then ``out_dir/name.json``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st, js = out / f"{name}.safetensors", out / f"{name}.json"
    tmp_st, tmp_js = st.with_suffix(".safetensors.tmp"), js.with_suffix(".json.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp_st))
        tmp_js.write_text(json.dumps(meta, indent=2, sort_keys=True))
        if js.exists():
            js.unlink()  # a half-replaced bundle must never look complete
        os.replace(tmp_st, st)
        os.replace(tmp_js, js)
    finally:
        for tmp in (tmp_st, tmp_js):
            if tmp.exists():
                tmp.unlink()
    return out


def read_bundle(bundle_dir: str | os.PathLike, name: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a bundle written by :func:`write_bundle` and check its ``format`` field equals ``fmt``."""
    d = Path(bundle_dir)
    js, st = d / f"{name}.json", d / f"{name}.safetensors"
    if not js.is_file() or not st.is_file():
        raise MemoryFormatError(f"{d} is not a complete {fmt} bundle: expected {js.name} and {st.name}")
    meta = json.loads(js.read_text())
    if meta.get("format") != fmt:
        raise MemoryFormatError(f"{js} has format {meta.get('format')!r}, expected {fmt!r}")
    return load_file(str(st)), meta
