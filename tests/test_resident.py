"""Tests of pema.adapter.resident: loading a Parquet memory onto the device and epoch batches from a randperm.

A small memory (d=16, vocab=24, 300 rows in parts of 64, so reads cross part boundaries) is written with
MemoryWriter; keys are unit-RMS random vectors and tokens come from a fixed random linear teacher, as in
tests/test_train.py, so that a training phase on it has something to learn.
"""

import numpy as np
import pytest
import torch

from pema.adapter.head import OutputHead
from pema.adapter.model import PemaAdapter
from pema.adapter.resident import ResidentMemory
from pema.adapter.train import PhaseData, PhaseHooks, train_phase, validate
from pema.formats.memory import MemoryReader
from pema.formats.memory_writer import MemoryWriter

D, V, RANK, N = 16, 24, 8, 300


def synthetic(n, seed):
    """keys (n, D) float32 with unit RMS; tokens = argmax(T k) for a fixed teacher T (seed 123)."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, D)).astype(np.float32)
    keys /= np.sqrt((keys ** 2).mean(-1, keepdims=True))
    teacher = np.random.default_rng(123).standard_normal((V, D)).astype(np.float32)
    return keys, np.argmax(keys @ teacher.T, axis=-1).astype(np.int64)


def write_memory(path, n=N, seed=1, dtype="float32"):
    keys, tokens = synthetic(n, seed)
    with MemoryWriter(path, d=D, vocab_size=V, dtype=dtype, rows_per_part=64, model_id="synthetic",
                      model_revision=None, tokenizer_hash="none", template="{en}", key_definition="test") as w:
        w.add(key=keys, token=tokens, example=np.arange(n) // 10, position=np.arange(n) % 10)
        w.close(num_examples=(n + 9) // 10, source_tokens=n)
    return MemoryReader(path)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return write_memory(tmp_path_factory.mktemp("mem") / "train")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_reader_matches_reader(reader, dtype):
    mem = ResidentMemory.from_reader(reader, "cpu", dtype, read_batch_size=50)  # 50 does not divide 64
    ref = reader.read_all()
    assert len(mem) == N and mem.d == D and mem.dtype == dtype and mem.device == torch.device("cpu")
    assert mem.token.dtype == torch.long and torch.equal(mem.token, torch.as_tensor(ref["token"]))
    want = torch.as_tensor(ref["key"])
    if dtype == torch.float32:
        assert torch.equal(mem.key, want)
    else:  # bfloat16 keeps 8 mantissa bits: relative error <= 2^-8 per element; 1e-2 leaves margin
        torch.testing.assert_close(mem.key.float(), want, rtol=1e-2, atol=0.0)
    assert mem.nbytes == N * D * mem.key.element_size() + N * 8


@pytest.mark.parametrize("batch_size", [1, 32, 64, 299, 300, 1000])
def test_every_row_once_per_epoch(reader, batch_size):
    mem = ResidentMemory.from_reader(reader, "cpu", torch.float32)
    ref = reader.read_all()
    ref_rows = {tuple(k.tolist()): int(t) for k, t in zip(ref["key"], ref["token"])}
    assert len(ref_rows) == N  # random float keys are distinct, so a key identifies its row
    for epoch in range(2):
        batches = list(mem.batches(batch_size, seed=epoch))
        assert [len(b["token"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        keys = torch.cat([b["key"] for b in batches])
        tokens = torch.cat([b["token"] for b in batches])
        assert keys.shape == (N, D) and tokens.dtype == torch.long
        seen = [tuple(k.tolist()) for k in keys]
        assert sorted(seen) == sorted(ref_rows)  # each row exactly once
        assert all(ref_rows[k] == int(t) for k, t in zip(seen, tokens))  # key and token stay paired


def test_order_is_seeded(reader):
    mem = ResidentMemory.from_reader(reader, "cpu", torch.float32)

    def tokens(**kw):
        return torch.cat([b["token"] for b in mem.batches(50, **kw)])

    def keys(**kw):
        return torch.cat([b["key"] for b in mem.batches(50, **kw)])

    assert torch.equal(keys(seed=3), keys(seed=3)) and torch.equal(tokens(seed=3), tokens(seed=3))
    assert not torch.equal(keys(seed=3), keys(seed=4))
    assert torch.equal(mem.order(3), mem.order(3)) and sorted(mem.order(3).tolist()) == list(range(N))
    assert torch.equal(keys(shuffle=False), torch.as_tensor(reader.read_all()["key"]))  # stored order


def test_drop_last(reader):
    mem = ResidentMemory.from_reader(reader, "cpu", torch.float32)
    sizes = [len(b["token"]) for b in mem.batches(64, drop_last=True)]
    assert sizes == [64] * (N // 64)
    assert [len(b["token"]) for b in mem.batches(100, drop_last=True)] == [100] * 3


def test_float16_memory_on_disk(tmp_path):
    reader16 = write_memory(tmp_path / "m16", n=70, dtype="float16")
    mem = ResidentMemory.from_reader(reader16, "cpu", torch.float16)
    assert torch.equal(mem.key, torch.as_tensor(reader16.read_all()["key"]).half())


def test_bad_input(reader):
    with pytest.raises(ValueError):
        ResidentMemory(torch.zeros(3, D), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        ResidentMemory(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        ResidentMemory(torch.zeros(3, D), torch.zeros(3))  # float token ids
    with pytest.raises(TypeError):
        ResidentMemory(np.zeros((3, D)), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        ResidentMemory(torch.zeros(3, D, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        ResidentMemory.from_reader(reader, "cpu", torch.int8)
    mem = ResidentMemory(torch.zeros(3, D), torch.zeros(3, dtype=torch.int32))
    assert mem.token.dtype == torch.long
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            next(mem.batches(bad))


class ShortReader:
    """A reader whose manifest promises more rows than it yields."""

    class manifest:
        d = D

    def __len__(self):
        return 10

    def iter_batches(self, batch_size, shuffle=False):
        yield {"key": np.zeros((4, D), np.float32), "token": np.zeros(4, np.int64)}


def test_from_reader_rejects_row_count_mismatch():
    with pytest.raises(ValueError, match="10"):
        ResidentMemory.from_reader(ShortReader(), "cpu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_phase_with_resident_memory_reduces_loss(tmp_path, dtype):
    train = ResidentMemory.from_reader(write_memory(tmp_path / "train", n=256, seed=1), "cpu", dtype)
    dev = ResidentMemory.from_reader(write_memory(tmp_path / "dev", n=96, seed=2), "cpu", dtype)
    g = torch.Generator().manual_seed(0)
    head = OutputHead(norm_type="rms", eps=1e-6, norm_weight=1.0 + 0.1 * torch.randn(D, generator=g),
                      lm_head_weight=torch.randn(V, D, generator=g))
    head.requires_grad_(False)
    torch.manual_seed(0)
    adapter = PemaAdapter(D, RANK, alpha=RANK, dropout=0.0)
    data = PhaseData(lambda epoch: train.batches(32, seed=epoch), len(train), lambda: dev.batches(40, shuffle=False))
    res = train_phase(adapter, head, data, phase="rct_pd", epochs=4, lr=2e-2, kappa=0.3,
                      hooks=PhaseHooks(progress=False))
    first = res.history[0]
    assert res.rows_seen == 4 * 256 and res.steps == 4 * 8
    assert res.best_val < 0.85 * first["val_loss"], [h["val_loss"] for h in res.history]
    best = min(res.history, key=lambda h: h["val_loss"])
    assert best["val_ce"] < 0.85 * first["val_ce"]
    # the restored adapter has the best validation loss (float32 re-evaluation of the same batches)
    again = validate(adapter, head, lambda: dev.batches(40, shuffle=False), "rct_pd", 0.3)["loss"]
    assert again == pytest.approx(res.best_val, rel=1e-6)
