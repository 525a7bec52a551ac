"""The PLM owner's memory build, written once: a plan, shards encoded on an executor, parts written by the driver,
resumable. The inline executor encodes the shards here, one after another; the Ray executor
(:mod:`pema.executors.ray_build`) streams them through Ray Data actors, one per GPU.

Plan. The driver loads only the tokenizer, tokenizes the pairs as at inference (``prepare_examples``), groups them
with ``length_batches`` and cuts the run of batches into shards of at least ``rows_per_part`` rows (whole batches;
the last shard may be shorter). Shard i becomes ``part-{i:05d}.parquet``. The plan depends on the data, tokenizer
and config only, never on the number of actors, so parts, row order and keys do not change with the cluster.

Encode. Each pending shard (its token ids as JSON) goes to a :class:`ShardEncoder`, which loads the PLM once per
worker and runs :class:`~pema.owner.encode.MemoryEncoder` per length batch (``memory.keys=owner_greedy``: the
label-private :class:`~pema.owner.encode.FreeRunningEncoder`, whose rows get their gold tokens on this side). Rows
come back tagged with their shard; an executor may split or merge them (and rerun a failed task), so the driver
puts a shard's rows back in plan order (example, then position), drops duplicates, checks the rows are exactly the
shard's target tokens and writes the part with :func:`~pema.formats.memory.write_part` as soon as the shard is
complete.

Resume. Everything is staged in ``<out_dir>.partial/``: ``plan.json`` holds a fingerprint of the inputs and each
finished part gets a sidecar ``part-NNNNN.parquet.json`` (rows, sha256, d, vocab size) written after the part.
A rerun with the same fingerprint keeps the parts whose sha256 matches their sidecar and rebuilds the rest; another
fingerprint starts over. The manifest is written last, the staging folder is checked with
:func:`~pema.formats.memory.verify_memory` and moved into place. A memory already in ``out_dir`` with the same
fingerprint is returned without rebuilding.

The head bundle is exported by :func:`export_head_files` (a Ray task on a GPU when the cluster has one); the driver
writes the files (stage, verify, replace).
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
from safetensors.numpy import save as save_numpy
from tqdm.auto import tqdm

from pema.config import PipelineConfig
from pema.adapter.io import load_head
from pema.adapter.remote import OwnerClient
from pema.errors import DataError, MemoryFormatError, PemaError
from pema.formats.layout import RunLayout, replace_dir, staging_dir
from pema.formats.keys import KEY_DEFINITION, paired_with_gold
from pema.formats.memory import (MANIFEST_NAME, SCHEMA_VERSION, MemoryManifest, PartInfo, file_sha256, verify_memory,
                                 write_part)
from pema.formats.tasks import (Pair, prompt_token_bound, resolve_template, stop_token_id, tokenizer_hash,
                                 use_chat_template)
from pema.owner.build import prepare_examples
from pema.owner.encode import (EncodeExample, FreeRunningEncoder, FreeRunningRequest, MemoryEncoder, check_lengths,
                               length_batches)
from pema.owner.export import export_head
from pema.owner.plm import head_modules, load_plm
from pema.stages.inputs import cleaned_splits, local_tokenizer, owner_client, owner_token, tokenizer_of
from pema.stages.logger import MetricLogger, NullLogger

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


_tokenizer = local_tokenizer  # loaded once per process, shared with the check at the job's edge


def sequence_bound(cfg: PipelineConfig, tokenizer, template: str, chat: bool) -> int:
    """The longest teacher-forced sequence (prompt + target + stop - 1) of a pair within ``data.max_tokens``: the
    prompt's bound (:func:`~pema.formats.tasks.prompt_token_bound`) plus ``data.max_tokens``."""
    return prompt_token_bound(tokenizer, template, cfg.data.max_tokens, source_field=cfg.data.source_field,
                              chat=chat) + cfg.data.max_tokens


class _MemoryBuild:
    """One memory: its plan, its staging folder and the rows received per pending shard."""

    def __init__(self, cfg: PipelineConfig, tokenizer, pairs: Sequence[Pair], out_dir):
        if not pairs:
            raise DataError(f"no pairs to build the memory {os.fspath(out_dir)} from; pass at least one pair")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise MemoryFormatError(f"memory folder {self.out_dir} exists and is not a directory")
        self.staging = staging_dir(self.out_dir)
        self.mem = cfg.memory
        template, chat = resolve_template(cfg.data.template), use_chat_template(tokenizer, cfg.model.prompt_format)
        examples, self.source_tokens = prepare_examples(tokenizer, pairs, template=template,
                                                        source_field=cfg.data.source_field, chat=chat)
        self.max_length = sequence_bound(cfg, tokenizer, template, chat)
        check_lengths(examples, self.max_length, f" that data.max_tokens={cfg.data.max_tokens} allows, in "
                      f"{self.out_dir}")  # in the plan, before any shard is sent out
        self.num_examples = len(examples)
        self.shards = plan_shards(examples, cfg.memory.batch_tokens, cfg.memory.rows_per_part)
        self.shard_rows = [sum(len(e.target_ids) for batch in shard for e in batch) for shard in self.shards]
        header = dict(schema=SCHEMA_VERSION, key=KEY_DEFINITION, model_id=cfg.model.model_id,
                      revision=cfg.model.revision, model_dtype=cfg.model.dtype, tokenizer=tokenizer_hash(tokenizer),
                      template=template, chat=chat, source_field=cfg.data.source_field, dtype=cfg.memory.dtype,
                      batch_tokens=cfg.memory.batch_tokens, rows_per_part=cfg.memory.rows_per_part)
        if cfg.memory.keys != "teacher_forced":  # only then, so teacher-forced memories keep their fingerprint
            header["keys"] = cfg.memory.keys
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for e in examples:
            h.update(json.dumps([e.example, e.prompt_ids, e.target_ids]).encode() + b"\n")
        self.fingerprint = h.hexdigest()
        self.meta = dict(model_id=cfg.model.model_id, model_revision=cfg.model.revision,
                         tokenizer_hash=header["tokenizer"], template=template, key_definition=KEY_DEFINITION,
                         extra={"prompt_format": "chat" if chat else "raw", "source_field": cfg.data.source_field,
                                "stop_token_id": stop_token_id(tokenizer, chat=chat), "fingerprint": self.fingerprint,
                                "keys": cfg.memory.keys})
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
        replace_dir(self.out_dir, lambda staging: _write_json(staging / MANIFEST_NAME, manifest.to_dict()),
                    verify_memory, fresh=False)  # a staging folder that fails verification stays for the rerun
        for name in [PLAN_NAME] + [s["file"] + SIDECAR_SUFFIX for s in sides]:
            (self.out_dir / name).unlink(missing_ok=True)
        return manifest


class ShardEncoder:
    """Loads the PLM once; turns one shard (``{"memory", "shard", "batches"}``) into its memory rows, one length
    batch at a time, each row tagged with its memory, shard, d and vocabulary size. ``keys="owner_greedy"``: the
    PLM sees only the prompts and target lengths (:class:`~pema.owner.encode.FreeRunningEncoder`), and the gold
    tokens are filled in here, as the data owner does."""

    def __init__(self, model_id: str, revision: str | None, dtype: str, key_dtype: str, device: str,
                 max_length: int | None = None, keys: str = "teacher_forced"):
        model, tokenizer = load_plm(model_id, dtype=dtype, device=device, revision=revision)
        heads = head_modules(model)
        self.d, self.vocab_size = int(heads.norm.weight.shape[0]), int(heads.lm_head.weight.shape[0])
        encoder = FreeRunningEncoder if keys == "owner_greedy" else MemoryEncoder
        self.encoder = encoder(model, pad_id=tokenizer.pad_token_id or 0, key_dtype=key_dtype, max_length=max_length)

    def encode(self, examples: list[EncodeExample]) -> dict[str, np.ndarray]:
        if not isinstance(self.encoder, FreeRunningEncoder):
            return self.encoder(examples)
        rows = self.encoder([FreeRunningRequest(e.example, e.prompt_ids, len(e.target_ids)) for e in examples])
        return paired_with_gold(rows, examples)[0]  # the memory's values are the gold tokens, not the owner's

    def __call__(self, item: dict):
        for length_batch in json.loads(item["batches"]):
            rows = self.encode([EncodeExample(*e) for e in length_batch])
            n = len(rows["token"])
            tags = {"memory": item["memory"], "shard": item["shard"], "d": self.d, "vocab_size": self.vocab_size}
            yield {**rows, **{k: np.full(n, v, np.int64) for k, v in tags.items()}}


class RemoteShardEncoder:
    """The same rows from the PLM owner's service (``resources.owner_url``): each length batch is one ``/context``
    request, and no PLM weights are loaded in this process."""

    def __init__(self, url: str, token: str, key_dtype: str, device: str | None = None, keys: str = "teacher_forced"):
        self.client, self.key_dtype, self.keys = OwnerClient(url, token), key_dtype, keys

    def __call__(self, item: dict):
        for length_batch in json.loads(item["batches"]):
            rows = self.client.context([EncodeExample(*e) for e in length_batch], dtype=self.key_dtype,
                                       keys=self.keys)
            n = len(rows["token"])
            tags = {"memory": item["memory"], "shard": item["shard"], "d": rows.pop("d"),
                    "vocab_size": rows.pop("vocab_size")}
            yield {**rows, **{k: np.full(n, v, np.int64) for k, v in tags.items()}}


def shard_encoder(cfg: PipelineConfig, max_length: int | None = None):
    """``factory(device) -> encoder`` for this config (picklable, so a Ray actor can call it): the PLM in the
    worker, or the owner's service when ``resources.owner_url`` is set. ``max_length``: the longest teacher-forced
    sequence the worker encodes (:func:`sequence_bound`); ``memory.keys`` picks the mode for both."""
    if cfg.resources.owner_url:
        return functools.partial(RemoteShardEncoder, cfg.resources.owner_url, owner_token(cfg), cfg.memory.dtype,
                                 keys=cfg.memory.keys)
    return functools.partial(ShardEncoder, cfg.model.model_id, cfg.model.revision, cfg.model.dtype, cfg.memory.dtype,
                             max_length=max_length, keys=cfg.memory.keys)


def build_memories(cfg: PipelineConfig, jobs: dict, executor, *, progress: bool = True,
                   tokenizer=None) -> list[MemoryManifest]:
    """Build several memories (``{out_dir: pairs}``) in one pass of ``executor.encode``; returns their manifests in
    order (see the module docstring). ``tokenizer``: the model's, when the caller holds it already."""
    executor.check_encode(cfg)  # resources the cluster cannot give fail here, before anything is staged
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(cfg)
    builds = [_MemoryBuild(cfg, tokenizer, pairs, out_dir) for out_dir, pairs in jobs.items()]
    results: list[MemoryManifest | None] = [b.existing() for b in builds]
    todo = [b for b, r in zip(builds, results) if r is None]
    for b in todo:
        b.resume()
    items = [{"memory": m, "shard": i, "batches": b.payload(i)} for m, b in enumerate(todo) for i in b.pending()]
    if items:
        total = sum(sum(b.shard_rows) for b in todo)
        initial = sum(s["rows"] for b in todo for s in b.done.values())
        with tqdm(total=total, initial=initial, desc="build memory", unit="row", disable=not progress,
                  dynamic_ncols=True) as bar:
            arrived = encoded = 0
            for batch in executor.encode(shard_encoder(cfg, builds[0].max_length), items, cfg=cfg):
                if "encoded" in batch:  # the executor's count of rows encoded but not handed over yet
                    encoded = batch["encoded"]
                else:
                    for m, i in sorted(set(zip(batch["memory"].tolist(), batch["shard"].tolist()))):
                        sel = (batch["memory"] == m) & (batch["shard"] == i)
                        todo[m].add(i, {c: v[sel] for c, v in batch.items() if c not in ("memory", "shard")})
                    arrived += len(batch["token"])
                bar.update(min(total, initial + max(arrived, encoded)) - bar.n)  # a retried task counts twice
    for b in todo:
        if missing := b.pending():
            raise MemoryFormatError(f"shards {missing} of {b.out_dir} came back incomplete; rerun to resume")
    finished = [b.finish() for b in todo]
    return [r if r is not None else finished.pop(0) for r in results]


def build_memory(cfg: PipelineConfig, pairs: Sequence[Pair], out_dir, executor, *,
                 progress: bool = True) -> MemoryManifest:
    """The memory of ``pairs`` in ``out_dir``, keys as ``memory.keys`` says (see the module docstring)."""
    return build_memories(cfg, {Path(out_dir): pairs}, executor, progress=progress)[0]


def export_head_files(model_id: str, revision: str | None, dtype: str, tok_hash: str, device: str) -> dict[str, bytes]:
    """The head bundle's files (name -> bytes), exported from the PLM on ``device``."""
    model, _ = load_plm(model_id, dtype=dtype, device=device, revision=revision)
    with tempfile.TemporaryDirectory() as tmp:
        export_head(model, tmp, model_id=model_id, model_revision=revision, tokenizer_hash=tok_hash)
        return {name: (Path(tmp) / name).read_bytes() for name in os.listdir(tmp)}


def export_head_bundle(cfg: PipelineConfig, out_dir, executor, *, tokenizer_hash: str) -> dict:
    """The head bundle at ``out_dir``, exported by ``executor.call`` (a GPU task on Ray when the cluster has one)
    unless it is there, intact, for this PLM and tokenizer; the driver writes the files, metadata last."""
    out_dir = Path(out_dir)
    meta = _read_json(out_dir / "head.json")
    if isinstance(meta, dict) and (out_dir / "head.safetensors").is_file() and \
            (meta.get("model_id"), meta.get("model_revision"), meta.get("tokenizer_hash")) == \
            (cfg.model.model_id, cfg.model.revision, tokenizer_hash):
        try:
            load_head(out_dir)  # a truncated or edited bundle is exported again, not trusted for its JSON
            return meta
        except PemaError:
            pass
    if cfg.resources.owner_url:  # the bundle the owner's service hands out
        tensors, head_meta = owner_client(cfg).head()
        files = {"head.safetensors": save_numpy(tensors), "head.json": json.dumps(head_meta, indent=2).encode()}
    else:
        files = executor.call(export_head_files, cfg.model.model_id, cfg.model.revision, cfg.model.dtype,
                              tokenizer_hash, num_cpus=cfg.resources.cpus_per_actor,
                              gpu=cfg.resources.device.startswith("cuda"), device=cfg.resources.device)

    def fill(staging: Path) -> None:
        for name in sorted(files, key=lambda n: n.endswith(".json")):  # metadata last
            try:
                (staging / name).write_bytes(files[name])
            except OSError as e:  # a full disk: name the file (replace_dir removes the staging folder)
                raise OSError(e.errno, f"cannot write {staging / name} ({e.strerror})") from e

    replace_dir(out_dir, fill)
    return json.loads(files["head.json"])


def run_build(cfg: PipelineConfig, output_dir, executor, logger: MetricLogger | None = None, *,
              progress: bool = True) -> dict:
    """The PLM owner's stage: ``memory/{train,dev}`` and ``head/`` under ``output_dir``; logs row and part counts,
    seconds and rows/s and the manifests; returns the counts and seconds."""
    layout, logger = RunLayout(output_dir), logger or NullLogger()
    tokenizer = tokenizer_of(cfg)  # every text counted against data.max_tokens with it, then the plan
    kept, report = cleaned_splits(cfg, "dev", tokenizer=tokenizer)  # one read and one cleaning for both splits
    train_pairs, dev_pairs = kept["train"], kept["dev"]
    start = time.perf_counter()
    train, dev = build_memories(cfg, {layout.memory("train"): train_pairs, layout.memory("dev"): dev_pairs},
                                executor, progress=progress, tokenizer=tokenizer)
    built = time.perf_counter()
    export_head_bundle(cfg, layout.head, executor, tokenizer_hash=train.tokenizer_hash)
    info = {"train_rows": train.total_rows, "dev_rows": dev.total_rows, "train_parts": len(train.parts),
            "dev_parts": len(dev.parts), "build_s": round(built - start, 2),
            "head_s": round(time.perf_counter() - built, 2)}
    info["truncated"] = {s: report.truncated.get(s, 0) for s in ("train", "dev")}  # texts cut (data.overlength)
    logger.log_metrics({**{k: float(v) for k, v in info.items() if k != "truncated"},
                        **{f"truncated/{s}": float(n) for s, n in info["truncated"].items()},
                        "build_rows_per_s": (info["train_rows"] + info["dev_rows"]) / max(info["build_s"], 1e-9)})
    for split in ("train", "dev"):
        logger.log_artifact(layout.memory(split) / MANIFEST_NAME, f"memory/{split}")
    return info
