"""The plan of one memory build and its staging folder: which shards, which rows each must hold, which parts are done,
and the manifest written last (:class:`MemoryBuild`). The encoding loop that feeds it is :mod:`pema.stages.build`;
a build that adds to or removes from a memory already there is :mod:`pema.stages.memory_versions`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from pema.config import PipelineConfig
from pema.errors import DataError, MemoryFormatError
from pema.formats.keys import KEY_DEFINITION
from pema.formats.layout import replace_dir, staging_dir
from pema.formats.memory import (MANIFEST_NAME, SCHEMA_VERSION, MemoryManifest, PartInfo, file_sha256, read_manifest,
                                 verify_memory, write_part)
from pema.formats.versions import WITHDRAWN, commit, pair_hash, withdrawn
from pema.formats.tasks import Pair, prompt_token_bound, resolve_template, stop_token_id, tokenizer_hash, \
    use_chat_template
from pema.owner.build import prepare_examples
from pema.owner.encode import EncodeExample, check_lengths, length_batches
from pema.stages.inputs import local_tokenizer

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


class MemoryBuild:
    """One memory: its plan, its staging folder and the rows received per pending shard. ``hashes``: each pair's
    content hash (:func:`~pema.formats.versions.pair_hash`); a pair repeated in ``pairs`` is built once.
    ``header``: the digest of everything but the pairs that makes the keys what they are (model, tokenizer,
    template, key definition and dtype, ``memory.keys``): a memory with the same header can be added to."""

    def __init__(self, cfg: PipelineConfig, tokenizer, pairs: Sequence[Pair], out_dir, *, origin: str = "build"):
        self.withdrawn = withdrawn(out_dir) if (Path(out_dir) / WITHDRAWN).is_file() else set()
        hashes = [pair_hash(p.source, p.target) for p in pairs]
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}  # the same pair twice is one example
        keep = sorted(i for h, i in first.items() if h not in self.withdrawn)  # withdrawn pairs never come back
        self.left_out = len(first) - len(keep)
        self.pairs, self.hashes, self.origin = [pairs[i] for i in keep], [hashes[i] for i in keep], origin
        pairs = self.pairs
        if not pairs:
            raise DataError(f"no pairs to build the memory {os.fspath(out_dir)} from; pass at least one pair")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise MemoryFormatError(f"memory folder {self.out_dir} exists and is not a directory")
        self.staging = staging_dir(self.out_dir)
        self.mem = cfg.memory
        template, chat = resolve_template(cfg.data.template), use_chat_template(tokenizer, cfg.model.prompt_format)
        examples, self.source_counts = prepare_examples(tokenizer, pairs, template=template,
                                                        source_field=cfg.data.source_field, chat=chat)
        self.source_tokens = sum(self.source_counts)
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
        self.header = hashlib.sha256(json.dumps({**header, "max_tokens": cfg.data.max_tokens},
                                                sort_keys=True).encode()).hexdigest()
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for e in examples:
            h.update(json.dumps([e.example, e.prompt_ids, e.target_ids]).encode() + b"\n")
        self.fingerprint = h.hexdigest()
        self.meta = dict(model_id=cfg.model.model_id, model_revision=cfg.model.revision,
                         tokenizer_hash=header["tokenizer"], template=template, key_definition=KEY_DEFINITION,
                         extra={"prompt_format": "chat" if chat else "raw", "source_field": cfg.data.source_field,
                                "stop_token_id": stop_token_id(tokenizer, chat=chat), "fingerprint": self.fingerprint,
                                "keys": cfg.memory.keys, "header": self.header})
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
        table = self.examples_table(version=1)
        replace_dir(self.out_dir, lambda staging: commit(staging, manifest, parts, table, reason="build",
                                                         added=self.hashes, deleted=[], carried=self.withdrawn),
                    verify_memory, fresh=False)  # a staging folder that fails verification stays for the rerun
        for name in [PLAN_NAME] + [s["file"] + SIDECAR_SUFFIX for s in sides]:
            (self.out_dir / name).unlink(missing_ok=True)
        return read_manifest(self.out_dir)

    def examples_table(self, version: int) -> dict[str, np.ndarray]:
        """This build's examples as rows of a memory's examples table (:mod:`pema.formats.versions`)."""
        n = len(self.pairs)
        return {"example": np.array([p.index for p in self.pairs], np.int64), "hash": np.array(self.hashes, object),
                "origin": np.array([self.origin] * n, object), "source_tokens": np.array(self.source_counts, np.int64),
                "version": np.full(n, version, np.int64)}




_MemoryBuild = MemoryBuild  # the name the tests know
