"""Tests of the kNN-LM baseline (pema.baselines): exact search and p_kNN against naive references, FAISS IVF-PQ
recall, the decode path (k = 1 reproduces a stored target; lam = 0 is the PLM alone) and bad input.

Decoding tests: tiny random Llama over SmolLM2's vocabulary (d = 64), memory built by pema.owner.build.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

from pema.formats import tasks
from pema.adapter.decode import GenerationSettings, generate
from pema.adapter.schedule import Schedule, interpolate
from pema.baselines.knn import ExactIndex, KnnScorer, exact_search, knn_log_probs
from pema.baselines.knn_index import FaissIndex, ivfpq_settings, load_knn, nearest_divisor
from pema.config import ConfigError, DecodeConfig, KnnConfig, PipelineConfig, ScheduleConfig
from pema.errors import MemoryMismatchError
from pema.formats.memory import MemoryReader
from pema.formats.memory_writer import MemoryWriter
from pema.stages.decode import translate

PAIRS = [tasks.Pair(0, "Hello world.", "Hallo Welt."),
         tasks.Pair(1, "The cat sleeps on the mat.", "Die Katze schläft auf der Matte."),
         tasks.Pair(2, "Thank you!", "Danke!"),
         tasks.Pair(3, "Where is the station?", "Wo ist der Bahnhof?"),
         tasks.Pair(4, "I like green apples and red cherries.", "Ich mag grüne Äpfel und rote Kirschen.")]


def constant(lam: float) -> ScheduleConfig:
    return ScheduleConfig(kind="constant", lam=lam)  # kNN-LM's constant lambda


# ---- exact search and p_kNN against naive references ----------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000])  # k = 5: chunk < k, N = 101 not divisible, chunk > N
def test_exact_search_matches_cdist_topk(chunk):
    g = torch.Generator().manual_seed(0)
    keys, query = 0.25 * torch.randn(101, 16, generator=g), 0.25 * torch.randn(9, 16, generator=g)
    ref = torch.cdist(query.double(), keys.double()) ** 2
    ref_d, ref_i = torch.topk(ref, 5, dim=1, largest=False)
    dist, idx = exact_search(query, keys, 5, chunk=chunk)
    assert dist.dtype == torch.float32 and idx.dtype == torch.long and dist.shape == idx.shape == (9, 5)
    torch.testing.assert_close(dist, ref_d.float(), atol=1e-5, rtol=0)  # float32 distances of ~2: 1e-5
    assert torch.equal(idx, ref_i)


def naive_knn_log_probs(dist, tokens, vocab, temperature):
    out = torch.full((dist.shape[0], vocab), -math.inf, dtype=torch.float64)
    for r in range(dist.shape[0]):
        logits = [-float(x) / temperature for x in dist[r]]
        top = max(logits)
        total = math.log(sum(math.exp(v - top) for v in logits)) + top
        for y in set(int(t) for t in tokens[r]):
            group = [v for v, t in zip(logits, tokens[r]) if int(t) == y]
            gm = max(group)
            out[r, y] = math.log(sum(math.exp(v - gm) for v in group)) + gm - total
    return out


@pytest.mark.parametrize("scale", [1.0, 500.0])  # 500: exp(-dist) underflows unless computed per group in log space
def test_knn_log_probs_matches_loop(scale):
    g = torch.Generator().manual_seed(1)
    dist = scale * torch.rand(6, 8, generator=g)
    tokens = torch.randint(0, 12, (6, 8), generator=g)
    out = knn_log_probs(dist, tokens, 12, temperature=1.5)
    ref = naive_knn_log_probs(dist, tokens, 12, 1.5)
    assert out.shape == (6, 12) and out.dtype == torch.float32
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))  # -inf exactly where no neighbour has the token
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)  # float32; values down to -dist / T
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(6), atol=1e-6, rtol=0)


def test_missing_neighbours_are_ignored():
    dist = torch.tensor([[0.5, float("inf")], [float("inf"), float("inf")]])
    out = knn_log_probs(dist, torch.tensor([[2, 3], [1, 1]]), 4, 1.0)
    assert out[0].tolist() == [-math.inf, -math.inf, 0.0, -math.inf] and torch.isneginf(out[1]).all()


def test_mixture_with_knn_is_finite_where_p_lm_is():
    g = torch.Generator().manual_seed(2)
    log_p_lm = torch.log_softmax(torch.randn(3, 12, generator=g), -1)
    log_p_knn = knn_log_probs(torch.rand(3, 4, generator=g), torch.randint(0, 12, (3, 4), generator=g), 12, 1.0)
    assert torch.isneginf(log_p_knn).any()
    for lam in (1e-6, 0.25, 0.5, 1 - 1e-6):
        mixed = interpolate(log_p_lm, log_p_knn, lam)
        assert torch.isfinite(mixed).all(), lam
        torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.equal(interpolate(log_p_lm, log_p_knn, 0.0), log_p_lm)
    assert torch.equal(interpolate(log_p_lm, log_p_knn, 1.0), log_p_knn)


# ---- FAISS IVF-PQ -------------------------------------------------------------------------------------------------

def clustered(n, d, seed, clusters=20):
    rng = np.random.default_rng(seed)
    centers = 4 * rng.standard_normal((clusters, d))
    return (centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_ivfpq_recall_at_1():
    """Queries near stored keys (as decoding contexts near memory contexts): noise 0.3 against a within-cluster
    spread of 1 and cluster distance ~ 4 * sqrt(2 d)."""
    keys = clustered(3000, 32, seed=0)
    index = FaissIndex.ivfpq(keys, nlist=16, nprobe=16, pq_m=8)
    rng = np.random.default_rng(1)
    query = torch.from_numpy(keys[rng.choice(3000, 200, replace=False)] + 0.3 * rng.standard_normal((200, 32)))
    query = query.float()
    dist, idx = index.search(query, 4)
    assert isinstance(dist, torch.Tensor) and dist.dtype == torch.float32 and idx.dtype == torch.long
    assert dist.shape == idx.shape == (200, 4)
    _, true = exact_search(query, torch.from_numpy(keys), 1)
    recall = (idx[:, 0] == true[:, 0]).float().mean().item()
    assert recall >= 0.9, recall  # nprobe = nlist: only PQ's approximation can miss; tolerance 10% of queries


def write_memory(path, keys, tokens, vocab=50, dtype="float32"):
    with MemoryWriter(path, d=keys.shape[1], vocab_size=vocab, dtype=dtype, rows_per_part=257, model_id="m",
                      model_revision=None, tokenizer_hash="", template="", key_definition="k") as w:
        w.add(key=keys, token=tokens, example=np.arange(len(tokens)), position=np.zeros(len(tokens), dtype=np.int64))
        w.close(num_examples=len(tokens), source_tokens=len(tokens))


def test_load_knn_chooses_the_index(tmp_path):
    keys = clustered(800, 24, seed=3)
    tokens = np.random.default_rng(0).integers(0, 50, 800)
    write_memory(tmp_path / "mem", keys, tokens)
    assert nearest_divisor(24, 32) == 24 and nearest_divisor(24, 7) == 6 and nearest_divisor(7, 5) == 1
    cfg = KnnConfig(k=1, index="auto", exact_max_rows=1000, nlist=64, nprobe=99, pq_m=10)
    assert ivfpq_settings(800, 24, cfg) == {"nlist": 20, "nprobe": 20, "pq_m": 8}  # 800 // 39 = 20 cells
    exact = load_knn(tmp_path / "mem", cfg, vocab_size=50, d=24)
    approx = load_knn(tmp_path / "mem", dataclasses.replace(cfg, exact_max_rows=799), vocab_size=50)
    assert isinstance(exact.index, ExactIndex) and isinstance(approx.index, FaissIndex)
    assert approx.index.index.nlist == 20 and approx.index.index.nprobe == 20 and approx.index.index.pq.M == 8
    for scorer in (exact, approx):
        out = scorer(torch.from_numpy(keys[:50]))
        assert out.shape == (50, 50) and torch.isfinite(out).sum(-1).eq(1).all()  # k = 1: one token per row
    assert torch.equal(exact(torch.from_numpy(keys)).argmax(-1), torch.from_numpy(tokens))


def test_bad_input_is_named(tmp_path):
    keys = clustered(300, 8, seed=4)
    write_memory(tmp_path / "mem", keys, np.zeros(300, dtype=np.int64))
    with pytest.raises(ValueError, match="k=301"):
        exact_search(torch.zeros(1, 8), torch.from_numpy(keys), 301)
    with pytest.raises(ValueError, match="d=8"):
        ExactIndex(torch.from_numpy(keys)).search(torch.zeros(1, 9), 1)
    with pytest.raises(ValueError, match="k=301"):
        KnnScorer(ExactIndex(torch.from_numpy(keys)), torch.zeros(300, dtype=torch.long), 50, 301)
    with pytest.raises(ValueError, match="knn.k=400"):
        load_knn(tmp_path / "mem", KnnConfig(k=400), vocab_size=50)
    with pytest.raises(MemoryMismatchError, match="d=8"):
        load_knn(tmp_path / "mem", KnnConfig(k=1), vocab_size=50, d=64)
    with pytest.raises(MemoryMismatchError, match="vocab_size=50"):
        load_knn(tmp_path / "mem", KnnConfig(k=1), vocab_size=99)
    with pytest.raises(ConfigError, match="knn.index"):
        KnnConfig(index="hnsw")
    bad = KnnConfig()
    object.__setattr__(bad, "index", "hnsw")  # a hand-made object that skipped validation
    with pytest.raises(ValueError, match="hnsw"):
        load_knn(tmp_path / "mem", bad, vocab_size=50)
    with pytest.raises(ValueError, match="at least 256"):
        FaissIndex.ivfpq(keys[:200], nlist=1, nprobe=1, pq_m=2)
    with pytest.raises(ValueError, match="d=8"):
        load_knn(tmp_path / "mem", KnnConfig(k=1, index="ivfpq", pq_m=2), 50).index.search(torch.zeros(1, 4), 1)
    with pytest.raises(ValueError, match="vocabulary"):
        knn_log_probs(torch.zeros(1, 2), torch.tensor([[0, 50]]), 50, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_search_and_scorer_on_cuda(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(5)
    keys, query = 0.25 * torch.randn(1001, 16, generator=g), 0.25 * torch.randn(7, 16, generator=g)
    d_cpu, i_cpu = exact_search(query, keys, 6, chunk=100)
    d_gpu, i_gpu = exact_search(query.cuda(), keys.cuda(), 6, chunk=100)
    assert d_gpu.is_cuda and i_gpu.is_cuda and torch.equal(i_gpu.cpu(), i_cpu)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, atol=1e-5, rtol=0)
    tokens = np.random.default_rng(0).integers(0, 50, 1001)
    write_memory(tmp_path / "mem", keys.numpy(), tokens, dtype="float16")
    scorer = load_knn(tmp_path / "mem", KnnConfig(k=1), vocab_size=50, device="cuda")
    assert scorer.index.keys.dtype == torch.float16 and scorer.tokens.is_cuda  # the memory's dtype on the GPU
    out = scorer(keys[:64].cuda())
    assert out.is_cuda and torch.equal(out.argmax(-1).cpu(), torch.from_numpy(tokens[:64]))


def test_baselines_never_import_the_owner():
    from test_imports import PKG, imports, under

    files = sorted((PKG / "baselines").glob("*.py"))
    assert len(files) >= 3
    assert not [(f.name, n) for f in files for _, n in imports(f) if under(n, "pema.owner")]


# ---- the decode path on a tiny PLM --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plm(smollm2_tokenizer):
    from pema.owner.plm import tiny_model

    return tiny_model("llama", len(smollm2_tokenizer), seed=0), smollm2_tokenizer


@pytest.fixture(scope="module")
def memory(plm, tmp_path_factory):
    from tests.conftest import inline_build

    out = tmp_path_factory.mktemp("knn") / "memory"
    inline_build(PAIRS, out, dtype="float16")  # tiny://llama: the same model as the plm fixture
    return out


CFG = PipelineConfig(decode=DecodeConfig(strategy="greedy", max_new_tokens=40))


def stored_targets(memory):
    rows = MemoryReader(memory).read_all()
    order = np.lexsort((rows["position"], rows["example"]))
    ex, tok = rows["example"][order], rows["token"][order]
    return [tok[ex == p.index].tolist() for p in PAIRS]


def test_scorer_argmax_at_stored_keys_is_stored_token(plm, memory):
    model, tok = plm
    rows = MemoryReader(memory).read_all()
    for k, temperature in ((1, 1.0), (8, 0.01)):
        scorer = load_knn(memory, KnnConfig(k=k, temperature=temperature), vocab_size=len(tok), d=64)
        assert torch.equal(scorer(torch.from_numpy(rows["key"])).argmax(-1), torch.from_numpy(rows["token"]))


def test_k1_reproduces_stored_targets(plm, memory):
    """kNN-LM with k = 1 and lam = 1 on a memory that contains the test contexts emits the stored next tokens."""
    model, tok = plm
    scorer = load_knn(memory, KnnConfig(k=1, lam=1.0), vocab_size=len(tok), d=64)
    hyps, result = translate(model, tok, [p.source for p in PAIRS], CFG, scorer=scorer, schedule=constant(1.0))
    stop = tasks.stop_token_id(tok, chat=True)
    for ids, target, pair, hyp in zip(result.token_ids, stored_targets(memory), PAIRS, hyps):
        assert target[-1] == stop and ids == target[:-1]  # stopped on the stored stop token
        assert hyp == pair.target
    zero_shot, _ = translate(model, tok, [p.source for p in PAIRS], CFG)
    assert zero_shot != hyps  # the random PLM alone does not translate


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_lam_zero_equals_plm_decoding(plm, memory, strategy):
    model, tok = plm
    cfg = dataclasses.replace(CFG, decode=DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=8))
    scorer = load_knn(memory, KnnConfig(k=4), vocab_size=len(tok))
    sources = [p.source for p in PAIRS] + ["Good morning, how are you?"]
    _, plain = translate(model, tok, sources, cfg)
    _, zero = translate(model, tok, sources, cfg, scorer=scorer, schedule=constant(0.0))
    _, half = translate(model, tok, sources, cfg, scorer=scorer, schedule=constant(0.5))
    assert zero.token_ids == plain.token_ids
    assert half.token_ids != plain.token_ids  # guards the equality above from being vacuous


def test_decode_arguments_are_checked(plm, memory):
    model, tok = plm
    scorer = load_knn(memory, KnnConfig(k=2), vocab_size=len(tok))
    with pytest.raises(ValueError, match="schedule"):
        translate(model, tok, ["Hi."], CFG, scorer=scorer)
    with pytest.raises(ValueError, match="ratio"):
        translate(model, tok, ["Hi."], CFG, scorer=scorer, schedule=ScheduleConfig(kind="gu_quadratic"))
    kw = dict(stop_token_id=1, pad_token_id=0, settings=GenerationSettings(max_new_tokens=2), progress=False)
    with pytest.raises(ValueError, match="not both"):
        generate(model, [[5, 6]], scorer=scorer, adapter=object(), head=object(), **kw)
    with pytest.raises(ValueError, match="scorer"):
        generate(model, [[5, 6]], scorer=scorer, schedule=Schedule("constant", lam=0.5), **kw)


def test_pema_knn_blend_is_the_weighted_sum_of_both_distributions():
    from pema.stages.compare import DEFINITIONS, SYSTEMS, blended_scorer, decode_schedule
    from pema.config import load_config

    class FixedAdapter:
        def log_probs(self, key, head):
            return torch.log_softmax(key @ torch.ones(key.shape[1], 5), 1) * 0 + torch.log(torch.tensor(
                [[0.1, 0.2, 0.3, 0.4, 0.0]]).expand(key.shape[0], 5))

    knn = lambda key: torch.log(torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.5]]).expand(key.shape[0], 5))
    out = blended_scorer(FixedAdapter(), None, knn, 0.25)(torch.zeros(2, 3)).exp()
    want = torch.tensor([0.75 * 0.1 + 0.25 * 0.5, 0.15, 0.225, 0.3, 0.125])
    assert torch.allclose(out, want.expand(2, 5), atol=1e-6)
    cfg = load_config(None, ["decode.pema_knn.lam=0.8"])
    assert "pema_knn" in SYSTEMS and "knn.pema_share" in DEFINITIONS["pema_knn"]
    assert decode_schedule("pema_knn", cfg).lam == 0.8
