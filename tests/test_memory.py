"""Tests of pema.formats.memory: on-disk external memory (Parquet parts + manifest.json)."""

import json
import os
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pema.formats import memory as mem
from pema.errors import MemoryFormatError, MemoryMismatchError
from pema.formats.memory import MemoryManifest, MemoryReader, read_manifest, verify_memory, write_part
from pema.formats.memory_writer import MemoryWriter

D, V = 6, 50
META = dict(model_id="org/model", model_revision="abc123", tokenizer_hash="tok#1", template="chat-v1",
            key_definition="final_norm(h_L) at the position predicting token")


def make_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return dict(key=rng.uniform(-4, 4, size=(n, D)).astype(np.float32),
                token=rng.integers(0, V, size=n), example=np.arange(n) // 4, position=np.arange(n) % 4)


def build(path, n=45, rows_per_part=7, dtype="float16", chunk=5, **kw):
    rows = make_rows(n)
    with MemoryWriter(path, d=D, vocab_size=V, dtype=dtype, rows_per_part=rows_per_part,
                      extra={"stop_token_id": 2}, **META, **kw) as w:
        for s in range(0, n, chunk):  # uneven chunks so parts straddle add() calls
            w.add(**{k: v[s:s + chunk] for k, v in rows.items()})
        manifest = w.close(num_examples=int(rows["example"].max()) + 1, source_tokens=90)
    return rows, manifest


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_write_read_roundtrip(tmp_path, dtype):
    rows, m = build(tmp_path / "m", dtype=dtype)
    assert [p.rows for p in m.parts] == [7] * 6 + [3]
    assert [p.file for p in m.parts] == [f"part-{i:05d}.parquet" for i in range(7)]
    assert m.total_rows == 45 and m.num_examples == 12 and m.source_tokens == 90
    assert m.target_source_ratio == pytest.approx(0.5)
    assert (m.d, m.vocab_size, m.dtype, m.rows_per_part, m.extra) == (D, V, dtype, 7, {"stop_token_id": 2})
    assert sorted(os.listdir(tmp_path / "m")) == sorted([p.file for p in m.parts] + ["manifest.json"])
    assert read_manifest(tmp_path / "m") == m
    assert MemoryManifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    r = MemoryReader(tmp_path / "m")
    assert len(r) == 45
    out = r.read_all()
    assert out["key"].dtype == np.float32 and out["key"].shape == (45, D) and out["key"].flags.c_contiguous
    if dtype == "float16":  # float16 keeps 11 significant bits: error <= 2**-9 for |x| <= 4
        np.testing.assert_allclose(out["key"], rows["key"], rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(out["key"], rows["key"])
    for c in ("token", "example", "position"):
        assert out[c].dtype == np.int64
        np.testing.assert_array_equal(out[c], rows[c])


def test_manifest_from_dict_rejects_bad_keys_and_version(tmp_path):
    _, m = build(tmp_path / "m")
    d = m.to_dict()
    with pytest.raises(MemoryFormatError, match="missing keys"):
        MemoryManifest.from_dict({k: v for k, v in d.items() if k != "d"})
    with pytest.raises(MemoryFormatError, match="unknown keys"):
        MemoryManifest.from_dict({**d, "bogus": 1})
    with pytest.raises(MemoryFormatError, match="schema_version=99"):
        MemoryManifest.from_dict({**d, "schema_version": 99})
    with pytest.raises(MemoryFormatError, match="source_tokens=0"):
        MemoryManifest.from_dict({**d, "source_tokens": 0}).target_source_ratio


def test_iter_batches_order_shuffle_and_sizes(tmp_path):
    rows, _ = build(tmp_path / "m", dtype="float32")
    r = MemoryReader(tmp_path / "m")
    batches = list(r.iter_batches(8))
    assert [len(b["token"]) for b in batches] == [8] * 5 + [5]
    plain = {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}
    np.testing.assert_array_equal(plain["key"], rows["key"])
    np.testing.assert_array_equal(plain["token"], rows["token"])
    assert all(b["key"].flags.c_contiguous and b["key"].dtype == np.float32 for b in batches)
    # (example, position) identifies a row uniquely here
    ids = lambda bs: np.concatenate([b["example"] * 4 + b["position"] for b in bs])  # noqa: E731
    shuf = list(r.iter_batches(8, shuffle=True, seed=3, buffer_parts=2))
    assert [len(b["token"]) for b in shuf] == [8] * 5 + [5]
    s = ids(shuf)
    assert sorted(s.tolist()) == list(range(45)) and not np.array_equal(s, np.arange(45))
    np.testing.assert_array_equal(s, ids(r.iter_batches(8, shuffle=True, seed=3, buffer_parts=2)))
    assert not np.array_equal(s, ids(r.iter_batches(8, shuffle=True, seed=4, buffer_parts=2)))
    # the key/token columns stay aligned with their ids after shuffling
    sk = np.concatenate([b["key"] for b in shuf])
    np.testing.assert_array_equal(sk, rows["key"][s])
    assert [len(b["token"]) for b in r.iter_batches(8, drop_last=True)] == [8] * 5


def test_iter_batches_streams_parts_lazily(tmp_path, monkeypatch):
    build(tmp_path / "m", dtype="float32")  # 7 parts: 6 x 7 rows + 3
    real = mem._read_part
    state = {"reads": 0, "live": 0, "max_live": 0}

    def dead():
        state["live"] -= 1

    def counting(*a, **k):
        out = real(*a, **k)
        state["reads"] += 1
        state["live"] += 1
        state["max_live"] = max(state["max_live"], state["live"])
        weakref.finalize(out["key"], dead)  # fires when the reader drops this part's arrays
        return out

    monkeypatch.setattr(mem, "_read_part", counting)
    r = MemoryReader(tmp_path / "m")
    it = r.iter_batches(5, buffer_parts=1)
    reads_seen = []
    for b in it:
        reads_seen.append(state["reads"])
    # batch i ends at row 5(i+1): the reader must have opened exactly the parts covering that prefix
    assert reads_seen == [min(7, -(-5 * (i + 1) // 7)) for i in range(9)]
    assert state["max_live"] == 1
    state.update(reads=0, live=0, max_live=0)
    for _ in r.iter_batches(4, shuffle=True, buffer_parts=2):
        pass
    assert state["reads"] == 7 and state["max_live"] <= 2


def test_reader_accepts_fixed_shape_tensor_parts(tmp_path):
    out = tmp_path / "m"
    rows, m = build(out, n=10, rows_per_part=10, dtype="float16")
    part = out / m.parts[0].file
    key16 = rows["key"].astype(np.float16)
    tensor = pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.float16(), [D]), pa.FixedSizeListArray.from_arrays(pa.array(key16.ravel()), D))
    table = pa.table({"key": tensor, "token": pa.array(rows["token"], pa.int32()),
                      "example": pa.array(rows["example"], pa.int64()),
                      "position": pa.array(rows["position"], pa.int32())})
    pq.write_table(table, part)
    assert pq.ParquetFile(part).schema_arrow.field("key").type.extension_name == "arrow.fixed_shape_tensor"
    d = m.to_dict()
    d["parts"][0]["sha256"] = mem.file_sha256(str(part))
    (out / "manifest.json").write_text(json.dumps(d))
    got = MemoryReader(out).read_all()
    np.testing.assert_array_equal(got["key"], key16.astype(np.float32))
    np.testing.assert_array_equal(got["token"], rows["token"])
    assert [len(b["token"]) for b in MemoryReader(out).iter_batches(4)] == [4, 4, 2]


def test_check_compatible(tmp_path):
    build(tmp_path / "m")
    r = MemoryReader(tmp_path / "m")
    r.check_compatible(d=D, vocab_size=V, model_id="org/model")
    with pytest.raises(MemoryMismatchError, match=r"d=6.*d=768"):
        r.check_compatible(d=768, vocab_size=V)
    with pytest.raises(MemoryMismatchError, match=r"vocab_size=50.*vocab_size=49152"):
        r.check_compatible(d=D, vocab_size=49152)
    with pytest.raises(MemoryMismatchError, match=r"org/model.*other/model"):
        r.check_compatible(d=D, vocab_size=V, model_id="other/model")


def test_corrupt_missing_and_inconsistent_memory(tmp_path):
    out = tmp_path / "m"
    _, m = build(out)
    victim = out / m.parts[2].file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match=m.parts[2].file):
        verify_memory(out)
    with pytest.raises(MemoryFormatError, match=m.parts[2].file):
        MemoryReader(out)
    victim.unlink()
    with pytest.raises(MemoryFormatError, match=f"{m.parts[2].file}.*missing"):
        verify_memory(out, checksums=False)
    d = m.to_dict()
    d["parts"] = d["parts"][:2] + d["parts"][3:]
    (out / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(MemoryFormatError, match="total_rows=45"):
        verify_memory(out)
    (out / "manifest.json").unlink()
    with pytest.raises(MemoryFormatError, match="no manifest.json in .*did not finish"):
        read_manifest(out)
    with pytest.raises(MemoryFormatError):
        MemoryReader(out, verify=False)


def test_writer_exception_and_missing_close_leave_nothing(tmp_path):
    out = tmp_path / "m"
    rows = make_rows(30)
    with pytest.raises(RuntimeError, match="boom"):
        with MemoryWriter(out, d=D, vocab_size=V, rows_per_part=7, **META) as w:
            w.add(**rows)
            assert len([n for n in os.listdir(out) if n.endswith(".parquet")]) == 4
            raise RuntimeError("boom")
    assert os.listdir(out) == []
    with pytest.raises(MemoryFormatError, match="close"):
        with MemoryWriter(out, d=D, vocab_size=V, rows_per_part=7, **META) as w:
            w.add(**rows)
    assert os.listdir(out) == []


def test_writer_refuses_existing_memory_unless_overwrite(tmp_path):
    out = tmp_path / "m"
    build(out, n=20)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MemoryFormatError, match=str(out)):
        MemoryWriter(out, d=D, vocab_size=V, **META)
    rows, m = build(out, n=10, rows_per_part=4, overwrite=True)
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt"] + [f"part-{i:05d}.parquet" for i in range(3)]
    assert m.total_rows == 10 and verify_memory(out) == m


def test_bad_inputs_raise_value_error(tmp_path):
    for kw, msg in ((dict(dtype="int8"), "int8"), (dict(d=0), "d=0"), (dict(vocab_size=-1), "vocab_size=-1"),
                    (dict(rows_per_part=0), "rows_per_part=0")):
        with pytest.raises(ValueError, match=msg):
            MemoryWriter(tmp_path / "x", **{"d": D, "vocab_size": V, **kw}, **META)
    w = MemoryWriter(tmp_path / "m", d=D, vocab_size=V, **META)
    r = make_rows(4)
    with pytest.raises(ValueError, match="key width 5"):
        w.add(**{**r, "key": np.zeros((4, 5))})
    with pytest.raises(ValueError, match="vocab_size=50"):
        w.add(**{**r, "token": np.array([1, 2, 50, 3])})
    with pytest.raises(ValueError, match=r"\(3,\)"):
        w.add(**{**r, "position": np.arange(3)})
    with pytest.raises(ValueError, match="non-finite"):
        w.add(**{**r, "key": np.full((4, D), 1e6)})  # overflows float16
    with pytest.raises(ValueError, match=r"key \(4,\)"):
        write_part(tmp_path / "p.parquet", key=np.zeros(4), token=r["token"], example=r["example"],
                   position=r["position"], dtype="float32")
    with pytest.raises(ValueError, match="int8"):
        write_part(tmp_path / "p.parquet", dtype="int8", **r)
    w.abort()
    assert os.listdir(tmp_path / "m") == []


def test_empty_memory(tmp_path):
    with MemoryWriter(tmp_path / "m", d=D, vocab_size=V, **META) as w:
        m = w.close(num_examples=0, source_tokens=0)
    assert m.parts == () and m.total_rows == 0
    r = MemoryReader(tmp_path / "m")
    assert r.read_all()["key"].shape == (0, D) and list(r.iter_batches(4)) == []


def test_row_slices_tile_the_memory_in_order(tmp_path):
    """MemoryReader.rows(a, b) yields exactly rows a..b-1 of read_all(), across part boundaries."""
    from pema.formats.memory import MemoryReader
    from pema.formats.memory_writer import MemoryWriter

    rng = np.random.default_rng(0)
    n, d = 23, 4
    key = rng.standard_normal((n, d)).astype(np.float32)
    with MemoryWriter(tmp_path / "m", d=d, vocab_size=50, dtype="float32", rows_per_part=5, model_id="m",
                      model_revision=None, tokenizer_hash="t", template="x", key_definition="k") as w:
        w.add(key=key, token=np.arange(n) % 50, example=np.arange(n) // 3, position=np.arange(n) % 3)
        w.close(num_examples=8, source_tokens=10)
    reader = MemoryReader(tmp_path / "m")
    full = reader.read_all()
    for start, stop, batch in [(0, 23, 4), (3, 17, 5), (7, 8, 3), (10, 10, 2), (0, 11, 100)]:
        got = list(reader.rows(start, stop).iter_batches(batch))
        assert [len(b["token"]) for b in got] == [min(batch, stop - s) for s in range(start, stop, batch)]
        assert len(reader.rows(start, stop)) == stop - start
        if got:
            for col in ("key", "token", "example", "position"):
                np.testing.assert_array_equal(np.concatenate([b[col] for b in got]), full[col][start:stop])
    with pytest.raises(ValueError, match="inside"):
        reader.rows(5, 24)
    with pytest.raises(ValueError, match="stored order"):
        next(reader.rows(0, 5).iter_batches(2, shuffle=True))


def test_verification_hashes_each_part_once_until_it_changes(tmp_path, monkeypatch):
    rows, m = build(tmp_path / "m")
    hashed = []
    real = mem.file_sha256
    monkeypatch.setattr(mem, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    assert verify_memory(tmp_path / "m") == m and len(hashed) == len(m.parts)  # first open: every part hashed
    hashed.clear()
    MemoryReader(tmp_path / "m")
    assert verify_memory(tmp_path / "m") == m and hashed == []  # later opens: the stamp says they are unchanged
    part = tmp_path / "m" / m.parts[2].file
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, new bytes (and a new modification time)
    part.write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match=f"{m.parts[2].file}.*sha256"):
        verify_memory(tmp_path / "m")
    assert hashed == [m.parts[2].file]  # only the changed part is hashed again
    part.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the size differs too
    with pytest.raises(MemoryFormatError):
        MemoryReader(tmp_path / "m")
