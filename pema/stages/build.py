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
import json
import os
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
from pema.errors import MemoryFormatError, PemaError
from pema.formats.layout import RunLayout, replace_dir
from pema.formats.keys import paired_with_gold
from pema.formats.memory import MANIFEST_NAME, MemoryManifest
from pema.formats.tasks import Pair
from pema.owner.encode import EncodeExample, FreeRunningEncoder, FreeRunningRequest, MemoryEncoder
from pema.owner.export import export_head
from pema.owner.plm import head_modules, load_plm
from pema.stages.build_plan import (PLAN_NAME, SIDECAR_SUFFIX, MemoryBuild, _MemoryBuild, _read_json,  # noqa: F401
                                    _tokenizer, plan_shards, sequence_bound)
from pema.stages.inputs import cleaned_splits, owner_client, owner_token, tokenizer_of
from pema.stages.logger import MetricLogger, NullLogger
from pema.stages.memory_versions import Increment, commit_increment, plan_append, plan_delete, plan_sync, summary

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
    order (see the module docstring). A memory already there with the same keys is brought to ``pairs`` as a new
    version, encoding only the pairs it lacks (:func:`~pema.stages.memory_versions.plan_sync`).
    ``tokenizer``: the model's, when the caller holds it already."""
    executor.check_encode(cfg)  # resources the cluster cannot give fail here, before anything is staged
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(cfg)
    builds = [MemoryBuild(cfg, tokenizer, pairs, out_dir) for out_dir, pairs in jobs.items()]
    results: list[MemoryManifest | None] = [b.existing() for b in builds]
    syncs = {i: plan_sync(cfg, tokenizer, b) for i, b in enumerate(builds) if results[i] is None}
    # a sub-build that a run killed before its commit had finished is committed, not encoded again
    todo = [builds[i] if inc is None else inc.sub for i, inc in syncs.items()
            if inc is None or (inc.sub is not None and inc.sub.existing() is None)]
    built = dict(zip(map(id, todo), encode_builds(cfg, todo, executor, progress=progress)))
    for i, inc in syncs.items():
        if inc is None:
            results[i] = built[id(builds[i])]
        else:
            results[i] = commit_increment(inc)
            if progress and (inc.changes or inc.left_out):
                tqdm.write(version_line(inc, results[i]))
    return results


def version_line(inc: Increment, manifest: MemoryManifest) -> str:
    s = summary(inc, manifest)
    return (f"[memory] {s['memory']}: version {s['version']} (from {s['parent']}): {s['added']} pairs encoded and "
            f"added, {s['deleted']} removed, {s['already_present']} already there, {s['withdrawn_left_out']} "
            f"withdrawn left out; {s['rows']:,} rows")


def encode_builds(cfg: PipelineConfig, todo: list[MemoryBuild], executor, *,
                  progress: bool = True) -> list[MemoryManifest]:
    """Encode the pending shards of ``todo`` (builds whose memory is not there yet) in one pass of
    ``executor.encode``, each resuming its staged parts, then finish each: their manifests, in order."""
    for b in todo:
        b.resume()
    items = [{"memory": m, "shard": i, "batches": b.payload(i)} for m, b in enumerate(todo) for i in b.pending()]
    if items:
        total = sum(sum(b.shard_rows) for b in todo)
        initial = sum(s["rows"] for b in todo for s in b.done.values())
        with tqdm(total=total, initial=initial, desc="build memory", unit="row", disable=not progress,
                  dynamic_ncols=True) as bar:
            arrived = encoded = 0
            for batch in executor.encode(shard_encoder(cfg, todo[0].max_length), items, cfg=cfg):
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
    return [b.finish() for b in todo]


def append_memory(cfg: PipelineConfig, out_dir, pairs: Sequence[Pair], executor, *, progress: bool = True,
                  tokenizer=None) -> dict:
    """Add the pairs the memory at ``out_dir`` lacks, encoding only them, as a new version; returns
    :func:`~pema.stages.memory_versions.summary`."""
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(cfg)
    inc = plan_append(cfg, tokenizer, out_dir, list(pairs))
    if inc.sub is not None and inc.sub.existing() is None:  # not already built by a run killed before its commit
        executor.check_encode(cfg)
        encode_builds(cfg, [inc.sub], executor, progress=progress)
    return summary(inc, commit_increment(inc))


def delete_from_memory(out_dir, hashes: set[str]) -> dict:
    """Withdraw the pairs ``hashes`` from the memory at ``out_dir`` (a new version; their rows, old parts and
    stored neighbours are gone at once); returns :func:`~pema.stages.memory_versions.summary`."""
    inc = plan_delete(out_dir, hashes)
    return summary(inc, commit_increment(inc))


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
