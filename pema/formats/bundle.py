"""On-disk bundles exchanged between the parties: ``<name>.safetensors`` + ``<name>.json``.

The head bundle (``head/``) is what the PLM owner hands out; the adapter bundle (``adapter/``) is what the data
owner trains. Both are written atomically: tensors and metadata go to temporary files, then are renamed, metadata
last, so a reader that finds the JSON finds complete tensors. No pickles anywhere.
"""
from __future__ import annotations

import json
import os
import re
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
        try:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp_st))
        except Exception as e:  # a SafetensorError carrying an I/O error (a full disk): an OSError naming the file
            if not (code := re.search(r"os error (\d+)", str(e))):
                raise
            raise OSError(int(code.group(1)), f"cannot write {tmp_st} ({e})") from e
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


# how to get a good bundle back, per format
RECOVER = {HEAD_FORMAT: "rerun the memory build (pema build, same --output-dir): it re-exports a "
                        "damaged head",
           ADAPTER_FORMAT: "rerun training (pema train, same --output-dir) to write the adapter again"}


def read_bundle(bundle_dir: str | os.PathLike, name: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a bundle written by :func:`write_bundle` and check its ``format`` field equals ``fmt``.

    A missing file, JSON that does not parse (or is not an object), a safetensors file that is truncated or whose
    header is damaged or does not cover its data, and a tensor that is not floating point are MemoryFormatErrors that
    name the file, what is wrong and how to get the bundle back; no json/safetensors error escapes."""
    d = Path(bundle_dir)
    js, st = d / f"{name}.json", d / f"{name}.safetensors"
    fix = RECOVER.get(fmt, "write the bundle again")
    if not js.is_file() or not st.is_file():
        raise MemoryFormatError(f"{d} is not a complete {fmt} bundle: expected {js.name} and {st.name}; {fix}")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise MemoryFormatError(f"{js} is not valid JSON ({e}); {fix}") from e
    if not isinstance(meta, dict):
        raise MemoryFormatError(f"{js} holds a JSON {type(meta).__name__}, not an object; {fix}")
    if meta.get("format") != fmt:
        raise MemoryFormatError(f"{js} has format {meta.get('format')!r}, expected {fmt!r}")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # SafetensorError (truncated, bad header, data not covered), OSError
        raise MemoryFormatError(f"{st} is not a readable safetensors file ({e}): truncated or damaged; {fix}") from e
    if bad := sorted(k for k, v in tensors.items() if not v.is_floating_point()):
        raise MemoryFormatError(f"{st} holds non-float tensors {bad} "
                                f"({', '.join(str(tensors[k].dtype) for k in bad)}); {fix}")
    return tensors, meta


def check_meta(meta: dict, path: str | os.PathLike, fields: dict[str, type | tuple], fmt: str) -> None:
    """MemoryFormatError naming ``path`` when a bundle's JSON lacks one of ``fields`` or holds a value of another
    type (``bool`` is not an ``int``)."""
    for key, types in fields.items():
        value, types = meta.get(key), types if isinstance(types, tuple) else (types,)
        if key not in meta or isinstance(value, bool) or not isinstance(value, types):
            raise MemoryFormatError(f"{path}: field {key!r}={value!r} is missing or not of type "
                                    f"{'/'.join(t.__name__ for t in types)}; {RECOVER.get(fmt, 'write it again')}")
