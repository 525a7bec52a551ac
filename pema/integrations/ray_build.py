"""The PLM owner's memory build on Ray Data: encoder actors (one per GPU), the driver the only writer, resumable.

Plan. The driver loads only the tokenizer, tokenizes the pairs as at inference (``prepare_examples``), groups them
with ``length_batches`` and cuts the run of batches into shards of at least ``rows_per_part`` rows (whole batches;
the last shard may be shorter). Shard i becomes ``part-{i:05d}.parquet``. The plan depends on the data, tokenizer
and config only, never on the number of actors, so parts, row order and keys do not change with the cluster.

Encode. Ray Data streams the pending shards (their token ids as JSON) through a fixed pool of actors, each loading
the PLM once and running :class:`MemoryEncoder` per length batch. Rows come back tagged with their shard; Ray may
split or merge blocks (and rerun a failed task), so the driver puts a shard's rows back in plan order (example,
then position), drops duplicates, checks the rows are exactly the shard's target tokens and writes the part with
:func:`write_part` as soon as the shard is complete.

Resume. Everything is staged in ``<out_dir>.partial/``: ``plan.json`` holds a fingerprint of the inputs and each
finished part gets a sidecar ``part-NNNNN.parquet.json`` (rows, sha256, d, vocab size) written after the part.
A rerun with the same fingerprint keeps the parts whose sha256 matches their sidecar and rebuilds the rest; another
fingerprint starts over. The manifest is written last, the staging folder is checked with :func:`verify_memory` and
moved into place. A memory already in ``out_dir`` with the same fingerprint is returned without rebuilding.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import ray
from tqdm.auto import tqdm

from pema.config import MemoryConfig, PipelineConfig
from pema.errors import ConfigError, DataError, MemoryFormatError
from pema.integrations.ray_runtime import init_ray
from pema.keys import KEY_DEFINITION
from pema.memory import (MANIFEST_NAME, SCHEMA_VERSION, MemoryManifest, PartInfo, file_sha256, verify_memory,
                         write_part)
from pema.owner.build import prepare_examples
from pema.owner.encode import EncodeExample, MemoryEncoder, length_batches
from pema.owner.export import export_head
from pema.owner.plm import head_modules, load_plm, load_tokenizer
from pema.tasks import Pair, load_pairs, resolve_template, stop_token_id, tokenizer_hash, use_chat_template

PLAN_NAME = "plan.json"
SIDECAR_SUFFIX = ".json"  # part-00003.parquet -> part-00003.parquet.json
Shard = list[list[EncodeExample]]  # consecutive length batches


def plan_shards(examples: Sequence[EncodeExample], batch_tokens: int, rows_per_part: int) -> list[Shard]:
    """Length batches of ``examples``, cut into shards of >= ``rows_per_part`` target rows (the last may be fewer)."""
    shards, current, rows = [], [], 0
    for batch in length_batches(examples, batch_tokens):
        current.append(batch)
        rows += sum(len(e.target_ids) for e in batch)
        if rows >= rows_per_part:
            shards.append(current)
            current, rows = [], 0
    return shards + ([current] if current else [])


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=2)
def _tokenizer(model_id: str, revision: str | None):
    return load_tokenizer(model_id, revision)


class _MemoryBuild:
    """One memory: its plan, its staging folder and the rows received per pending shard."""

    def __init__(self, cfg: PipelineConfig, tokenizer, pairs: Sequence[Pair], out_dir):
        if not pairs:
            raise DataError(f"no pairs to build the memory {os.fspath(out_dir)} from; pass at least one pair")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise MemoryFormatError(f"memory folder {self.out_dir} exists and is not a directory")
        self.staging = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.mem = cfg.memory
        template, chat = resolve_template(cfg.data.template), use_chat_template(tokenizer, cfg.model.prompt_format)
        examples, self.source_tokens = prepare_examples(tokenizer, pairs, template=template,
                                                        source_field=cfg.data.source_field, chat=chat)
        self.num_examples = len(examples)
        self.shards = plan_shards(examples, cfg.memory.batch_tokens, cfg.memory.rows_per_part)
        self.shard_rows = [sum(len(e.target_ids) for batch in shard for e in batch) for shard in self.shards]
        header = dict(schema=SCHEMA_VERSION, key=KEY_DEFINITION, model_id=cfg.model.model_id,
                      revision=cfg.model.revision, model_dtype=cfg.model.dtype, tokenizer=tokenizer_hash(tokenizer),
                      template=template, chat=chat, source_field=cfg.data.source_field, dtype=cfg.memory.dtype,
                      batch_tokens=cfg.memory.batch_tokens, rows_per_part=cfg.memory.rows_per_part)
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for e in examples:
            h.update(json.dumps([e.example, e.prompt_ids, e.target_ids]).encode() + b"\n")
        self.fingerprint = h.hexdigest()
        self.meta = dict(model_id=cfg.model.model_id, model_revision=cfg.model.revision,
                         tokenizer_hash=header["tokenizer"], template=template, key_definition=KEY_DEFINITION,
                         extra={"prompt_format": "chat" if chat else "raw", "source_field": cfg.data.source_field,
                                "stop_token_id": stop_token_id(tokenizer, chat=chat), "fingerprint": self.fingerprint})
        self.done: dict[int, dict] = {}  # shard -> its sidecar
        self.chunks: dict[int, list[dict]] = {}
        self.received: dict[int, int] = {}

    def existing(self) -> MemoryManifest | None:
        """The memory in ``out_dir`` when it is intact and has this build's fingerprint."""
        if not (self.out_dir / MANIFEST_NAME).is_file():
            return None
        try:
            manifest = verify_memory(self.out_dir)
        except MemoryFormatError:
            return None
        return manifest if manifest.extra.get("fingerprint") == self.fingerprint else None

    def resume(self) -> None:
        """Keep the staged parts whose sha256 matches their sidecar; remove everything else."""
        if self.staging.exists() and not self.staging.is_dir():
            self.staging.unlink()
        plan = _read_json(self.staging / PLAN_NAME)
        if not isinstance(plan, dict) or plan.get("fingerprint") != self.fingerprint:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            _write_json(self.staging / PLAN_NAME, {"fingerprint": self.fingerprint, "shard_rows": self.shard_rows})
        keep = {PLAN_NAME}
        for i in range(len(self.shards)):
            part = self.staging / f"part-{i:05d}.parquet"
            side = _read_json(part.with_name(part.name + SIDECAR_SUFFIX))
            if (isinstance(side, dict) and part.is_file() and side.get("rows") == self.shard_rows[i]
                    and side.get("sha256") == file_sha256(part)):
                self.done[i] = side
                keep |= {part.name, part.name + SIDECAR_SUFFIX}
        for entry in os.listdir(self.staging):  # unfinished or corrupt parts, .tmp leftovers, an old manifest
            if entry not in keep:
                path = self.staging / entry
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def pending(self) -> list[int]:
        return [i for i in range(len(self.shards)) if i not in self.done]

    def payload(self, i: int) -> str:
        return json.dumps([[[e.example, e.prompt_ids, e.target_ids] for e in batch] for batch in self.shards[i]])

    def add(self, i: int, rows: dict[str, np.ndarray]) -> None:
        """Collect rows of shard ``i``; write its part once every target token of the shard has arrived."""
        if i in self.done:
            return  # a retried task's late duplicate
        self.chunks.setdefault(i, []).append(rows)
        self.received[i] = self.received.get(i, 0) + len(rows["token"])
        if self.received[i] < self.shard_rows[i]:
            return
        cols = {c: np.concatenate([ch[c] for ch in self.chunks[i]]) for c in rows}
        examples = [e for batch in self.shards[i] for e in batch]
        ids = np.array([e.example for e in examples], np.int64)
        lens = np.array([len(e.target_ids) for e in examples], np.int64)
        sorter = np.argsort(ids, kind="stable")
        rank = sorter[np.clip(np.searchsorted(ids, cols["example"], sorter=sorter), 0, len(ids) - 1)]
        if not np.array_equal(ids[rank], cols["example"]):
            raise MemoryFormatError(f"shard {i} of {self.out_dir}: rows of examples outside the shard came back")
        order = np.lexsort((cols["position"], rank))
        first = np.r_[True, (np.diff(rank[order]) != 0) | (np.diff(cols["position"][order]) != 0)]
        cols = {c: v[order[first]] for c, v in cols.items()}  # plan order, one row per (example, position)
        if len(cols["token"]) < self.shard_rows[i]:
            self.chunks[i], self.received[i] = [cols], len(cols["token"])
            return
        want_pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        want_tok = np.concatenate([np.asarray(e.target_ids, np.int64) for e in examples])
        if not (np.array_equal(cols["example"], np.repeat(ids, lens)) and np.array_equal(cols["position"], want_pos)
                and np.array_equal(cols["token"], want_tok)):
            raise MemoryFormatError(f"shard {i} of {self.out_dir}: the encoder's rows are not the shard's target "
                                    "tokens (example, position, token); the encoder and the plan disagree")
        d, vocab = int(cols["d"][0]), int(cols["vocab_size"][0])
        if not np.isfinite(cols["key"]).all():
            raise ValueError(f"shard {i}: keys have non-finite values in {self.mem.dtype}; "
                             "check the hidden states or build the memory with memory.dtype=float32")
        if want_tok.max() >= vocab or cols["key"].shape[1] != d:
            raise MemoryFormatError(f"shard {i}: token ids up to {want_tok.max()} / key width "
                                    f"{cols['key'].shape[1]} do not fit vocab_size={vocab} / d={d}")
        part = self.staging / f"part-{i:05d}.parquet"
        info = write_part(part, key=cols["key"], token=cols["token"], example=cols["example"],
                          position=cols["position"], dtype=self.mem.dtype)
        side = {"file": info.file, "rows": info.rows, "sha256": info.sha256, "d": d, "vocab_size": vocab}
        _write_json(part.with_name(part.name + SIDECAR_SUFFIX), side)
        self.done[i] = side
        del self.chunks[i], self.received[i]

    def finish(self) -> MemoryManifest:
        """Write the manifest, verify the staging folder and move it into ``out_dir``."""
        sides = [self.done[i] for i in range(len(self.shards))]
        shapes = {(s["d"], s["vocab_size"]) for s in sides}
        if len(shapes) != 1:
            raise MemoryFormatError(f"parts of {self.out_dir} disagree on (d, vocab_size): {sorted(shapes)}")
        (d, vocab), = shapes
        parts = tuple(PartInfo(file=s["file"], rows=s["rows"], sha256=s["sha256"]) for s in sides)
        manifest = MemoryManifest(schema_version=SCHEMA_VERSION, d=d, vocab_size=vocab, dtype=self.mem.dtype,
                                  rows_per_part=self.mem.rows_per_part, total_rows=sum(p.rows for p in parts),
                                  num_examples=self.num_examples, source_tokens=self.source_tokens, parts=parts,
                                  **self.meta)
        _write_json(self.staging / MANIFEST_NAME, manifest.to_dict())
        verify_memory(self.staging)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.staging, self.out_dir)
        for name in [PLAN_NAME] + [s["file"] + SIDECAR_SUFFIX for s in sides]:
            (self.out_dir / name).unlink(missing_ok=True)
        return manifest


class _EncodeActor:
    """Ray Data actor: loads the PLM once; turns one shard into its memory rows, one length batch at a time."""

    def __init__(self, model_id: str, revision: str | None, dtype: str, key_dtype: str):
        gpus = len(ray.get_gpu_ids())
        device = "cpu" if gpus == 0 else ("cuda" if gpus == 1 else "auto")
        model, tokenizer = load_plm(model_id, dtype=dtype, device=device, revision=revision)
        heads = head_modules(model)
        self.d, self.vocab_size = int(heads.norm.weight.shape[0]), int(heads.lm_head.weight.shape[0])
        self.encoder = MemoryEncoder(model, pad_id=tokenizer.pad_token_id or 0, key_dtype=key_dtype)

    def __call__(self, batch: dict[str, np.ndarray]):
        for memory, shard, payload in zip(batch["memory"], batch["shard"], batch["batches"]):
            for length_batch in json.loads(payload):
                rows = self.encoder([EncodeExample(*e) for e in length_batch])
                n = len(rows["token"])
                tags = {"memory": memory, "shard": shard, "d": self.d, "vocab_size": self.vocab_size}
                yield {**rows, **{k: np.full(n, v, np.int64) for k, v in tags.items()}}


def actor_resources(mem: MemoryConfig, resources: dict) -> tuple[int, int]:
    """``(actors, gpus per actor)`` for a cluster with ``resources``; ConfigError when they cannot all start."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    per_gpu = mem.gpus_per_actor if gpus else 0
    n = mem.num_actors or (max(1, gpus // mem.gpus_per_actor) if gpus else 1)
    if n * per_gpu > gpus:
        raise ConfigError(f"memory.num_actors={n} x memory.gpus_per_actor={per_gpu} needs {n * per_gpu} GPUs "
                          f"but the cluster has {gpus}; lower them")
    if n * mem.cpus_per_actor > cpus:
        raise ConfigError(f"memory.num_actors={n} x memory.cpus_per_actor={mem.cpus_per_actor} needs "
                          f"{n * mem.cpus_per_actor:g} CPUs but the cluster has {cpus:g}; lower them")
    return n, per_gpu


def build_memories_ray(cfg: PipelineConfig, jobs: dict, *, progress: bool = True) -> list[MemoryManifest]:
    """Build several memories (``{out_dir: pairs}``) with one actor pool; returns their manifests in order.

    Connects to Ray with :func:`init_ray` unless this process already is connected."""
    n_actors, gpus = actor_resources(cfg.memory, init_ray())
    tokenizer = _tokenizer(cfg.model.model_id, cfg.model.revision)
    builds = [_MemoryBuild(cfg, tokenizer, pairs, out_dir) for out_dir, pairs in jobs.items()]
    results: list[MemoryManifest | None] = [b.existing() for b in builds]
    todo = [b for b, r in zip(builds, results) if r is None]
    for b in todo:
        b.resume()
    items = [{"memory": m, "shard": i, "batches": b.payload(i)} for m, b in enumerate(todo) for i in b.pending()]
    if items:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _EncodeActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(n_actors, len(items))),
            num_gpus=gpus, num_cpus=cfg.memory.cpus_per_actor,
            fn_constructor_kwargs=dict(model_id=cfg.model.model_id, revision=cfg.model.revision,
                                       dtype=cfg.model.dtype, key_dtype=cfg.memory.dtype))
        ds.context.enable_progress_bars = False  # the row bar below replaces Ray Data's
        total = sum(sum(b.shard_rows) for b in todo)
        initial = sum(s["rows"] for b in todo for s in b.done.values())
        with tqdm(total=total, initial=initial, desc="build memory", unit="row", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for m, i in sorted(set(zip(batch["memory"].tolist(), batch["shard"].tolist()))):
                    sel = (batch["memory"] == m) & (batch["shard"] == i)
                    todo[m].add(i, {c: v[sel] for c, v in batch.items() if c not in ("memory", "shard")})
                bar.update(len(batch["token"]))
    for b in todo:
        if missing := b.pending():
            raise MemoryFormatError(f"shards {missing} of {b.out_dir} came back incomplete; rerun to resume")
    finished = [b.finish() for b in todo]
    return [r if r is not None else finished.pop(0) for r in results]


def build_memory_ray(cfg: PipelineConfig, pairs: Sequence[Pair], out_dir, *, progress: bool = True) -> MemoryManifest:
    """Teacher-forced memory of ``pairs`` in ``out_dir``, encoded by Ray Data actors (see the module docstring)."""
    return build_memories_ray(cfg, {Path(out_dir): pairs}, progress=progress)[0]


@ray.remote
def _export_head_files(model_id: str, revision: str | None, dtype: str, tok_hash: str) -> dict[str, bytes]:
    model, _ = load_plm(model_id, dtype=dtype, device="cuda" if ray.get_gpu_ids() else "cpu", revision=revision)
    with tempfile.TemporaryDirectory() as tmp:
        export_head(model, tmp, model_id=model_id, model_revision=revision, tokenizer_hash=tok_hash)
        return {name: (Path(tmp) / name).read_bytes() for name in os.listdir(tmp)}


def export_head_ray(cfg: PipelineConfig, out_dir, *, tokenizer_hash: str) -> dict:
    """Export the head bundle in a Ray task (on a GPU when the cluster has one); the driver writes the files."""
    out_dir = Path(out_dir)
    meta = _read_json(out_dir / "head.json")
    if isinstance(meta, dict) and (out_dir / "head.safetensors").is_file() and \
            (meta.get("model_id"), meta.get("model_revision"), meta.get("tokenizer_hash")) == \
            (cfg.model.model_id, cfg.model.revision, tokenizer_hash):
        return meta  # already exported for this PLM and tokenizer
    gpus = init_ray().get("GPU", 0)
    task = _export_head_files.options(num_gpus=1 if gpus else 0, num_cpus=cfg.memory.cpus_per_actor)
    files = ray.get(task.remote(cfg.model.model_id, cfg.model.revision, cfg.model.dtype, tokenizer_hash))
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in sorted(files, key=lambda n: n.endswith(".json")):  # metadata last
        (staging / name).write_bytes(files[name])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return json.loads(files["head.json"])


def stage_pairs(cfg: PipelineConfig) -> tuple[list[Pair], list[Pair]]:
    """The train and dev pairs of ``cfg.data`` (a missing or malformed file raises before anything is written)."""
    d = cfg.data
    fields = dict(source_field=d.source_field, target_field=d.target_field)
    return load_pairs(d.train, limit=d.train_limit, **fields), load_pairs(d.dev, limit=d.dev_limit, **fields)


def run_build_stage(cfg: PipelineConfig, output_dir, *, progress: bool = True,
                    pairs: tuple[list[Pair], list[Pair]] | None = None) -> dict:
    """PLM owner's stage: ``output_dir/memory/{train,dev}`` and ``output_dir/head``; returns counts and seconds.
    ``pairs``: the (train, dev) pairs when the caller has loaded them already (:func:`stage_pairs`)."""
    out = Path(output_dir)
    train_pairs, dev_pairs = pairs if pairs is not None else stage_pairs(cfg)
    start = time.perf_counter()
    train, dev = build_memories_ray(cfg, {out / "memory" / "train": train_pairs, out / "memory" / "dev": dev_pairs},
                                    progress=progress)
    built = time.perf_counter()
    export_head_ray(cfg, out / "head", tokenizer_hash=train.tokenizer_hash)
    return {"train_rows": train.total_rows, "dev_rows": dev.total_rows, "train_parts": len(train.parts),
            "dev_parts": len(dev.parts), "build_s": round(built - start, 2),
            "head_s": round(time.perf_counter() - built, 2)}
