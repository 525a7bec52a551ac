"""Adding to and removing from a memory that is already built, each as a new version (:mod:`pema.formats.versions`).

- **A build of a changed data file** (:func:`plan_sync`): the memory becomes the file's pairs, without encoding
  again what it holds. The pairs it lacks are encoded (only them: a :class:`~pema.stages.build_plan.MemoryBuild`
  of those pairs in ``<memory>.v<N>/``, resumable like any build), the rows of the build's pairs that the file no
  longer has are dropped, and pairs added with ``pema memory append`` or withdrawn with ``pema memory delete``
  stay as they are (a withdrawn pair is not put back; the build says how many it left out).
- **Append** (:func:`plan_append`): the pairs the memory lacks, as examples of origin ``append``.
- **Delete** (:func:`plan_delete`): every row of the given pairs, from a new version whose touched parts are
  rewritten; the old parts holding the rows, the stored neighbours and the pairs' ids go at once
  (:func:`~pema.formats.versions.purge`), and the hashes are kept as withdrawn.

A plan is an :class:`Increment`; the executor encodes ``increment.sub`` like any other build, and
:func:`commit_increment` then makes the version. A memory that cannot be added to (none, damaged, built before
versions, or with other keys: another model, tokenizer, template, key dtype or ``memory.keys``) is built whole.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from pema.errors import DataError
from pema.formats.layout import staging_dir
from pema.formats.memory import MANIFEST_NAME, MemoryManifest, PartInfo, read_manifest, verify_memory
from pema.formats.tasks import Pair
from pema.formats.versions import (commit, pair_hash, part_name, parts_without, purge, read_examples, version_of,
                                   withdrawn)
from pema.errors import MemoryFormatError
from pema.stages.build_plan import MemoryBuild


@dataclasses.dataclass
class Increment:
    """One new version of the memory at ``out_dir``: encode ``sub`` (None: nothing to add), drop the examples
    ``drop`` (ids), then :func:`commit_increment`."""

    out_dir: Path
    manifest: MemoryManifest
    table: dict
    sub: MemoryBuild | None
    drop: np.ndarray
    reason: str
    withdraw: bool = False
    left_out: int = 0  # withdrawn pairs asked for again and not put back
    present: int = 0  # pairs asked for that the memory holds already
    fingerprint: str | None = None  # the full build's, when this makes the memory equal to a data file

    @property
    def changes(self) -> bool:
        return self.sub is not None or len(self.drop) > 0

    @property
    def dropped_hashes(self) -> list[str]:
        """The ids of the examples this version removes."""
        return self.table["hash"][np.isin(self.table["example"], self.drop)].tolist()


def _current(out_dir: Path) -> tuple[MemoryManifest, dict] | None:
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = verify_memory(out_dir)
        table = read_examples(out_dir, manifest)
    except MemoryFormatError:
        return None
    return None if table is None else (manifest, table)


def _lacking(cfg, tokenizer, out_dir: Path, manifest, table, pairs, origin: str, hashes=None):
    """The pairs the memory lacks (renumbered after its last example), as a build in ``<memory>.v<N>``, with the
    counts of pairs already there and of withdrawn ones left out. ``hashes``: the pairs' ids, when known."""
    have, gone = set(table["hash"].tolist()), withdrawn(out_dir)
    new, seen, present, left_out = [], set(), 0, 0
    for p, h in zip(pairs, hashes or [pair_hash(p.source, p.target) for p in pairs]):
        if h in have or h in seen:
            present += h in have
            continue
        if h in gone:
            left_out += 1
            continue
        seen.add(h)
        new.append(p)
    if not new:
        return None, present, left_out
    first = int(table["example"].max()) + 1 if len(table["example"]) else 0
    sub_dir = out_dir.with_name(f"{out_dir.name}.v{version_of(manifest) + 1:05d}")
    sub = MemoryBuild(cfg, tokenizer, [Pair(first + i, p.source, p.target) for i, p in enumerate(new)], sub_dir,
                      origin=origin)
    if sub.header != manifest.extra.get("header"):
        raise DataError(f"the memory {out_dir} was built with other keys (model, tokenizer, template, key dtype or "
                        "memory.keys) than this config makes: append with the config it was built with")
    return sub, present, left_out


def plan_sync(cfg, tokenizer, build: MemoryBuild) -> Increment | None:
    """The memory of ``build.out_dir`` made equal to ``build``'s pairs (plus appended, less withdrawn ones), or
    None when it must be built whole."""
    found = _current(build.out_dir)
    if found is None or found[0].extra.get("header") != build.header:
        return None
    manifest, table = found
    sub, present, left_out = _lacking(cfg, tokenizer, build.out_dir, manifest, table, build.pairs, "build",
                                      build.hashes)
    gone = (table["origin"] == "build") & ~np.isin(table["hash"], np.array(build.hashes, object))
    return Increment(build.out_dir, manifest, table, sub, table["example"][gone], "build: the data file changed",
                     left_out=left_out + build.left_out, present=present, fingerprint=build.fingerprint)


def _versioned(out_dir: Path, what: str) -> tuple[MemoryManifest, dict]:
    if (found := _current(out_dir)) is None:
        raise DataError(f"{out_dir} holds no versioned memory to {what}: build it first (pema build); a memory that "
                        "is damaged or was built before versions is built again by pema build")
    return found


def plan_append(cfg, tokenizer, out_dir, pairs: list[Pair]) -> Increment:
    out_dir = Path(out_dir)
    manifest, table = _versioned(out_dir, "append to")
    sub, present, left_out = _lacking(cfg, tokenizer, out_dir, manifest, table, pairs, "append")
    return Increment(out_dir, manifest, table, sub, np.empty(0, np.int64), "append", left_out=left_out,
                     present=present)


def plan_delete(out_dir, hashes: set[str]) -> Increment:
    """Withdraw the pairs ``hashes`` (full sha256 hex ids) from the memory at ``out_dir``."""
    out_dir = Path(out_dir)
    manifest, table = _versioned(out_dir, "delete from")
    hit = np.isin(table["hash"], np.array(sorted(hashes), object))
    return Increment(out_dir, manifest, table, None, table["example"][hit], "delete: pairs withdrawn",
                     withdraw=True, present=int(hit.sum()))


def commit_increment(inc: Increment) -> MemoryManifest:
    """Make the version ``inc`` plans (``inc.sub`` is built by now); returns the new manifest."""
    if not inc.changes:
        return inc.manifest
    mem, version = inc.out_dir, version_of(inc.manifest) + 1
    parts, touched = (parts_without(mem, inc.manifest, inc.drop, version) if len(inc.drop)
                      else (list(inc.manifest.parts), []))
    keep = ~np.isin(inc.table["example"], inc.drop)
    table = {c: v[keep] for c, v in inc.table.items()}
    added: list[str] = []
    if inc.sub is not None:
        sub = read_manifest(inc.sub.out_dir)
        if (sub.d, sub.vocab_size, sub.dtype) != (inc.manifest.d, inc.manifest.vocab_size, inc.manifest.dtype):
            raise MemoryFormatError(f"the new rows in {inc.sub.out_dir} (d={sub.d}, vocab {sub.vocab_size}, "
                                    f"{sub.dtype}) do not fit the memory {mem}")
        for i, p in enumerate(sub.parts):
            name = part_name(version, i)
            (mem / name).unlink(missing_ok=True)  # a commit killed before its manifest left it
            os.link(inc.sub.out_dir / p.file, mem / name)
            parts.append(PartInfo(file=name, rows=p.rows, sha256=p.sha256))
        new = inc.sub.examples_table(version)
        table = {c: np.concatenate([table[c], new[c]]) for c in table}
        added = inc.sub.hashes
    deleted = inc.dropped_hashes
    extra = dict(inc.manifest.extra, **({"fingerprint": inc.fingerprint} if inc.fingerprint else {}))
    manifest = commit(mem, dataclasses.replace(inc.manifest, extra=extra), tuple(parts), table, reason=inc.reason,
                      added=added, deleted=deleted, withdraw=inc.withdraw)
    if inc.withdraw:
        purge(mem, touched, set(deleted), keep=manifest.extra["examples"])
    if inc.sub is not None:
        shutil.rmtree(inc.sub.out_dir, ignore_errors=True)
        shutil.rmtree(staging_dir(inc.sub.out_dir), ignore_errors=True)
    verify_memory(mem)
    return manifest


def summary(inc: Increment, manifest: MemoryManifest) -> dict:
    """What a version did, for the console and the job's result."""
    return {"memory": str(inc.out_dir), "version": version_of(manifest), "parent": version_of(inc.manifest),
            "added": len(inc.sub.pairs) if inc.sub is not None else 0, "deleted": int(len(inc.drop)),
            "already_present": inc.present, "withdrawn_left_out": inc.left_out, "rows": manifest.total_rows,
            "examples": manifest.num_examples,
            "deleted_ids": inc.dropped_hashes}
