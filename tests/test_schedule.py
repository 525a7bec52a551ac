"""Tests of pema.adapter.schedule: lambda schedules (constant, Gradual Unrolling), horizons and the log-space mix."""

import math

import pytest
import torch

from pema.adapter.schedule import Schedule, estimate_horizons, interpolate
from pema.errors import ScheduleError

H10 = torch.tensor([10.0])


def lam(schedule, t, horizons=H10):
    return schedule(t, horizons).tolist()


# ----------------------------------------------------------------------------------------------------------------
# values vs hand-computed numbers (all float64: tolerance 1e-12)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t, expected", [
    (0, 0.81),        # (0.9 * 1)^2
    (1, 0.6561),      # (0.9 * 0.9)^2
    (5, 0.2025),      # (0.9 * 0.5)^2
    (9, 0.0081),      # (0.9 * 0.1)^2
    (10, 0.0),
    (11, 0.0),
    (100, 0.0),
])
def test_gu_quadratic_hand_values(t, expected):
    s = Schedule("gu_quadratic", lam_max=0.9, floor=0.0)
    assert lam(s, t) == pytest.approx([expected], abs=1e-12)


@pytest.mark.parametrize("t, expected", [
    (0, 0.829),       # 0.1 + 0.9 * 0.81
    (5, 0.28225),     # 0.1 + 0.9 * 0.2025
    (10, 0.1),
    (50, 0.1),
])
def test_gu_quadratic_with_floor(t, expected):
    s = Schedule("gu_quadratic", lam_max=0.9, floor=0.1)
    assert lam(s, t) == pytest.approx([expected], abs=1e-12)


@pytest.mark.parametrize("t, expected", [
    (0, 0.8),
    (2, 0.64),        # 0.8 * 0.8
    (5, 0.4),
    (10, 0.0),
    (12, 0.0),
])
def test_gu_linear_hand_values(t, expected):
    s = Schedule("gu_linear", lam_max=0.8, floor=0.0)
    assert lam(s, t) == pytest.approx([expected], abs=1e-12)


def test_gu_linear_with_floor():
    s = Schedule("gu_linear", lam_max=0.8, floor=0.25)
    # 0.25 + 0.75 * 0.8 * 0.5 = 0.55; past H the floor
    assert lam(s, 5) == pytest.approx([0.55], abs=1e-12)
    assert lam(s, 30) == pytest.approx([0.25], abs=1e-12)


def test_constant_ignores_t_and_horizon():
    s = Schedule("constant", lam=0.35)
    for t in (0, 3, 10, 1000):
        assert lam(s, t, torch.tensor([1.0, 7.0, 500.0])) == [0.35, 0.35, 0.35]


def test_output_is_float64_per_row():
    out = Schedule()(0, torch.tensor([3, 4]))
    assert out.dtype == torch.float64 and out.shape == (2,)


def test_gu_is_monotone_non_increasing_and_in_unit_interval():
    s = Schedule("gu_quadratic", lam_max=1.0, floor=0.2)
    values = [lam(s, t, torch.tensor([7.0]))[0] for t in range(20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(1.0, abs=1e-12) and values[-1] == pytest.approx(0.2, abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in values)


# ----------------------------------------------------------------------------------------------------------------
# per row
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gu_quadratic", "gu_linear"])
def test_rows_do_not_affect_each_other(kind):
    s = Schedule(kind, lam_max=0.9, floor=0.05)
    horizons = torch.tensor([4.0, 13.0, 1.0])
    for t in range(16):
        together = s(t, horizons)
        for i, h in enumerate(horizons.tolist()):
            alone = s(t, torch.tensor([h]))
            assert together[i].item() == alone.item()
    # and the rows really differ (the test above is not vacuous)
    assert len(set(s(2, horizons).tolist())) == 3


def test_per_row_t():
    s = Schedule("gu_quadratic", lam_max=0.9, floor=0.0)
    out = s(torch.tensor([0, 5, 20]), torch.tensor([10.0, 10.0, 10.0]))
    assert out.tolist() == pytest.approx([0.81, 0.2025, 0.0], abs=1e-12)


@pytest.mark.parametrize("bad", [[0.0], [3.0, -1.0]])
def test_non_positive_horizon_is_rejected(bad):
    with pytest.raises(ScheduleError):
        Schedule()(0, torch.tensor(bad))


# ----------------------------------------------------------------------------------------------------------------
# Schedule validation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(lam_max=1.5), dict(lam_max=-0.1), dict(lam=1.2), dict(lam=-0.01), dict(floor=1.01),
    dict(lam=float("nan")), dict(lam_max=True), dict(lam="0.5"), dict(kind="cosine"),
])
def test_bad_schedule_parameters(kwargs):
    with pytest.raises(ScheduleError):
        Schedule(**kwargs)


def test_schedule_error_is_a_value_error():
    with pytest.raises(ValueError):
        Schedule(lam_max=1.5)


# ----------------------------------------------------------------------------------------------------------------
# estimate_horizons
# ----------------------------------------------------------------------------------------------------------------

def test_estimate_horizons_ceil_and_min_one():
    out = estimate_horizons([10, 3, 0, 1, 7], 1.25)
    # ceil(12.5)=13, ceil(3.75)=4, max(1, 0)=1, ceil(1.25)=2, ceil(8.75)=9
    assert out.tolist() == [13.0, 4.0, 1.0, 2.0, 9.0]
    assert out.dtype == torch.float64
    assert estimate_horizons([4], 0.5).tolist() == [2.0]  # exact product is not rounded up
    assert estimate_horizons([1], 0.01).tolist() == [1.0]


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("inf"), float("nan")])
def test_estimate_horizons_bad_ratio(ratio):
    with pytest.raises(ScheduleError):
        estimate_horizons([5], ratio)


# ----------------------------------------------------------------------------------------------------------------
# interpolate
# ----------------------------------------------------------------------------------------------------------------

def dists(rows=3, vocab=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(2 * torch.randn(rows, vocab, generator=g, dtype=dtype), -1)
    lq = torch.log_softmax(2 * torch.randn(rows, vocab, generator=g, dtype=dtype), -1)
    return lp, lq


def test_interpolate_lam_zero_and_one_are_exact():
    lp, lq = dists()
    assert torch.equal(interpolate(lp, lq, 0.0), lp)
    assert torch.equal(interpolate(lp, lq, 1.0), lq)
    assert torch.equal(interpolate(lp, lq, torch.zeros(3)), lp)
    assert torch.equal(interpolate(lp, lq, torch.ones(3)), lq)
    mixed_rows = interpolate(lp, lq, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(mixed_rows[0], lp[0]) and torch.equal(mixed_rows[1], lq[1]) and torch.equal(mixed_rows[2], lp[2])


def test_interpolate_lam_zero_exact_in_float32_too():
    lp, lq = dists(dtype=torch.float32)
    assert torch.equal(interpolate(lp, lq, 0.0), lp)
    assert torch.equal(interpolate(lp, lq, 1.0), lq)


@pytest.mark.parametrize("value", [0.3, 0.5, 0.999])
def test_interpolate_matches_probability_space_mixture(value):
    lp, lq = dists()
    out = interpolate(lp, lq, value)
    expected = torch.log((1 - value) * lp.exp() + value * lq.exp())
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # float64: 1e-6 is generous
    torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_interpolate_per_row_lambda():
    lp, lq = dists()
    lam_rows = torch.tensor([0.1, 0.6, 0.9])
    out = interpolate(lp, lq, lam_rows)
    for i, v in enumerate(lam_rows.tolist()):
        expected = torch.log((1 - v) * lp[i].exp() + v * lq[i].exp())
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def test_interpolate_keeps_neg_inf_of_lm():
    lp, lq = dists()
    lp = lp.clone()
    lp[0, 3] = float("-inf")
    lp[2, [0, 5]] = float("-inf")
    out = interpolate(lp, lq, 0.4)
    assert torch.isneginf(out[0, 3]) and torch.isneginf(out[2, 0]) and torch.isneginf(out[2, 5])
    assert torch.isfinite(out[1]).all()
    # untouched entries keep the mixture value (tolerance 1e-6, float64)
    expected = torch.log(0.6 * lp[0, 4].exp() + 0.4 * lq[0, 4].exp())
    assert out[0, 4].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0, [0.0, 1.0, 0.7]])
def test_interpolate_masked_entries_stay_neg_inf_at_every_lambda(lam):
    """Every entry an earlier processor banned (-inf in log P_LM) stays -inf, lam = 0 and lam = 1 included (lam = 1
    once returned log P_PEMA unmasked); every other entry equals the probability-space mixture (1e-6, float64)."""
    lp, lq = dists()
    lp = lp.clone()
    banned = [(0, 3), (1, 0), (1, 7), (2, 5)]
    for r, c in banned:
        lp[r, c] = float("-inf")
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    out = interpolate(lp, lq, lam_t)
    rows = lam_t.expand(lp.shape[0]) if lam_t.dim() == 0 else lam_t
    for r, c in banned:
        assert torch.isneginf(out[r, c]), (r, c)
    for r in range(lp.shape[0]):
        v = float(rows[r])
        expected = torch.log((1 - v) * lp[r].exp() + v * lq[r].exp())
        keep = torch.isfinite(lp[r])
        torch.testing.assert_close(out[r][keep], expected[keep], atol=1e-6, rtol=0)


def test_interpolate_no_nan_where_pema_is_neg_inf():
    lp, lq = dists()
    lq = lq.clone()
    lq[1, 2] = float("-inf")
    out = interpolate(lp, lq, 0.5)
    assert not torch.isnan(out).any()
    assert out[1, 2].item() == pytest.approx(math.log(0.5) + lp[1, 2].item(), abs=1e-9)


@pytest.mark.parametrize("bad", [1.2, -0.1, float("nan")])
def test_interpolate_rejects_lambda_outside_unit_interval(bad):
    lp, lq = dists()
    with pytest.raises(ScheduleError):
        interpolate(lp, lq, bad)
    with pytest.raises(ScheduleError):
        interpolate(lp, lq, torch.tensor([0.5, bad, 0.5]))


def test_interpolate_rejects_wrong_lambda_shape():
    lp, lq = dists()
    with pytest.raises(ScheduleError):
        interpolate(lp, lq, torch.tensor([0.5, 0.5]))
