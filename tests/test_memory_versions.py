"""The memory as a living dataset: a build is version 1; append encodes only the pairs the memory lacks; a build
of a changed file adds and drops only what changed; delete leaves no row, part, neighbour or examples entry of the
withdrawn pairs, and the adapter trained after it reads the new version; old versions are listed and collected."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pema.config import load_config, with_absolute_data
from pema.executors.inline import InlineExecutor
from pema.formats.memory import MemoryReader, verify_memory
from pema.formats.versions import collect_garbage, list_versions, pair_hash, read_examples, version_of

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
NC = [json.loads(x) for x in (ROOT / "data" / "nc" / "train.jsonl").read_text().splitlines() if x.strip()]


class CountingExecutor(InlineExecutor):
    """The inline executor, counting the examples sent to the encoder (what the PLM owner is asked to encode)."""

    def __init__(self):
        self.examples = []

    def encode(self, encoder_factory, items, *, cfg):
        items = list(items)
        self.examples += [e[0] for it in items for b in json.loads(it["batches"]) for e in b]
        yield from super().encode(encoder_factory, items, cfg=cfg)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(train: Path, *extra):
    return with_absolute_data(load_config(SMOKE, [f"data.train={train}", "data.train_limit=null",
                                                  "memory.rows_per_part=64", *extra]))


def _hashes(rows) -> set[str]:
    return {pair_hash(r["en"], r["du"]) for r in rows}


def _rows_by_hash(mem: Path) -> dict[str, np.ndarray]:
    data, table = MemoryReader(mem).read_all(), read_examples(mem)
    ids = dict(zip(table["hash"].tolist(), table["example"].tolist()))
    return {h: data["key"][data["example"] == i] for h, i in ids.items()}


@pytest.fixture
def built(tmp_path):
    from pema.stages.build import run_build

    train = _jsonl(tmp_path / "train.jsonl", NC[:12])
    run_build(_cfg(train), tmp_path / "run", InlineExecutor(), progress=False)
    return tmp_path, train


def test_a_build_is_version_one_with_every_pair_hashed(built):
    tmp, _ = built
    mem = tmp / "run" / "memory" / "train"
    m = verify_memory(mem)
    table = read_examples(mem, m)
    assert version_of(m) == 1 and set(table["hash"].tolist()) == _hashes(NC[:12])
    assert sorted(np.unique(MemoryReader(mem).read_all()["example"]).tolist()) == sorted(table["example"].tolist())
    (record,) = list_versions(mem)
    assert record["status"] == "current" and record["parent"] == 0 and len(record["added"]) == 12


def test_append_encodes_only_new_pairs_and_keeps_old_parts(built):
    from pema.stages.build import append_memory, run_build

    tmp, train = built
    mem = tmp / "run" / "memory" / "train"
    before = verify_memory(mem)
    old_files = {p.file: (mem / p.file).read_bytes() for p in before.parts}
    executor = CountingExecutor()
    new = NC[12:14]
    result = append_memory(_cfg(train), mem, [*_pairs(new), *_pairs(NC[3:4]), *_pairs(new[:1])], executor,
                           progress=False)
    assert len(executor.examples) == 2  # the repeated and the present pair are not sent
    assert (result["added"], result["already_present"], result["version"]) == (2, 1, 2)
    after = verify_memory(mem)
    assert all((mem / f).read_bytes() == b for f, b in old_files.items())  # old parts untouched
    assert set(read_examples(mem)["hash"].tolist()) == _hashes(NC[:14])
    # the appended rows' keys equal a build of all 14 pairs at once (float16 keys, one ulp)
    both = _jsonl(tmp / "all.jsonl", NC[:14])
    run_build(_cfg(both), tmp / "whole", InlineExecutor(), progress=False)
    got, want = _rows_by_hash(mem), _rows_by_hash(tmp / "whole" / "memory" / "train")
    for h in _hashes(NC[12:14]):
        np.testing.assert_allclose(got[h], want[h], rtol=2 ** -10, atol=1e-3)
    assert after.total_rows == MemoryReader(tmp / "whole" / "memory" / "train").manifest.total_rows
    again = append_memory(_cfg(train), mem, _pairs(new), CountingExecutor(), progress=False)
    assert again["added"] == 0 and version_of(verify_memory(mem)) == 2  # nothing new: no new version


def _pairs(rows):
    from pema.formats.tasks import Pair

    return [Pair(i, r["en"], r["du"]) for i, r in enumerate(rows)]


def test_a_build_of_a_changed_file_encodes_only_the_change(built):
    from pema.stages.build import append_memory, build_memories
    from pema.stages.inputs import split_pairs

    tmp, train = built
    mem = tmp / "run" / "memory" / "train"
    append_memory(_cfg(train), mem, _pairs(NC[20:21]), InlineExecutor(), progress=False)
    changed = _jsonl(tmp / "changed.jsonl", NC[1:12] + NC[14:15])  # pair 0 gone, pair 14 new
    cfg, executor = _cfg(changed), CountingExecutor()
    build_memories(cfg, {mem: split_pairs(cfg, "train")}, executor, progress=False)
    assert len(executor.examples) == 1
    assert set(read_examples(mem)["hash"].tolist()) == _hashes(NC[1:12] + NC[14:15] + NC[20:21])  # append stays
    rec = list_versions(mem)[-1]
    assert (rec["version"], len(rec["added"]), rec["deleted"]) == (3, 1, sorted(_hashes(NC[:1])))
    executor = CountingExecutor()
    build_memories(cfg, {mem: split_pairs(cfg, "train")}, executor, progress=False)
    assert executor.examples == [] and version_of(verify_memory(mem)) == 3


def test_delete_leaves_no_trace_and_retraining_reads_the_new_version(built):
    from pema.baselines.knn_index import load_knn
    from pema.stages.build import build_memories, delete_from_memory
    from pema.stages.inputs import split_pairs
    from pema.stages.neighbours import ensure_neighbours
    from pema.stages.train import train_local

    tmp, train = built
    run, mem = tmp / "run", tmp / "run" / "memory" / "train"
    cfg = _cfg(train, "train.distill_beta=0.5", "train.distill_k=4")
    ensure_neighbours(cfg, mem, log=lambda *_: None)
    gone = _hashes(NC[2:4])
    old = _rows_by_hash(mem)
    old_ids = set(read_examples(mem)["example"][np.isin(read_examples(mem)["hash"], list(gone))].tolist())
    result = delete_from_memory(mem, gone)
    assert result["deleted"] == 2 and set(result["deleted_ids"]) == gone
    # no Parquet file left in the folder holds a row or an id of the withdrawn pairs, and no neighbours are stored
    for f in mem.glob("*.parquet"):
        table = pq.read_table(f)
        if "example" in table.column_names and "key" in table.column_names:
            assert not set(table.column("example").to_pylist()) & old_ids, f.name
        else:
            assert not set(table.column("hash").to_pylist()) & gone, f.name
    assert not (mem / "neighbours.json").exists()
    assert [v["status"] for v in list_versions(mem)] == ["removed", "current"]
    # kNN over the memory no longer finds the withdrawn rows: their own keys are no longer at distance 0
    scorer = load_knn(mem, cfg.knn, vocab_size=MemoryReader(mem).manifest.vocab_size)
    for h in gone:
        dist, _ = scorer.index.search(torch.from_numpy(old[h][:3]).float(), 1)
        assert (dist > 1e-6).all()
    # the adapter trained now is bound to the new version, and its distillation neighbours point at kept rows only
    from pema.formats.neighbours import load_neighbours
    from pema.formats.versions import memory_info
    from pema.stages.train import worker_config

    assert worker_config(cfg, run, progress=False)["adapter_meta"]["memory"] == memory_info(mem)
    assert memory_info(mem)["version"] == 2
    train_local(cfg, run, progress=False)
    _, nb = load_neighbours(mem, 4)
    kept_examples = MemoryReader(mem).read_all()["example"]
    assert not set(kept_examples[nb[nb >= 0].numpy()].tolist()) & old_ids
    # a build from the original file does not put the withdrawn pairs back
    build_memories(cfg, {mem: split_pairs(cfg, "train")}, InlineExecutor(), progress=False)
    assert not set(read_examples(mem)["hash"].tolist()) & gone and version_of(verify_memory(mem)) == 2
    # nor does a build that makes the memory whole again (other part sizes: another header)
    from pema.config import with_overrides
    from pema.formats.versions import withdrawn

    whole = with_overrides(cfg, {"memory.rows_per_part": 32})
    build_memories(whole, {mem: split_pairs(whole, "train")}, InlineExecutor(), progress=False)
    assert version_of(verify_memory(mem)) == 1 and withdrawn(mem) == gone
    assert not set(read_examples(mem)["hash"].tolist()) & gone


def test_versions_are_collected_unless_a_model_uses_them(built):
    from pema.stages.build import append_memory

    tmp, train = built
    mem = tmp / "run" / "memory" / "train"
    for i in (12, 13, 14):
        append_memory(_cfg(train), mem, _pairs(NC[i:i + 1]), InlineExecutor(), progress=False)
    assert [v["version"] for v in list_versions(mem)] == [1, 2, 3, 4]
    gone = collect_garbage(mem, keep={2})
    assert gone["versions"] == [1, 3]
    assert [v["version"] for v in list_versions(mem)] == [2, 4]
    assert gone["files"] == sorted(["examples-v00001.parquet", "examples-v00003.parquet"])  # parts are shared
    verify_memory(mem)
    assert version_of(verify_memory(mem)) == 4 and len(read_examples(mem)["hash"]) == 15
