"""External memory on disk: a folder of Parquet parts plus ``manifest.json`` written last.

One row per target token; columns ``key`` (fixed_size_list<float16|float32>[d], or Arrow's
``arrow.fixed_shape_tensor`` extension with shape [d]), ``token`` int32, ``example`` int64,
``position`` int32.  Parts are ``part-00000.parquet``, ... and each is written atomically
(``<name>.tmp`` then ``os.replace``); their sha256 sums are recorded in the manifest.
Pure numpy + pyarrow: no torch / ray / mlflow here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pema.errors import MemoryFormatError, MemoryMismatchError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = ".verified.json"  # what verify_memory has hashed already (see there)
DTYPES = ("float16", "float32")
COLUMNS = ("key", "token", "example", "position")
_INT32 = np.iinfo(np.int32)
REBUILD = "rerun the memory build (pema build, same --output-dir): it rebuilds a damaged memory"


def _is_int(v, low: int) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low


@dataclass(frozen=True)
class PartInfo:
    file: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class MemoryManifest:
    schema_version: int
    model_id: str
    model_revision: str | None
    tokenizer_hash: str
    template: str
    key_definition: str
    d: int
    vocab_size: int
    dtype: str
    rows_per_part: int
    total_rows: int
    num_examples: int
    source_tokens: int
    parts: tuple[PartInfo, ...]
    extra: dict

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["parts"] = [dataclasses.asdict(p) for p in self.parts]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> MemoryManifest:
        if not isinstance(d, dict):
            raise MemoryFormatError(f"manifest must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - d.keys()), sorted(d.keys() - names)
        if missing or unknown:
            raise MemoryFormatError(f"manifest has missing keys {missing} / unknown keys {unknown}; "
                                    "rebuild the memory with this version of pema")
        if d["schema_version"] != SCHEMA_VERSION:
            raise MemoryFormatError(f"manifest schema_version={d['schema_version']!r} but this reader "
                                    f"supports {SCHEMA_VERSION}; rebuild the memory")
        for k in ("d", "vocab_size", "rows_per_part", "total_rows", "num_examples", "source_tokens"):
            if not _is_int(d[k], 0):
                raise MemoryFormatError(f"manifest field {k}={d[k]!r} is not a non-negative integer")
        if d["dtype"] not in DTYPES:
            raise MemoryFormatError(f"manifest dtype={d['dtype']!r} is not one of {DTYPES}")
        if not isinstance(d["extra"], dict) or not isinstance(d["parts"], list):
            raise MemoryFormatError("manifest 'extra' must be an object and 'parts' a list")
        parts = []
        for p in d["parts"]:
            if (not isinstance(p, dict) or set(p) != {"file", "rows", "sha256"} or not _is_int(p["rows"], 0)
                    or not isinstance(p["file"], str) or not p["file"] or os.path.basename(p["file"]) != p["file"]):
                raise MemoryFormatError(f"manifest part entry {p!r} needs exactly a bare file name, "
                                        "a non-negative rows count and a sha256; rebuild the memory")
            parts.append(PartInfo(file=p["file"], rows=p["rows"], sha256=str(p["sha256"])))
        if len({p.file for p in parts}) != len(parts):
            raise MemoryFormatError("manifest lists the same part file twice")
        return cls(**{**d, "parts": tuple(parts), "extra": dict(d["extra"])})

    @property
    def target_source_ratio(self) -> float:
        """Target tokens per source token over the whole memory (total_rows / source_tokens)."""
        if self.source_tokens == 0:
            raise MemoryFormatError("manifest has source_tokens=0, so the target/source length ratio "
                                    "is undefined; rebuild the memory passing the real source token count")
        return self.total_rows / self.source_tokens


def file_sha256(path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")


def _columns(key, token, example, position) -> tuple[np.ndarray, ...]:
    """Validate shapes: key (n, d); token, example, position (n,). Returns numpy arrays."""
    key, token, example, position = (np.asarray(x) for x in (key, token, example, position))
    if key.ndim != 2 or any(x.ndim != 1 or x.shape[0] != key.shape[0] for x in (token, example, position)):
        raise ValueError(f"expected key (n, d) and token/example/position (n,); got key {key.shape}, "
                         f"token {token.shape}, example {example.shape}, position {position.shape}")
    for name, x in (("token", token), ("example", example), ("position", position)):
        if x.size and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
    return key, token, example, position


def write_part(path: str | os.PathLike, *, key: np.ndarray, token, example, position, dtype: str) -> PartInfo:
    """Atomically write one part: key (n, d) -> fixed_size_list<dtype>[d]; token/example/position (n,)."""
    _check_dtype(dtype)
    key, token, example, position = _columns(key, token, example, position)
    for name, x in (("token", token), ("position", position)):
        if x.size and (x.min() < _INT32.min or x.max() > _INT32.max):
            raise ValueError(f"{name} values [{x.min()}, {x.max()}] do not fit in int32")
    n, d = key.shape
    flat = pa.array(np.ascontiguousarray(key, dtype=dtype).reshape(-1))
    table = pa.table({
        "key": pa.FixedSizeListArray.from_arrays(flat, d),
        "token": pa.array(token.astype(np.int32), pa.int32()),
        "example": pa.array(example.astype(np.int64), pa.int64()),
        "position": pa.array(position.astype(np.int32), pa.int32()),
    })
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        pq.write_table(table, tmp, use_dictionary=False)  # float keys do not dictionary-encode; 10x faster reads
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk: say which file (pyarrow's message does not)
            raise OSError(e.errno, f"cannot write {tmp} ({e}); the part was removed") from e
        raise
    return PartInfo(file=os.path.basename(path), rows=n, sha256=file_sha256(path))


def read_manifest(mem_dir) -> MemoryManifest:
    """The manifest of ``mem_dir``; MemoryFormatError naming the file when it is missing, not JSON or malformed."""
    path = os.path.join(os.fspath(mem_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise MemoryFormatError(f"no {MANIFEST_NAME} in {os.fspath(mem_dir)}: the memory build did not finish; "
                                f"{REBUILD}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise MemoryFormatError(f"{path} is not valid JSON ({e}); {REBUILD}") from e
    try:
        return MemoryManifest.from_dict(data)
    except MemoryFormatError as e:
        raise MemoryFormatError(f"{path}: {e}") from None


def _check_key_type(t: pa.DataType, m: MemoryManifest, where: str) -> None:
    storage = t.storage_type if isinstance(t, pa.BaseExtensionType) else t
    if (not pa.types.is_fixed_size_list(storage) or storage.list_size != m.d
            or storage.value_type != pa.from_numpy_dtype(np.dtype(m.dtype))):
        raise MemoryFormatError(f"{where}: key column has type {t} but the manifest says "
                                f"fixed_size_list<{m.dtype}>[{m.d}] (d={m.d}, dtype={m.dtype}); {REBUILD}")


def _stat_key(path: str) -> list[int]:
    """Size, mtime, ctime (``os.utime`` cannot set it back) and inode: one version of a file."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _verified(mem_dir: str) -> dict:
    try:
        with open(os.path.join(mem_dir, VERIFIED_NAME), encoding="utf-8") as f:
            stamp = json.load(f)
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verified(mem_dir: str, stamp: dict) -> None:
    path = os.path.join(mem_dir, VERIFIED_NAME)
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        os.replace(path + ".tmp", path)
    except OSError:  # a read-only memory (or a full disk) is verified every time, as before
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")


def verify_memory(mem_dir, *, checksums: bool = True) -> MemoryManifest:
    """Check every listed part exists, has the listed rows (and sha256), and rows sum to total_rows.

    A part's sha256 is computed once: ``.verified.json`` records, per part, the sha256 it matched with the file's
    size, modification and change times and inode (:func:`_stat_key`), and a later check with the same four skips
    the hashing (each Ray worker, each Tune trial and each stage opens the memory). Any change to a part file
    changes them (a truncation, bytes flipped in place even with the old mtime put back, a replaced file), and the
    part is hashed again. Every failure is a MemoryFormatError naming the file and what is wrong."""
    mem_dir = os.fspath(mem_dir)
    m = read_manifest(mem_dir)
    stamp, fresh = _verified(mem_dir) if checksums else {}, {}
    for p in m.parts:
        path = os.path.join(mem_dir, p.file)
        if not os.path.isfile(path):
            raise MemoryFormatError(f"part {path} listed in {os.path.join(mem_dir, MANIFEST_NAME)} is missing; "
                                    f"{REBUILD}")
        if checksums:
            key = [p.sha256, *_stat_key(path)]
            if stamp.get(p.file) != key:
                if (got := file_sha256(path)) != p.sha256:
                    raise MemoryFormatError(
                        f"part {path} fails its sha256 check: the file ({os.path.getsize(path)} bytes) hashes to "
                        f"{got[:12]}..., the manifest says {p.sha256[:12]}... (a truncated, damaged or replaced "
                        f"part, or an edited manifest); {REBUILD}")
            fresh[p.file] = key
        rows, schema = _parquet(path)
        if rows != p.rows:
            raise MemoryFormatError(f"part {path} has {rows} rows but the manifest says {p.rows}; {REBUILD}")
        if missing := [c for c in COLUMNS if c not in schema.names]:
            raise MemoryFormatError(f"part {path} lacks columns {missing}; {REBUILD}")
        _check_key_type(schema.field("key").type, m, f"part {path}")
    if (s := sum(p.rows for p in m.parts)) != m.total_rows:
        raise MemoryFormatError(f"parts in {mem_dir} hold {s} rows but total_rows={m.total_rows} in "
                                f"{os.path.join(mem_dir, MANIFEST_NAME)}; {REBUILD}")
    if checksums and fresh != stamp:
        _write_verified(mem_dir, fresh)
    return m


def _parquet(path: str, read=lambda pf: (pf.metadata.num_rows, pf.schema_arrow)):
    """``read(ParquetFile(path))``; MemoryFormatError naming the file when it is not readable Parquet."""
    if not os.path.isfile(path):
        raise MemoryFormatError(f"part {path} listed in the manifest is missing; {REBUILD}")
    try:
        return read(pq.ParquetFile(path))
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid on a truncated or damaged file
        raise MemoryFormatError(f"part {path} is not readable Parquet ({e}): truncated or damaged; {REBUILD}") from e


def _key_to_numpy(col: pa.ChunkedArray, d: int) -> np.ndarray:
    """fixed_size_list / fixed_shape_tensor column -> float32 (n, d) C-contiguous."""
    out = []
    for chunk in col.chunks:
        if isinstance(chunk, pa.ExtensionArray):
            chunk = chunk.storage
        out.append(chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, d))
    arr = out[0] if len(out) == 1 else (np.concatenate(out) if out else np.empty((0, d), np.float32))
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_part(path: str, manifest: MemoryManifest, info: PartInfo) -> dict[str, np.ndarray]:
    """Read one part: key float32 (n, d); token, example, position int64 (n,). A part that cannot be decoded (it
    changed since it was verified, or the reader was opened with ``verify=False``) is a MemoryFormatError naming
    it, and so is a token id outside the manifest's vocabulary."""
    table = _parquet(path, lambda pf: pf.read(columns=list(COLUMNS)))
    if table.num_rows != info.rows:
        raise MemoryFormatError(f"part {path} has {table.num_rows} rows but the manifest says {info.rows}; "
                                f"{REBUILD}")
    _check_key_type(table.schema.field("key").type, manifest, f"part {path}")
    if any(table.column(c).null_count for c in COLUMNS):
        raise MemoryFormatError(f"part {path} has null values; {REBUILD}")
    out = {"key": _key_to_numpy(table.column("key"), manifest.d)}
    for c in COLUMNS[1:]:
        out[c] = table.column(c).to_numpy().astype(np.int64)
    if out["token"].size and (out["token"].min() < 0 or out["token"].max() >= manifest.vocab_size):
        raise MemoryFormatError(f"part {path} holds token ids in [{out['token'].min()}, {out['token'].max()}] "
                                f"but the manifest says vocab_size={manifest.vocab_size}; {REBUILD}")
    return out


def _concat(chunks: list[dict[str, np.ndarray]], d: int) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return {"key": np.empty((0, d), np.float32), **{c: np.empty(0, np.int64) for c in COLUMNS[1:]}}
    return {c: np.concatenate([ch[c] for ch in chunks]) for c in COLUMNS}


class MemoryReader:
    """Streaming reader of a finished memory; batches are dicts of key (n, d) float32, others (n,) int64."""

    def __init__(self, mem_dir, *, verify: bool = True):
        self.mem_dir = os.fspath(mem_dir)
        self.manifest = verify_memory(self.mem_dir, checksums=True) if verify else read_manifest(self.mem_dir)

    def __len__(self) -> int:
        return self.manifest.total_rows

    def check_compatible(self, *, d: int, vocab_size: int, model_id: str | None = None) -> None:
        m = self.manifest
        checks = [("d", m.d, d), ("vocab_size", m.vocab_size, vocab_size)]
        if model_id is not None:
            checks.append(("model_id", m.model_id, model_id))
        for name, mine, theirs in checks:
            if mine != theirs:
                raise MemoryMismatchError(f"memory {self.mem_dir} has {name}={mine!r} but the head bundle has "
                                          f"{name}={theirs!r}; use a memory and head bundle built from the same PLM")

    def _load(self, info: PartInfo) -> dict[str, np.ndarray]:
        return _read_part(os.path.join(self.mem_dir, info.file), self.manifest, info)

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, buffer_parts: int = 2,
                     drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches of ``batch_size`` rows (the last may be shorter unless drop_last).

        At most ``buffer_parts`` parts are held at once (plus a carried remainder < batch_size rows).
        With shuffle, the part order and the rows of each group of parts are permuted by ``seed``.
        """
        for name, v in (("batch_size", batch_size), ("buffer_parts", buffer_parts)):
            if not _is_int(v, 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        parts = list(self.manifest.parts)
        rng = np.random.default_rng(seed)
        if shuffle:
            parts = [parts[i] for i in rng.permutation(len(parts))]
        carry: list[dict[str, np.ndarray]] = []
        for g in range(0, len(parts), buffer_parts):
            data = _concat(carry + [self._load(p) for p in parts[g:g + buffer_parts]], self.manifest.d)
            carry = []
            n = data["token"].shape[0]
            if shuffle:
                order = rng.permutation(n)
                data = {c: v[order] for c, v in data.items()}
            start = 0
            while n - start >= batch_size:
                yield {c: v[start:start + batch_size].copy() for c, v in data.items()}
                start += batch_size
            if start < n:
                carry = [{c: v[start:].copy() for c, v in data.items()}]
            data = None  # release the group before reading the next one
        if carry and not drop_last:
            yield carry[0]

    def read_all(self) -> dict[str, np.ndarray]:
        """Whole memory in manifest order: key (N, d) float32, token/example/position (N,) int64."""
        return _concat([self._load(p) for p in self.manifest.parts], self.manifest.d)

    def rows(self, start: int, stop: int) -> "MemorySlice":
        """Rows ``[start, stop)`` in manifest order, read from the overlapping parts only."""
        return MemorySlice(self, start, stop)


class MemorySlice:
    """A contiguous row range of a memory: a data-parallel worker's share. Offers the reader interface that
    :meth:`pema.adapter.resident.ResidentMemory.from_reader` needs (``len``, ``manifest``, ordered ``iter_batches``)."""

    def __init__(self, reader: MemoryReader, start: int, stop: int):
        if not (_is_int(start, 0) and _is_int(stop, 0) and start <= stop <= len(reader)):
            raise ValueError(f"row range [{start}, {stop}) is not inside the memory's {len(reader)} rows")
        self.reader, self.start, self.stop = reader, int(start), int(stop)
        self.manifest = reader.manifest

    def __len__(self) -> int:
        return self.stop - self.start

    def iter_batches(self, batch_size: int, *, shuffle: bool = False) -> Iterator[dict[str, np.ndarray]]:
        if shuffle:
            raise ValueError("a MemorySlice reads in stored order; shuffle after loading (ResidentMemory.batches)")
        if not _is_int(batch_size, 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        pending: list[dict[str, np.ndarray]] = []
        held, offset = 0, 0
        for info in self.manifest.parts:
            lo, hi = max(self.start, offset), min(self.stop, offset + info.rows)
            offset += info.rows
            if lo >= hi:
                continue
            part = self.reader._load(info)
            pending.append({c: v[lo - (offset - info.rows):hi - (offset - info.rows)] for c, v in part.items()})
            held += hi - lo
            while held >= batch_size:
                data = _concat(pending, self.manifest.d)
                yield {c: v[:batch_size] for c, v in data.items()}
                pending, held = [{c: v[batch_size:] for c, v in data.items()}], held - batch_size
        if held:
            yield _concat(pending, self.manifest.d)
