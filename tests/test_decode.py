"""Tests of pema.adapter.decode: interpolated generation inside transformers' generate() on a tiny random Llama.

Model: pema.owner.plm.tiny_model("llama", vocab_size=100) (d=64, 2 layers); head exported with
pema.owner.export.export_head and read back with pema.adapter.io.load_head; keys from ContextTap.
"""

import math

import pytest
import torch

from pema.adapter.decode import GenerationSettings, PemaLogitsProcessor, generate
from pema.adapter.io import load_head
from pema.adapter.model import PemaAdapter
from pema.adapter.schedule import Schedule, interpolate
from pema.owner.export import export_head
from pema.owner.plm import tiny_model
from pema.owner.respond import ContextTap

VOCAB, STOP, PAD = 100, 1, 0
LENGTHS = [5, 9, 3, 7]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def head(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("head")
    export_head(model, folder, model_id="tiny://llama")
    h, meta = load_head(folder)
    assert meta["d"] == 64 and meta["vocab_size"] == VOCAB
    return h


@pytest.fixture(scope="module")
def adapter(head):
    torch.manual_seed(3)
    a = PemaAdapter(head.d, 8, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        a.B_pd.mul_(4.0)  # a sharper, clearly non-LM P_PEMA
    return a.eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def run(model, prompts, settings, **pema_kw):
    return generate(model, prompts, stop_token_id=STOP, pad_token_id=PAD, settings=settings, progress=False,
                    **pema_kw)


def pema_kw(model, adapter, head, schedule, horizons):
    return dict(adapter=adapter, head=head, key_source=ContextTap(model), schedule=schedule,
                horizons=torch.as_tensor(horizons, dtype=torch.float64))


GREEDY = GenerationSettings(strategy="greedy", max_new_tokens=6, batch_size=16)


# ----------------------------------------------------------------------------------------------------------------
# lambda = 0 is the PLM alone
# ----------------------------------------------------------------------------------------------------------------

def test_head_reproduces_model_logits(model, head, prompts):
    """Sanity of the fixture: the exported head on the tapped key gives the PLM's own logits (float32: 1e-4)."""
    ids = torch.tensor([prompts[0]])
    with torch.no_grad(), ContextTap(model) as tap:
        logits = model(input_ids=ids).logits[:, -1]
        key = tap.last_key()
    torch.testing.assert_close(head.from_key(key), logits, atol=1e-4, rtol=1e-4)


def test_lam_zero_constant_equals_plain_greedy(model, adapter, head, prompts):
    plain = run(model, prompts, GREEDY)
    assert all(len(s) <= GREEDY.max_new_tokens for s in plain.token_ids)
    assert plain.lam_traces == [[] for _ in prompts]
    const0 = run(model, prompts, GREEDY, **pema_kw(model, adapter, head, Schedule("constant", lam=0.0), [4] * 4))
    assert const0.token_ids == plain.token_ids
    assert all(set(tr) == {0.0} for tr in const0.lam_traces)


def test_gu_with_zero_lam_max_and_floor_equals_plain(model, adapter, head, prompts):
    plain = run(model, prompts, GREEDY)
    gu0 = run(model, prompts, GREEDY,
              **pema_kw(model, adapter, head, Schedule("gu_quadratic", lam_max=0.0, floor=0.0), [3, 5, 2, 8]))
    assert gu0.token_ids == plain.token_ids


def test_nonzero_lam_changes_the_output(model, adapter, head, prompts):
    """Guards the two tests above from being vacuous: this adapter does move greedy decoding."""
    plain = run(model, prompts, GREEDY)
    full = run(model, prompts, GREEDY, **pema_kw(model, adapter, head, Schedule("constant", lam=1.0), [4] * 4))
    assert full.token_ids != plain.token_ids


# ----------------------------------------------------------------------------------------------------------------
# lambda = 1: greedy follows P_PEMA
# ----------------------------------------------------------------------------------------------------------------

def pema_log_probs_after(model, adapter, head, ids):
    """log P_PEMA for the next token after ``ids``, computed independently (full forward, no cache)."""
    with torch.no_grad(), ContextTap(model) as tap:
        model(input_ids=torch.tensor([ids]))
        return adapter.log_probs(tap.last_key(), head)[0]


def test_lam_one_greedy_follows_adapter_argmax(model, adapter, head, prompts):
    settings = GenerationSettings(strategy="greedy", max_new_tokens=5)
    prompt = prompts[1]
    out = run(model, [prompt], settings, **pema_kw(model, adapter, head, Schedule("constant", lam=1.0), [5]))
    seq = out.token_ids[0]
    lp = pema_log_probs_after(model, adapter, head, prompt)
    assert seq, "generation stopped at once; pick another seed"
    assert seq[0] == int(lp.argmax())  # first token: exact
    # later tokens (KV cache vs full forward can differ by float32 noise): the chosen token is the argmax up to 1e-4
    for j in range(1, len(seq)):
        lp = pema_log_probs_after(model, adapter, head, prompt + seq[:j])
        assert lp[seq[j]] >= lp.max() - 1e-4, (j, seq)
    if len(seq) < settings.max_new_tokens:  # stopped on the stop token: it was P_PEMA's argmax
        lp = pema_log_probs_after(model, adapter, head, prompt + seq)
        assert lp[STOP] >= lp.max() - 1e-4


def test_lam_one_first_tokens_in_a_padded_batch(model, adapter, head, prompts):
    """Left padding must not change the key: each row's first token is its own P_PEMA argmax."""
    out = run(model, prompts, GenerationSettings(strategy="greedy", max_new_tokens=1),
              **pema_kw(model, adapter, head, Schedule("constant", lam=1.0), [4] * 4))
    for prompt, seq in zip(prompts, out.token_ids):
        lp = pema_log_probs_after(model, adapter, head, prompt)
        expected = int(lp.argmax())
        if expected == STOP:
            assert seq == []
        else:
            assert lp[seq[0]] >= lp.max() - 1e-4  # padded-batch attention: float32 noise, 1e-4


# ----------------------------------------------------------------------------------------------------------------
# beam search and sampling
# ----------------------------------------------------------------------------------------------------------------

def test_beam_search_with_pema(model, adapter, head, prompts):
    settings = GenerationSettings(strategy="beam", num_beams=3, max_new_tokens=5)
    sched = Schedule("gu_quadratic", lam_max=0.9, floor=0.1)
    horizons = [2, 6, 3, 9]
    out = run(model, prompts, settings, **pema_kw(model, adapter, head, sched, horizons))
    assert len(out.token_ids) == len(prompts)
    assert all(isinstance(s, list) and len(s) <= 5 and STOP not in s for s in out.token_ids)
    assert all(0 <= tok < VOCAB for s in out.token_ids for tok in s)
    for i, h in enumerate(horizons):  # one trace per prompt (not per beam), with that prompt's horizon
        expected = [sched(t, torch.tensor([float(h)])).item() for t in range(len(out.lam_traces[i]))]
        assert out.lam_traces[i] == pytest.approx(expected, abs=1e-12)


def test_beam_search_lam_zero_equals_plain_beam(model, adapter, head, prompts):
    settings = GenerationSettings(strategy="beam", num_beams=3, max_new_tokens=4)
    plain = run(model, prompts, settings)
    zero = run(model, prompts, settings, **pema_kw(model, adapter, head, Schedule("constant", lam=0.0), [4] * 4))
    assert zero.token_ids == plain.token_ids


def test_sampling_with_pema_is_reproducible(model, adapter, head, prompts):
    sched = Schedule("constant", lam=0.5)
    s7 = GenerationSettings(strategy="sample", max_new_tokens=6, seed=7)
    a = run(model, prompts, s7, **pema_kw(model, adapter, head, sched, [4] * 4))
    b = run(model, prompts, s7, **pema_kw(model, adapter, head, sched, [4] * 4))
    c = run(model, prompts, GenerationSettings(strategy="sample", max_new_tokens=6, seed=8),
            **pema_kw(model, adapter, head, sched, [4] * 4))
    assert len(a.token_ids) == len(prompts)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # deterministic given the seeds; shows the seed matters


def test_sampling_lam_zero_equals_plain_sampling(model, adapter, head, prompts):
    s = GenerationSettings(strategy="sample", max_new_tokens=5, seed=3)
    plain = run(model, prompts, s)
    zero = run(model, prompts, s, **pema_kw(model, adapter, head, Schedule("constant", lam=0.0), [4] * 4))
    assert zero.token_ids == plain.token_ids


# ----------------------------------------------------------------------------------------------------------------
# Gradual Unrolling per row
# ----------------------------------------------------------------------------------------------------------------

def test_lam_for_per_row_horizons(adapter, head):
    sched = Schedule("gu_quadratic", lam_max=0.9, floor=0.0)
    proc = PemaLogitsProcessor(adapter, head, lambda: None, sched, torch.tensor([2.0, 5.0]), prompt_length=3)
    a, b = sched(1, torch.tensor([2.0])).item(), sched(1, torch.tensor([5.0])).item()
    assert a == pytest.approx(0.2025) and b == pytest.approx(0.5184)  # (0.9 * 0.5)^2, (0.9 * 0.8)^2
    assert proc.lam_for(1, 2).tolist() == [a, b]
    assert proc.lam_for(1, 6).tolist() == [a, a, a, b, b, b]  # beams of a row are contiguous
    with pytest.raises(ValueError):
        proc.lam_for(1, 3)


@pytest.mark.parametrize("batch_size", [16, 2])
def test_rows_of_different_lengths_get_their_own_lam_traces(model, adapter, head, prompts, batch_size):
    sched = Schedule("gu_quadratic", lam_max=0.9, floor=0.1)
    horizons = [2, 7, 4, 1]  # prompt lengths 5, 9, 3, 7: sorted order differs from input order
    settings = GenerationSettings(strategy="greedy", max_new_tokens=6, batch_size=batch_size)
    out = run(model, prompts, settings, **pema_kw(model, adapter, head, sched, horizons))
    for i, h in enumerate(horizons):
        trace = out.lam_traces[i]
        # one lambda per step the row itself took: its tokens plus the stop token (unless it hit max_new_tokens)
        assert len(trace) == min(len(out.token_ids[i]) + 1, settings.max_new_tokens)
        expected = [sched(t, torch.tensor([float(h)])).item() for t in range(len(trace))]
        assert trace == pytest.approx(expected, abs=1e-12), (i, h)
    assert out.lam_traces[0] != out.lam_traces[1]


# ----------------------------------------------------------------------------------------------------------------
# the processor itself
# ----------------------------------------------------------------------------------------------------------------

def test_processor_output_is_normalized_mixture(adapter, head):
    torch.manual_seed(0)
    rows, prompt_len = 4, 3
    keys = torch.randn(rows, head.d)
    scores = 3 * torch.randn(rows, VOCAB)
    sched = Schedule("gu_linear", lam_max=0.8, floor=0.1)
    horizons = torch.tensor([2.0, 4.0, 6.0, 10.0])
    proc = PemaLogitsProcessor(adapter, head, lambda: keys, sched, horizons, prompt_length=prompt_len)
    input_ids = torch.zeros(rows, prompt_len + 1, dtype=torch.long)  # t = 1
    out = proc(input_ids, scores.clone())
    lam = sched(1, horizons)
    assert ((lam > 0) & (lam < 1)).all()
    # normalized log-probs (float32: 1e-5)
    torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(rows), atol=1e-5, rtol=0)
    expected = torch.log((1 - lam[:, None]) * torch.softmax(scores.double(), -1)
                         + lam[:, None] * adapter.log_probs(keys, head).double().exp())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert proc.lam_trace[-1].tolist() == lam.tolist()


def test_processor_lam_extremes(adapter, head):
    torch.manual_seed(1)
    keys, scores = torch.randn(2, head.d), torch.randn(2, VOCAB)
    ids = torch.zeros(2, 5, dtype=torch.long)
    zero = PemaLogitsProcessor(adapter, head, lambda: keys, Schedule("constant", lam=0.0), torch.tensor([3.0, 3.0]), 5)
    assert torch.equal(zero(ids, scores), scores)
    one = PemaLogitsProcessor(adapter, head, lambda: keys, Schedule("constant", lam=1.0), torch.tensor([3.0, 3.0]), 5)
    assert torch.equal(one(ids, scores), interpolate(torch.log_softmax(scores, -1), adapter.log_probs(keys, head), 1.0))
    torch.testing.assert_close(one(ids, scores), adapter.log_probs(keys, head), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------

def test_missing_schedule_is_rejected(model, adapter, head, prompts):
    kw = pema_kw(model, adapter, head, Schedule(), [4] * 4)
    kw["schedule"] = None
    with pytest.raises(ValueError, match="schedule"):
        run(model, prompts, GREEDY, **kw)
    for missing in ("head", "key_source", "horizons"):
        kw = pema_kw(model, adapter, head, Schedule(), [4] * 4)
        kw[missing] = None
        with pytest.raises(ValueError):
            run(model, prompts, GREEDY, **kw)


def test_horizon_count_mismatch_is_rejected(model, adapter, head, prompts):
    with pytest.raises(ValueError, match="horizons"):
        run(model, prompts, GREEDY, **pema_kw(model, adapter, head, Schedule(), [4] * 3))


def test_empty_prompt_and_bad_strategy_are_rejected(model, prompts):
    with pytest.raises(ValueError):
        run(model, prompts + [[]], GREEDY)
    with pytest.raises(ValueError):
        run(model, prompts, GenerationSettings(strategy="topk"))


# ----------------------------------------------------------------------------------------------------------------
# length caps and the stop decision inside generate()
# ----------------------------------------------------------------------------------------------------------------

def test_length_caps_bound_every_row_with_and_without_pema(model, adapter, head, prompts):
    """Without a cap the tiny model runs to max_new_tokens; with caps [1, 2, 3, 4] no row is longer than its cap,
    and a row that its cap does not reach is the uncapped output (zero-shot and PEMA alike)."""
    long = GenerationSettings(strategy="greedy", max_new_tokens=12, batch_size=16)
    caps = torch.tensor([1, 2, 3, 40])
    for kw in ({}, pema_kw(model, adapter, head, Schedule("constant", lam=0.5), [4] * 4)):
        free = run(model, prompts, long, **kw)
        capped = run(model, prompts, long, length_caps=caps, **kw)
        for row, (f, c) in enumerate(zip(free.token_ids, capped.token_ids)):
            assert len(c) <= int(caps[row])
            assert c == f[: int(caps[row])]
    with pytest.raises(ValueError, match="length_caps"):
        run(model, prompts, long, length_caps=torch.tensor([1, 2]))


def test_stop_lam_one_lets_the_second_distribution_alone_decide_to_stop(model, prompts):
    """A scorer whose distribution puts 0.99 on the stop token: with stop_lam = 1 every row stops at once even at
    token lam = 0.001; without stop_lam the same mixture (P(stop) <= 0.001 + P_LM(stop)) lets rows run on."""
    def stopper(key):
        logp = torch.full((key.shape[0], VOCAB), math.log(0.01 / (VOCAB - 1)))
        logp[:, STOP] = math.log(0.99)
        return logp

    settings = GenerationSettings(strategy="greedy", max_new_tokens=6, batch_size=16)
    kw = dict(scorer=stopper, key_source=ContextTap(model), horizons=torch.full((4,), 4.0, dtype=torch.float64))
    own = run(model, prompts, settings, schedule=Schedule("constant", lam=0.001, stop_lam=1.0), **kw)
    assert own.token_ids == [[] for _ in prompts]
    shared = run(model, prompts, settings, schedule=Schedule("constant", lam=0.001), **kw)
    assert any(len(s) > 0 for s in shared.token_ids)
