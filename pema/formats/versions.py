"""Versions of a memory: which examples it holds, what each version changed, and the deletions that must stay done.

A memory folder (:mod:`pema.formats.memory`) holds, beside its parts and ``manifest.json``:

- ``examples-v00003.parquet``: one row per example of version 3: ``example`` (the id in the parts' ``example``
  column), ``hash`` (:func:`pair_hash`, the content hash of the pair: the same pair sent twice is one example),
  ``origin`` (``build``: from the build's data file; ``append``: added by ``pema memory append``),
  ``source_tokens`` and ``version`` (the version that added it).
- ``versions/v00003.json``: what version 3 changed: its parent, when, why, the added and deleted example hashes,
  its parts and its examples file (with their sha256).
- ``withdrawn.json``: the hashes of the pairs deleted by ``pema memory delete`` (consent withdrawn, a wrong
  licence), kept for good: no later build or append puts them back.

The manifest of a versioned memory names its version, parent and examples file in ``extra`` (``version``,
``parent``, ``examples``, ``examples_sha256``); a memory without them is version 0 (built before versions). A new
version is committed by :func:`commit`: the examples file and the record first, ``manifest.json`` last (one
rename), so a commit killed at any instant leaves the old version or the new one. Parts are never edited: a version
that drops rows writes new parts (``part-v00004-r00002.parquet``); those of older versions stay for them until
:func:`collect_garbage`, except a withdrawal's, which are removed at once (:func:`purge`).
Pure numpy + pyarrow + json: no torch, Ray or MLflow.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pema.errors import MemoryFormatError
from pema.formats.layout import write_text_atomic
from pema.formats.memory import MANIFEST_NAME, MemoryManifest, PartInfo, file_sha256, read_manifest

VERSIONS, WITHDRAWN = "versions", "withdrawn.json"
EXAMPLE_COLUMNS = ("example", "hash", "origin", "source_tokens", "version")
ORIGINS = ("build", "append")


def pair_hash(source: str, target: str) -> str:
    """The id of a pair: sha256 of its two texts as the build kept them (JSON-encoded, so no separator is
    ambiguous)."""
    return hashlib.sha256(json.dumps([source, target], ensure_ascii=False).encode("utf-8")).hexdigest()


def version_of(manifest: MemoryManifest) -> int:
    v = manifest.extra.get("version", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def examples_name(version: int) -> str:
    return f"examples-v{version:05d}.parquet"


def part_name(version: int, i: int, *, rewritten: bool = False) -> str:
    return f"part-v{version:05d}-{'r' if rewritten else ''}{i:05d}.parquet"


def record_path(mem_dir, version: int) -> Path:
    return Path(mem_dir) / VERSIONS / f"v{version:05d}.json"


def empty_examples() -> dict[str, np.ndarray]:
    return {"example": np.empty(0, np.int64), "hash": np.empty(0, object), "origin": np.empty(0, object),
            "source_tokens": np.empty(0, np.int64), "version": np.empty(0, np.int64)}


def _write_examples(path: Path, table: dict[str, np.ndarray]) -> str:
    arrow = pa.table({"example": pa.array(table["example"], pa.int64()), "hash": pa.array(table["hash"], pa.string()),
                      "origin": pa.array(table["origin"], pa.string()),
                      "source_tokens": pa.array(table["source_tokens"], pa.int64()),
                      "version": pa.array(table["version"], pa.int32())})
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(arrow, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(path)


def read_examples(mem_dir, manifest: MemoryManifest | None = None) -> dict[str, np.ndarray] | None:
    """The examples table of the memory's current version (numpy columns), or None for a version-0 memory;
    MemoryFormatError naming the file when it is missing, altered or malformed."""
    manifest = manifest or read_manifest(mem_dir)
    name = manifest.extra.get("examples")
    if version_of(manifest) == 0 or not isinstance(name, str):
        return None
    path = Path(mem_dir) / name
    if not path.is_file() or file_sha256(path) != manifest.extra.get("examples_sha256"):
        raise MemoryFormatError(f"{path}, the examples of version {version_of(manifest)} of {mem_dir}, is missing "
                                "or does not match its sha256 in the manifest; rebuild the memory")
    try:
        t = pq.read_table(path)
        out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in EXAMPLE_COLUMNS}
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise MemoryFormatError(f"{path} is not a readable examples table ({exc}); rebuild the memory") from None
    for c in ("example", "source_tokens", "version"):
        out[c] = out[c].astype(np.int64)
    return out


def withdrawn(mem_dir) -> set[str]:
    """The pairs withdrawn from the memory at ``mem_dir`` for good (``withdrawn.json``); none when it has none."""
    path = Path(mem_dir) / WITHDRAWN
    if not path.is_file():
        return set()
    try:
        return set(json.loads(path.read_text(encoding="utf-8"))["hashes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MemoryFormatError(f"{path} is unreadable ({exc}); it lists the withdrawn pairs, restore it") from None


def commit(mem_dir, base: MemoryManifest, parts: tuple[PartInfo, ...], table: dict[str, np.ndarray], *,
           reason: str, added: list[str], deleted: list[str], withdraw: bool = False,
           carried: set[str] = frozenset()) -> MemoryManifest:
    """Make the next version of the memory at ``mem_dir``: ``parts`` (already in the folder) hold exactly the rows
    of the examples in ``table``. Writes the examples file, the record and the withdrawn hashes (``deleted`` with
    ``withdraw``, and ``carried``: those of a memory this one is built over), then ``manifest.json``; returns
    the new manifest."""
    mem_dir = Path(mem_dir)
    parent = version_of(base) if (mem_dir / MANIFEST_NAME).is_file() else 0
    version = parent + 1
    name = examples_name(version)
    sha = _write_examples(mem_dir / name, table)
    manifest = dataclasses.replace(
        base, parts=tuple(parts), total_rows=sum(p.rows for p in parts), num_examples=len(table["hash"]),
        source_tokens=int(table["source_tokens"].sum()),
        extra={**base.extra, "version": version, "parent": parent, "examples": name, "examples_sha256": sha})
    record = {"version": version, "parent": parent, "reason": reason,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "added": sorted(added), "deleted": sorted(deleted), "total_rows": manifest.total_rows,
              "num_examples": manifest.num_examples, "parts": [p.file for p in parts],
              "examples": name, "examples_sha256": sha}
    record_path(mem_dir, version).parent.mkdir(exist_ok=True)
    write_text_atomic(record_path(mem_dir, version), json.dumps(record, indent=1))
    gone = set(carried) | (set(deleted) if withdraw else set())
    if gone:
        hashes = sorted(withdrawn(mem_dir) | gone)
        write_text_atomic(mem_dir / WITHDRAWN, json.dumps({"hashes": hashes}))
    write_text_atomic(mem_dir / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return manifest


def parts_without(mem_dir, manifest: MemoryManifest, drop: np.ndarray, version: int) -> tuple[list, list[str]]:
    """Parts of ``manifest`` with the rows of the examples ``drop`` removed: the new part list (untouched parts as
    they are, each touched part rewritten as a new file of ``version``, an emptied one left out) and the files of
    the touched parts, which the new version no longer reads."""
    drop_arr, out, touched = pa.array(np.asarray(drop, np.int64)), [], []
    for i, info in enumerate(manifest.parts):
        path = Path(mem_dir) / info.file
        examples = pq.read_table(path, columns=["example"]).column("example")
        if not pc.any(pc.is_in(examples, value_set=drop_arr)).as_py():
            out.append(info)
            continue
        touched.append(info.file)
        table = pq.read_table(path)
        kept = table.filter(pc.invert(pc.is_in(table.column("example"), value_set=drop_arr)))
        if kept.num_rows == 0:
            continue
        new = Path(mem_dir) / part_name(version, i, rewritten=True)
        tmp = new.with_name(new.name + ".tmp")
        pq.write_table(kept, tmp, use_dictionary=False)
        os.replace(tmp, new)
        out.append(PartInfo(file=new.name, rows=kept.num_rows, sha256=file_sha256(new)))
    return out, touched


def list_versions(mem_dir) -> list[dict]:
    """Every recorded version of the memory, oldest first, each with ``status``: ``current``, ``kept`` (its files
    are all there) or ``removed`` (some were purged by a withdrawal or collected)."""
    mem_dir = Path(mem_dir)
    current = version_of(read_manifest(mem_dir))
    out = []
    for path in sorted((mem_dir / VERSIONS).glob("v*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MemoryFormatError(f"{path} is unreadable ({exc})") from None
        files = [*rec.get("parts", []), rec.get("examples", "")]
        whole = all((mem_dir / f).is_file() for f in files)
        status = "current" if rec.get("version") == current else ("kept" if whole else "removed")
        out.append({**rec, "status": status})
    return out


def purge(mem_dir, files: list[str], hashes: set[str], keep: str) -> None:
    """A withdrawal's clean-up: remove ``files`` (the old parts that held the rows) now, every older examples table
    that lists one of ``hashes`` (``keep``: the current one), and the stored neighbours, which may name the rows."""
    mem_dir = Path(mem_dir)
    for path in sorted(mem_dir.glob("examples-v*.parquet")):
        if path.name != keep and hashes & set(pq.read_table(path, columns=["hash"]).column("hash").to_pylist()):
            files = [*files, path.name]
    for name in [*files, "neighbours.safetensors", "neighbours.json", ".verified.json"]:
        (mem_dir / name).unlink(missing_ok=True)


def collect_garbage(mem_dir, keep: set[int]) -> dict:
    """Remove the versions that are neither current nor in ``keep`` (the versions registered models use): their
    records, and every part or examples file that no remaining version reads. Returns what went."""
    mem_dir = Path(mem_dir)
    versions, manifest = list_versions(mem_dir), read_manifest(mem_dir)
    stay = [v for v in versions if v["status"] == "current" or v["version"] in keep]
    go = [v for v in versions if v not in stay]
    needed = {f for v in stay for f in [*v["parts"], v["examples"]]} | {p.file for p in manifest.parts}
    files = sorted(f.name for f in mem_dir.iterdir() if f.is_file() and f.suffix == ".parquet" and f.name not in needed)
    freed = sum((mem_dir / f).stat().st_size for f in files)
    for f in files:
        (mem_dir / f).unlink()
    for v in go:
        record_path(mem_dir, v["version"]).unlink(missing_ok=True)
    return {"versions": [v["version"] for v in go], "files": files, "bytes": freed}


def memory_info(mem_dir) -> dict:
    """Which memory and version: ``{"path", "version", "manifest_sha256", "rows"}`` (the lineage a trained adapter,
    an MLflow run and a registered model version carry)."""
    manifest = read_manifest(mem_dir)
    return {"path": str(Path(mem_dir).resolve()), "version": version_of(manifest), "rows": manifest.total_rows,
            "manifest_sha256": file_sha256(Path(mem_dir) / MANIFEST_NAME)}
