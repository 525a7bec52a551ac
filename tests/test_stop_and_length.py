"""The stop decision with its own lambda (schedule.own_stop), per-row length caps, and both inside generate()."""
import math

import pytest
import torch

from pema.adapter.decode import LengthCapProcessor
from pema.adapter.schedule import Schedule, interpolate, length_caps, own_stop
from pema.errors import ScheduleError

STOP = 2


def dists(rows=3, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1),
            torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1))


@pytest.mark.parametrize("lam, stop_lam", [(0.5, 0.9), (0.3, 0.0), (0.7, 1.0), (0.0, 0.8), (1.0, 0.2)])
def test_own_stop_matches_two_level_reference(lam, stop_lam):
    """P(stop) is the stop_lam mixture; the other tokens keep the lam mixture's odds and fill the rest (1e-10)."""
    lp, lq = dists()
    mixed = interpolate(lp, lq, lam)
    out = own_stop(mixed, lp, lq, STOP, stop_lam)
    p, q = lp.exp(), lq.exp()
    for r in range(3):
        p_stop = (1 - stop_lam) * p[r, STOP] + stop_lam * q[r, STOP]
        m = (1 - lam) * p[r] + lam * q[r]
        others = [y for y in range(7) if y != STOP]
        expected = torch.empty(7, dtype=torch.float64)
        expected[STOP] = p_stop
        expected[others] = (1 - p_stop) * m[others] / m[others].sum()
        torch.testing.assert_close(out[r].exp(), expected, atol=1e-10, rtol=0)
        assert out[r].exp().sum().item() == pytest.approx(1.0, abs=1e-10)


def test_own_stop_equal_lambdas_is_the_plain_mixture():
    lp, lq = dists()
    mixed = interpolate(lp, lq, 0.6)
    torch.testing.assert_close(own_stop(mixed, lp, lq, STOP, 0.6), mixed, atol=1e-10, rtol=0)


def test_own_stop_keeps_banned_entries_and_a_banned_stop():
    lp, lq = dists()
    lp = lp.clone()
    lp[0, 4] = float("-inf")  # a token banned by no_repeat_ngram
    lp[1, STOP] = float("-inf")  # the stop banned (e.g. a minimum length)
    mixed = interpolate(lp, lq, 0.5)
    out = own_stop(mixed, lp, lq.masked_fill(torch.isneginf(lp), float("-inf")), STOP, 0.9)
    assert torch.isneginf(out[0, 4])
    assert torch.equal(out[1], mixed[1])  # left as it was
    assert not torch.isnan(out).any()


def test_own_stop_all_other_tokens_banned_gives_no_nan():
    lp, lq = dists(rows=1)
    lp = lp.clone()
    lp[0, [y for y in range(7) if y != STOP]] = float("-inf")
    out = own_stop(interpolate(lp, lq, 0.5), lp, lq, STOP, 0.5)
    assert not torch.isnan(out).any()


def test_own_stop_and_schedule_reject_bad_stop_lam():
    lp, lq = dists()
    with pytest.raises(ScheduleError):
        own_stop(lp, lp, lq, STOP, 1.5)
    with pytest.raises(ScheduleError):
        Schedule("constant", lam=0.5, stop_lam=-0.1)


def test_length_caps_hand_values_and_bad_cap():
    caps = length_caps(torch.tensor([1.0, 10.0, 3.3]), 1.5)
    assert caps.tolist() == [2, 15, 5]
    assert caps.dtype == torch.long
    assert length_caps(torch.tensor([0.2]), 0.5).tolist() == [1]
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ScheduleError):
            length_caps(torch.tensor([3.0]), bad)


def test_length_cap_processor_forces_stop_only_at_the_cap():
    proc = LengthCapProcessor(torch.tensor([2, 4]), prompt_length=3, stop_token_id=STOP)
    scores = torch.randn(2, 7)
    ids = torch.zeros(2, 5, dtype=torch.long)  # t = 2 generated tokens
    out = proc(ids, scores.clone())
    assert out[0].argmax().item() == STOP and torch.isneginf(out[0, [0, 1, 3, 4, 5, 6]]).all()
    assert torch.equal(out[1], scores[1])
    # beams: rows = batch * beams, caps repeat per beam
    beams = LengthCapProcessor(torch.tensor([2, 4]), prompt_length=3, stop_token_id=STOP)(
        torch.zeros(4, 5, dtype=torch.long), torch.randn(4, 7))
    assert [beams[r].argmax().item() == STOP for r in range(4)][:2] == [True, True]
