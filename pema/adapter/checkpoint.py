"""Training checkpoints on disk, without pickles: ``tensors.safetensors`` + ``state.json``.

A :class:`~pema.adapter.phases.TrainCheckpoint` holds three state dicts (the adapter now, its best state so far, the
AdamW state) and plain data (phase, epoch, batches taken, history, ...). Tensors go to safetensors under the prefixes
``adapter.``, ``best.``, ``rng.`` (generator states) and ``opt.<param index>.``; everything else, including the optimizer's param groups, goes to
JSON. Both files are written to temporary names first and moved into place, ``state.json`` last.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pema.adapter.phases import TrainCheckpoint
from pema.adapter.train import PhaseState
from pema.errors import CheckpointError

CHECKPOINT_FORMAT = "pema-train-checkpoint/1"
TENSORS, STATE = "tensors.safetensors", "state.json"
_TENSOR_FIELDS = ("adapter", "best", "rng")


def save_checkpoint(ckpt: TrainCheckpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    st = ckpt.state
    tensors = {f"{field}.{k}": v.detach().cpu().contiguous() for field in _TENSOR_FIELDS
               for k, v in getattr(st, field).items()}
    opt_state = {}
    for index, slots in (st.optimizer.get("state") or {}).items():
        plain = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        opt_state[str(index)] = plain
    meta = {f.name: getattr(st, f.name) for f in dataclasses.fields(PhaseState)
            if f.name not in _TENSOR_FIELDS + ("optimizer",)}
    doc = {"format": CHECKPOINT_FORMAT, "phase_index": ckpt.phase_index, "results": ckpt.results, "state": meta,
           "optimizer": {"param_groups": st.optimizer.get("param_groups", []), "plain_state": opt_state,
                         "indices": sorted(int(i) for i in (st.optimizer.get("state") or {}))}}
    save_file(tensors, path / (TENSORS + ".tmp"))
    os.replace(path / (TENSORS + ".tmp"), path / TENSORS)
    (path / (STATE + ".tmp")).write_text(json.dumps(doc))
    os.replace(path / (STATE + ".tmp"), path / STATE)
    return path


def load_checkpoint(path: str | os.PathLike) -> TrainCheckpoint:
    path = Path(path)
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: {STATE} or {TENSORS} is missing")
    try:
        doc = json.loads((path / STATE).read_text())
        tensors = load_file(path / TENSORS)
    except Exception as exc:  # json or safetensors decoding errors of several types
        raise CheckpointError(f"training checkpoint {path} cannot be read ({exc})") from exc
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {doc.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    groups = {field: {} for field in _TENSOR_FIELDS}
    opt_slots: dict[int, dict] = {i: dict(doc["optimizer"]["plain_state"].get(str(i), {}))
                                  for i in doc["optimizer"]["indices"]}
    for name, value in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix == "opt":
            index, _, slot = rest.partition(".")
            opt_slots[int(index)][slot] = value
        else:
            groups[prefix][rest] = value
    optimizer = {"state": opt_slots, "param_groups": doc["optimizer"]["param_groups"]}
    state = PhaseState(**doc["state"], **groups, optimizer=optimizer)
    return TrainCheckpoint(doc["phase_index"], doc["results"], state)
