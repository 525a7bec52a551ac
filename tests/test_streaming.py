"""Tests of streaming training (pema.adapter.streaming, pema.formats.memory_stream, pema.stages.train_memory).

The memory is tests/test_resident.py's (d=16, vocab=24, 300 rows in parts of 64); a worker's share is a row range
that starts and ends inside parts, so chunks are clipped. A share that fits the shuffle buffer must give the resident
path's batches exactly; a small buffer must still give every row once per epoch while holding a bounded number of
rows; and train_worker must train the same adapter either way (max abs weight difference <= 1e-6).
"""
import numpy as np
import pytest
import torch

from pema.adapter.resident import ResidentMemory
from pema.adapter.streaming import StreamingMemory
from pema.config import load_config
from pema.errors import ConfigError
from pema.formats.bundle import HEAD_FORMAT, write_bundle
from pema.formats.layout import RunLayout
from pema.formats.memory_stream import MemoryShare
from pema.stages.train import train_local
from pema.stages.train_memory import choose_memory_path
from tests.test_resident import D, N, V, write_memory

LO, HI = 37, 281  # a share that starts and ends inside parts (64 rows each)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return write_memory(tmp_path_factory.mktemp("mem") / "train", dtype="float16")


def streaming(reader, buffer_rows, lo=LO, hi=HI, **kw):
    return StreamingMemory(MemoryShare(reader, lo, hi), buffer_rows, **kw)


def cat(batches, name):
    return torch.cat([b[name] for b in batches])


def test_share_chunks_are_clipped_parts(reader):
    share = MemoryShare(reader, LO, HI)
    assert [(c.lo, c.hi) for c in share.chunks] == [(37, 64), (64, 128), (128, 192), (192, 256), (256, 281)]
    rows = list(share.iter_chunks())
    assert np.array_equal(np.concatenate([r["row"] for r in rows]), np.arange(HI - LO))
    ref = reader.read_all()
    assert np.array_equal(np.concatenate([r["key"] for r in rows]), ref["key"][LO:HI])
    assert np.array_equal(np.concatenate([r["token"] for r in rows]), ref["token"][LO:HI])


@pytest.mark.parametrize("batch_size", [1, 50, 64, 244, 1000])
@pytest.mark.parametrize("seed", [0, 7, 3001])
def test_whole_share_in_the_buffer_gives_the_resident_batches(reader, batch_size, seed):
    resident = ResidentMemory.from_reader(reader.rows(LO, HI), "cpu", torch.float32)
    stream = streaming(reader, HI - LO)  # the buffer holds exactly the share
    for shuffle in (True, False):
        want = list(resident.batches(batch_size, seed=seed, shuffle=shuffle))
        got = list(stream.batches(batch_size, seed=seed, shuffle=shuffle))
        assert [len(b["token"]) for b in got] == [len(b["token"]) for b in want]
        for g, w in zip(got, want):
            assert g["key"].dtype == torch.float32 and g["token"].dtype == torch.long
            assert torch.equal(g["key"], w["key"]) and torch.equal(g["token"], w["token"])


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("buffer_rows,batch_size", [(1, 7), (20, 32), (100, 50), (10_000, 64)])
def test_small_buffer_sees_every_row_once_and_holds_few_rows(reader, buffer_rows, batch_size, prefetch):
    ref = reader.read_all()
    nb = torch.arange(HI - LO).repeat(3, 1).T * 10  # a row-aligned extra: every batch must carry its rows' values
    stream = streaming(reader, buffer_rows, prefetch=prefetch).with_extra(nb_token=nb)
    orders = []
    for epoch in range(2):
        batches = list(stream.batches(batch_size, seed=epoch))
        assert all(len(b["token"]) == batch_size for b in batches[:-1])
        keys, tokens, extra = cat(batches, "key"), cat(batches, "token"), cat(batches, "nb_token")
        # keys are distinct random vectors: map each back to its row
        index = {tuple(k): i for i, k in enumerate(ref["key"][LO:HI].tolist())}
        rows = torch.tensor([index[tuple(k)] for k in keys.tolist()])
        assert sorted(rows.tolist()) == list(range(HI - LO))  # every row of the share exactly once
        assert torch.equal(tokens, torch.as_tensor(ref["token"][LO:HI])[rows])  # key and token stay paired
        assert torch.equal(extra, nb[rows])  # and so does the extra
        orders.append(rows)
        assert 0 < stream.peak_rows <= min(buffer_rows, HI - LO) + 3 * 64 + batch_size
        assert stream.peak_rows <= stream.row_bound(batch_size)
    assert not torch.equal(orders[0], orders[1])  # each epoch its own order
    assert not torch.equal(orders[0], torch.arange(HI - LO))  # shuffled, even through a buffer of one row


def test_rows_held_stay_bounded_by_the_buffer_not_the_share(tmp_path):
    big = write_memory(tmp_path / "big", n=3000, dtype="float16")  # 47 parts of 64 rows
    stream = StreamingMemory(MemoryShare(big, 0, 3000), 256)
    assert sum(len(b["token"]) for b in stream.batches(32, seed=1)) == 3000
    assert stream.peak_rows <= 256 + 3 * 64 + 32 < 3000 // 5  # the buffer, a few parts and a batch


def test_seeded_order(reader):
    stream = streaming(reader, 40)
    first = cat(stream.batches(16, seed=5), "token")
    assert torch.equal(first, cat(stream.batches(16, seed=5), "token"))
    assert not torch.equal(first, cat(stream.batches(16, seed=6), "token"))


def test_bad_arguments(reader):
    with pytest.raises(ValueError, match="buffer_rows"):
        streaming(reader, 0)
    with pytest.raises(ValueError, match="batch_size"):
        streaming(reader, 10).batches(0)
    with pytest.raises(ValueError, match="extra 'nb_token'"):
        streaming(reader, 10).with_extra(nb_token=torch.zeros(3))
    with pytest.raises(ValueError, match="row range"):
        MemoryShare(reader, 10, N + 1)


def train_cfg(*overrides):
    return load_config(None, ["train.method=rct_pd", "train.rct_epochs=1", "train.epochs=2", "train.batch_size=32",
                              "train.evals_per_epoch=2", "adapter.rank=4", "resources.device=cpu", *overrides])


def test_choice_from_size():
    t = train_cfg().train
    assert t.streaming == "auto" and t.stream_buffer_rows == 262144 and t.resident_max_bytes == 0
    assert choose_memory_path(t, 1000, 16, 1, ram_bytes=4 * 64_000) == "resident"  # 64,000 bytes = a quarter
    assert choose_memory_path(t, 1001, 16, 1, ram_bytes=4 * 64_000) == "streaming"
    assert choose_memory_path(t, 1000, 16, 2, ram_bytes=4 * 64_000) == "streaming"  # two workers share the host
    fixed = train_cfg("train.resident_max_bytes=1000000").train
    assert choose_memory_path(fixed, 15625, 16, 4, ram_bytes=1) == "resident"
    assert choose_memory_path(fixed, 15626, 16, 4, ram_bytes=1) == "streaming"
    assert choose_memory_path(train_cfg("train.streaming=on").train, 1, 16, 1) == "streaming"
    assert choose_memory_path(train_cfg("train.streaming=off").train, 10 ** 12, 16, 1) == "resident"
    assert train_cfg("train.streaming=true").train.streaming == "on"  # YAML reads a bare on as true


@pytest.mark.parametrize("override,match", [
    ("train.streaming=maybe", "train.streaming='maybe' is invalid"),
    ("train.streaming=3", "train.streaming=3 is invalid"),
    ("train.stream_buffer_rows=0", "train.stream_buffer_rows=0 is invalid"),
    ("train.stream_buffer_rows=1.5", "train.stream_buffer_rows=1.5 is invalid"),
    ("train.resident_max_bytes=-1", "train.resident_max_bytes=-1 is invalid"),
])
def test_bad_config_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        train_cfg(override)


def test_streaming_on_with_resident_is_a_named_error():
    with pytest.raises(ConfigError, match=r"train.streaming='on' is invalid: .*train.resident is true"):
        train_cfg("train.streaming=on", "train.resident=true")
    assert train_cfg("train.streaming=auto", "train.resident=true").train.resident


def write_run(root):
    """head/ (a random RMS head), memory/train (300 rows, float16) and memory/dev (96 rows) of one folder."""
    layout = RunLayout(root)
    g = torch.Generator().manual_seed(0)
    write_bundle(layout.head, "head", {"norm.weight": 1.0 + 0.1 * torch.randn(D, generator=g),
                                       "lm_head.weight": torch.randn(V, D, generator=g)},
                 {"format": HEAD_FORMAT, "version": 1, "model_id": "synthetic", "norm_type": "rms", "eps": 1e-6,
                  "d": D, "vocab_size": V, "logit_scale": 1.0, "tokenizer_hash": "none", "extra": {}})
    write_memory(layout.memory("train"), dtype="float16")
    write_memory(layout.memory("dev"), n=96, seed=2, dtype="float16")
    return layout


@pytest.mark.parametrize("extra", [[], ["train.distill_beta=0.5", "train.distill_k=4"]])
def test_train_worker_trains_the_same_adapter_either_way(tmp_path, extra):
    layout = write_run(tmp_path)
    adapters = {}
    for path, overrides in (("resident", ["train.streaming=off"]),
                            ("streaming", ["train.streaming=on", "train.stream_buffer_rows=300"])):
        result = train_local(train_cfg(*overrides, *extra), layout.root, progress=False)
        assert result.train_memory == path and [p["phase"] for p in result.phases] == ["rct", "rct_pd"]
        adapters[path] = result.adapter.state_dict()
    for name, want in adapters["resident"].items():
        diff = (adapters["streaming"][name] - want).abs().max().item()
        assert diff <= 1e-6, (name, diff)  # the same batches, the same float32 math: equal in practice


def test_auto_streams_a_share_over_the_budget(tmp_path):
    layout = write_run(tmp_path)  # 300 rows x 16 x 4 bytes = 19,200 bytes of float32 keys
    result = train_local(train_cfg("train.stream_buffer_rows=50", "train.resident_max_bytes=19199"), layout.root,
                         progress=False)
    assert result.train_memory == "streaming" and result.steps_total > 0
    result = train_local(train_cfg("train.resident_max_bytes=19200"), layout.root, progress=False)
    assert result.train_memory == "resident"


def test_run_train_tags_the_train_memory(tmp_path):
    from pema.executors.inline import InlineExecutor
    from pema.stages.logger import RecordingLogger
    from pema.stages.train import run_train

    layout, logger = write_run(tmp_path), RecordingLogger()
    result = run_train(train_cfg("train.streaming=on"), layout.root, InlineExecutor(), logger, progress=False)
    assert result.train_memory == "streaming"
    assert ("tags", {"train_memory": "streaming"}) in logger.calls  # an MLflow run tag under the MLflow logger
