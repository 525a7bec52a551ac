"""kNN-distilled training: the stored neighbours (pema/baselines/knn.py, pema/formats/neighbours.py,
pema/stages/neighbours.py) and the distilled loss (pema/adapter/losses.py, pema/adapter/train.py), each against a
naive reference. Tolerances: 1e-5 absolute on float32 losses, 1e-4 on squared distances."""
import math

import pytest
import torch

from pema.adapter.head import OutputHead
from pema.adapter.losses import distill_ce
from pema.adapter.model import PemaAdapter
from pema.adapter.resident import ResidentMemory
from pema.adapter.train import phase_losses
from pema.baselines.knn import neighbour_weights, neighbours_outside_group
from pema.errors import MemoryFormatError
from pema.formats.memory_writer import MemoryWriter
from pema.formats.neighbours import load_neighbours, neighbours_status, save_neighbours


def naive_neighbours(keys, groups, k):
    n = keys.shape[0]
    dist, idx = [], []
    for i in range(n):
        cands = sorted((float(((keys[i] - keys[j]) ** 2).sum()), j) for j in range(n) if groups[j] != groups[i])
        cands = cands[:k] + [(math.inf, -1)] * (k - len(cands[:k]))
        dist.append([c[0] for c in cands]), idx.append([c[1] for c in cands])
    return torch.tensor(dist), torch.tensor(idx)


@pytest.mark.parametrize("block, chunk", [(7, 11), (2048, 65536), (1, 3)])
def test_neighbours_outside_group_match_brute_force(block, chunk):
    torch.manual_seed(0)
    keys, groups = torch.randn(40, 6), torch.arange(40) // 6
    dist, idx = neighbours_outside_group(keys, groups, 5, block=block, chunk=chunk)
    ref_d, ref_i = naive_neighbours(keys, groups, 5)
    assert torch.allclose(dist, ref_d, atol=1e-4)
    assert torch.equal(idx, ref_i)
    assert not (groups[idx] == groups[:, None]).any()  # never the key's own example


def test_too_few_candidates_are_marked_missing():
    keys, groups = torch.randn(5, 3), torch.tensor([0, 0, 0, 1, 1])
    dist, idx = neighbours_outside_group(keys, groups, 3)
    assert (idx[:3, 2] == -1).all() and torch.isinf(dist[:3, 2]).all()  # rows of group 0 have 2 candidates


def test_neighbour_weights_are_the_knn_softmax():
    dist = torch.tensor([[1.0, 2.0, math.inf], [math.inf, math.inf, math.inf]])
    w = neighbour_weights(dist, 2.0)
    e = [math.exp(-0.5), math.exp(-1.0)]
    assert torch.allclose(w[0], torch.tensor([e[0] / sum(e), e[1] / sum(e), 0.0]), atol=1e-6)
    assert torch.equal(w[1], torch.zeros(3))


def test_distill_ce_matches_the_dense_soft_target_formula():
    torch.manual_seed(1)
    logits, tok = torch.randn(4, 9), torch.randint(0, 9, (4, 3))
    w = torch.softmax(torch.randn(4, 3), 1)
    total = 0.0
    for i in range(4):
        p_knn = [0.0] * 9
        for j in range(3):
            p_knn[int(tok[i, j])] += float(w[i, j])
        z = [math.exp(float(v)) for v in logits[i]]
        total += -sum(p_knn[v] * math.log(z[v] / sum(z)) for v in range(9))
    assert abs(float(distill_ce(logits, tok, w)) - total / 4) < 1e-5


def test_phase_losses_mix_onehot_and_knn_targets():
    torch.manual_seed(2)
    d, v = 8, 11
    head = OutputHead(norm_type="rms", eps=1e-6, norm_weight=torch.ones(d), lm_head_weight=torch.randn(v, d))
    adapter = PemaAdapter(d, 4, 4.0, 0.0)
    batch = {"key": torch.randn(5, d), "token": torch.randint(0, v, (5,)), "nb_token": torch.randint(0, v, (5, 3)),
             "nb_weight": torch.softmax(torch.randn(5, 3), 1)}
    plain = phase_losses(adapter, head, batch, "pd", 0.0)
    assert "knn_ce" not in plain  # beta 0: the paper's loss
    mixed = phase_losses(adapter, head, batch, "pd", 0.0, distill_beta=0.3)
    assert torch.allclose(mixed["loss"], 0.7 * mixed["ce"] + 0.3 * mixed["knn_ce"], atol=1e-6)
    assert torch.allclose(mixed["ce"], plain["ce"])
    dev = {"key": batch["key"], "token": batch["token"]}  # no neighbours: scored on CE alone
    assert torch.allclose(phase_losses(adapter, head, dev, "pd", 0.0, distill_beta=0.3)["loss"], plain["loss"])


def test_resident_memory_batches_carry_the_extra_columns():
    key, token = torch.randn(10, 3), torch.arange(10)
    mem = ResidentMemory(key, token).with_extra(nb_token=torch.arange(10)[:, None] * 2)
    for b in mem.batches(4, seed=3):
        assert torch.equal(b["nb_token"][:, 0], b["token"] * 2)
    with pytest.raises(ValueError, match="extra 'bad'"):
        ResidentMemory(key, token, {"bad": torch.zeros(9)})


def _memory(tmp_path, rows=30, d=4):
    import numpy as np

    rng = np.random.default_rng(3)
    with MemoryWriter(tmp_path / "mem", d=d, vocab_size=50, dtype="float32", rows_per_part=16, model_id="m",
                      model_revision=None, tokenizer_hash="", template="", key_definition="k") as w:
        w.add(key=rng.standard_normal((rows, d)).astype("float32"), token=rng.integers(0, 50, rows),
              example=np.arange(rows) // 5, position=np.arange(rows) % 5)
        w.close(num_examples=rows // 5, source_tokens=rows)
    return tmp_path / "mem"


def test_stored_neighbours_round_trip_and_go_stale_with_the_memory(tmp_path):
    mem = _memory(tmp_path)
    assert neighbours_status(mem, 4) == "none stored"
    dist, idx = torch.rand(30, 6), torch.randint(0, 30, (30, 6))
    save_neighbours(mem, dist, idx, search="exact")
    got_d, got_i = load_neighbours(mem, 4)
    assert torch.equal(got_d, dist[:, :4]) and torch.equal(got_i, idx[:, :4])
    assert "6 per row stored, 8 wanted" in neighbours_status(mem, 8)
    manifest = mem / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # the memory changed after them
    with pytest.raises(MemoryFormatError, match="stale"):
        load_neighbours(mem, 4)


def test_faiss_neighbours_above_exact_max_rows_leave_out_the_own_example(tmp_path):
    from pema.config import load_config
    from pema.stages.neighbours import ensure_neighbours

    mem = _memory(tmp_path, rows=600, d=8)
    cfg = load_config(None, ["train.distill_beta=0.5", "train.distill_k=4", "knn.exact_max_rows=100",
                             "knn.nprobe=64"])
    assert ensure_neighbours(cfg, mem, log=lambda *_: None)
    meta = __import__("json").loads((mem / "neighbours.json").read_text())
    assert meta["search"] == "ivfpq" and meta["k"] == 4
    dist, idx = load_neighbours(mem, 4)
    groups = torch.arange(600) // 5
    assert not (groups[idx.clamp_min(0)] == groups[:, None])[idx >= 0].any()
    data = __import__("pema.formats.memory", fromlist=["MemoryReader"]).MemoryReader(mem).read_all()
    _, exact = neighbours_outside_group(torch.from_numpy(data["key"]), torch.from_numpy(data["example"]), 4)
    recall = (idx[:, :1] == exact[:, :1]).float().mean().item()
    assert recall >= 0.5, recall  # PQ codes approximate the distances; the nearest one is found at least half the time
    assert not ensure_neighbours(cfg, mem, log=lambda *_: None)  # fresh ones are kept


def test_the_train_stage_distills_from_stored_neighbours(tmp_path):
    from pema.config import load_config
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import run_build
    from pema.stages.train import run_train

    cfg = load_config("jobs/configs/smoke.yaml", ["train.distill_beta=0.5", "train.distill_k=4"])
    run_build(cfg, tmp_path, InlineExecutor(), progress=False)
    assert neighbours_status(tmp_path / "memory" / "train", 4) == "none stored"
    info = run_train(cfg, tmp_path, InlineExecutor(), progress=False)
    assert neighbours_status(tmp_path / "memory" / "train", 4) is None  # computed once, before the workers
    assert info.phases[-1]["phase"] == "rct_pd" and info.phases[-1]["steps"] > 0
    plain = run_train(load_config("jobs/configs/smoke.yaml"), tmp_path, InlineExecutor(), progress=False)
    assert plain.phases[-1]["best_val"] != info.phases[-1]["best_val"]  # the distilled loss trained another adapter
