"""Tests of pema.adapter.losses and pema.adapter.model against naive reference formulas.

The references are written with explicit Python loops and textbook formulas (MSE = sum of squares / count,
CE = -log(exp(z_y) / sum_j exp(z_j))) so they share no code path with the library (no F.mse_loss,
F.cross_entropy, log_softmax or pema.formats.keys.normalize).
"""

import math

import pytest
import torch

from pema.adapter.head import OutputHead
from pema.adapter.losses import joint_loss, pd_loss, rct_loss
from pema.adapter.model import PemaAdapter
from pema.adapter.train import phase_losses
from pema.errors import ConfigError

D, R, V, N = 12, 4, 17, 5
EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------------------------

def naive_mse(a, b):
    total, count = 0.0, 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            total = total + (a[i, j] - b[i, j]) ** 2
            count += 1
    return total / count


def naive_ce(logits, target):
    total = 0.0
    for i in range(logits.shape[0]):
        z = logits[i]
        denom = 0.0
        for j in range(z.shape[0]):
            denom = denom + torch.exp(z[j])
        total = total - torch.log(torch.exp(z[int(target[i])]) / denom)
    return total / logits.shape[0]


def naive_norm(x, norm_type, eps):
    """Parameter-free final norm of one vector x (d,)."""
    d = x.shape[0]
    if norm_type == "rms":
        ms = sum(x[j] ** 2 for j in range(d)) / d
        return x / torch.sqrt(ms + eps)
    mean = sum(x[j] for j in range(d)) / d
    var = sum((x[j] - mean) ** 2 for j in range(d)) / d
    return (x - mean) / torch.sqrt(var + eps)


def naive_head(h, head_params):
    """logits of one hidden vector h (d,) through norm -> gain/bias -> proj -> lm head."""
    p = head_params
    x = naive_norm(h, p["norm_type"], p["eps"]) * p["g"]
    if p["b"] is not None:
        x = x + p["b"]
    if p["proj"] is not None:
        x = torch.stack([sum(p["proj"][o, j] * x[j] for j in range(x.shape[0])) for o in range(p["proj"].shape[0])])
    logits = torch.stack([sum(p["W"][v, j] * x[j] for j in range(x.shape[0])) for v in range(p["W"].shape[0])])
    if p["c"] is not None:
        logits = logits + p["c"]
    return logits


def naive_losses(A, B_rct, B_pd, scale, keys, tokens, kappa, head_params):
    """The PEMA objective for a batch, computed row by row; returns (loss, rct or None, ce or None)."""
    k_hats, logits = [], []
    for i in range(keys.shape[0]):
        k = keys[i]
        u = torch.stack([scale * sum(A[r, j] * k[j] for j in range(k.shape[0])) for r in range(A.shape[0])])
        k_hats.append(torch.stack([sum(B_rct[j, r] * u[r] for r in range(u.shape[0])) for j in range(B_rct.shape[0])]))
        h = torch.stack([sum(B_pd[j, r] * u[r] for r in range(u.shape[0])) for j in range(B_pd.shape[0])])
        logits.append(naive_head(h, head_params))
    rct = naive_mse(torch.stack(k_hats), keys)
    ce = naive_ce(torch.stack(logits), tokens)
    if kappa == 0:
        return ce, None, ce
    if kappa == 1:
        return rct, rct, None
    return kappa * rct + (1 - kappa) * ce, rct, ce


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------

def make_head(kind, seed=0):
    """``rms``: Llama-like (gain only); ``layer``: OPT-like (gain, bias, projection, LM-head bias)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g) * 0.5
    norm_w = 1.0 + 0.3 * torch.randn(D, generator=g)
    if kind == "rms":
        head = OutputHead(norm_type="rms", eps=EPS, norm_weight=norm_w, lm_head_weight=W)
        params = dict(norm_type="rms", eps=EPS, g=norm_w, b=None, proj=None, W=W, c=None)
    else:
        b = 0.2 * torch.randn(D, generator=g)
        P = torch.randn(D, D, generator=g) / math.sqrt(D)
        c = 0.1 * torch.randn(V, generator=g)
        head = OutputHead(norm_type="layer", eps=EPS, norm_weight=norm_w, norm_bias=b, proj_weight=P,
                          lm_head_weight=W, lm_head_bias=c)
        params = dict(norm_type="layer", eps=EPS, g=norm_w, b=b, proj=P, W=W, c=c)
    head.requires_grad_(False)
    return head, {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D, generator=g)
    keys = keys / keys.pow(2).mean(-1, keepdim=True).sqrt()  # unit-RMS like real keys
    return {"key": keys, "token": torch.randint(0, V, (N,), generator=g)}


def make_adapter(seed=2, alpha=3.0):
    torch.manual_seed(seed)
    return PemaAdapter(D, R, alpha=alpha, dropout=0.0)


# ----------------------------------------------------------------------------------------------------------------
# the pure loss functions (float64, atol 1e-12)
# ----------------------------------------------------------------------------------------------------------------

def test_rct_loss_forward_backward_matches_naive_mse():
    torch.manual_seed(0)
    k_hat = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    key = torch.randn(N, D, dtype=torch.float64)
    lib = rct_loss(k_hat, key)
    (g_lib,) = torch.autograd.grad(lib, k_hat)
    ref = naive_mse(k_hat, key)
    (g_ref,) = torch.autograd.grad(ref, k_hat)
    assert abs(lib.item() - ref.item()) < 1e-12
    torch.testing.assert_close(g_lib, g_ref, atol=1e-12, rtol=0)
    # analytic gradient: 2 (k_hat - k) / (N * D)
    torch.testing.assert_close(g_lib, 2 * (k_hat - key).detach() / (N * D), atol=1e-12, rtol=0)


def test_rct_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        rct_loss(torch.zeros(3, 4), torch.zeros(3, 5))


def test_pd_loss_forward_backward_matches_naive_ce():
    torch.manual_seed(0)
    logits = (3 * torch.randn(N, V, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, V, (N,))
    lib = pd_loss(logits, target)
    (g_lib,) = torch.autograd.grad(lib, logits)
    ref = naive_ce(logits, target)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert abs(lib.item() - ref.item()) < 1e-12
    torch.testing.assert_close(g_lib, g_ref, atol=1e-12, rtol=0)
    # analytic gradient: (softmax - onehot) / N
    p = torch.exp(logits.detach()) / torch.exp(logits.detach()).sum(-1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(N), target] = 1
    torch.testing.assert_close(g_lib, (p - onehot) / N, atol=1e-12, rtol=0)


def test_pd_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pd_loss(torch.zeros(3, V), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        pd_loss(torch.zeros(3, 2, V), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_joint_loss_matches_formula(kappa):
    rct = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    pd = torch.tensor(4.1, dtype=torch.float64, requires_grad=True)
    out = joint_loss(rct, pd, kappa)
    assert abs(out.item() - (kappa * 1.7 + (1 - kappa) * 4.1)) < 1e-12
    g_rct, g_pd = torch.autograd.grad(out, (rct, pd), allow_unused=True)
    assert (0.0 if g_rct is None else g_rct.item()) == pytest.approx(kappa, abs=1e-12)
    assert (0.0 if g_pd is None else g_pd.item()) == pytest.approx(1 - kappa, abs=1e-12)


def test_joint_loss_ends_drop_the_other_term_exactly():
    # at the ends a nan in the unused term must not leak (0 * nan = nan)
    nan = torch.tensor(float("nan"))
    assert joint_loss(torch.tensor(2.0), nan, 1.0).item() == 2.0
    assert joint_loss(nan, torch.tensor(3.0), 0.0).item() == 3.0


@pytest.mark.parametrize("kappa", [-0.1, 1.5, float("nan")])
def test_joint_loss_rejects_kappa_outside_unit_interval(kappa):
    with pytest.raises(ConfigError):
        joint_loss(torch.tensor(1.0), torch.tensor(1.0), kappa)


# ----------------------------------------------------------------------------------------------------------------
# the library path (phase_losses through PemaAdapter + OutputHead) vs the naive objective
# ----------------------------------------------------------------------------------------------------------------
# The library path runs in float32 (phase_losses casts keys to float32, OutputHead stores float32 buffers), so
# float64 is not possible there; the reference runs in float64 on the same (float32) parameter values.
# Tolerances: losses and gradients are O(1e-2..1); float32 rounding over d=12 sums is ~1e-6, so atol 1e-5 +
# rtol 1e-4.

@pytest.mark.parametrize("head_kind", ["rms", "layer"])
@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_phase_losses_forward_and_gradients_match_naive(kappa, head_kind):
    head, head_params = make_head(head_kind)
    batch = make_batch()
    adapter = make_adapter()
    adapter.train()  # dropout=0, so train mode must be deterministic too

    out = phase_losses(adapter, head, batch, "rct_pd", kappa)
    adapter.zero_grad(set_to_none=True)
    out["loss"].backward()
    lib_grads = {n: getattr(adapter, n).grad for n in ("A", "B_rct", "B_pd")}

    params = {n: getattr(adapter, n).detach().double().requires_grad_(True) for n in ("A", "B_rct", "B_pd")}
    ref_loss, ref_rct, ref_ce = naive_losses(params["A"], params["B_rct"], params["B_pd"], adapter.scale,
                                             batch["key"].double(), batch["token"], kappa, head_params)
    ref_grads = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)))

    tol = dict(atol=1e-5, rtol=1e-4)
    assert out["loss"].item() == pytest.approx(ref_loss.item(), abs=1e-5, rel=1e-4)
    if ref_rct is not None:
        assert out["rct"].item() == pytest.approx(ref_rct.item(), abs=1e-5, rel=1e-4)
    else:
        assert "rct" not in out
    if ref_ce is not None:
        assert out["ce"].item() == pytest.approx(ref_ce.item(), abs=1e-5, rel=1e-4)
    else:
        assert "ce" not in out

    for name in ("A", "B_rct", "B_pd"):
        lib, ref = lib_grads[name], ref_grads[name]
        if ref is None:  # the naive objective does not use it at all
            assert lib is None or torch.count_nonzero(lib) == 0, f"{name} got a gradient at kappa={kappa}"
        else:
            assert lib is not None, f"{name} got no gradient at kappa={kappa}"
            torch.testing.assert_close(lib.double(), ref, **tol)
    if kappa == 0.0:
        assert lib_grads["B_rct"] is None or torch.count_nonzero(lib_grads["B_rct"]) == 0
        assert torch.count_nonzero(lib_grads["B_pd"]) > 0
    if kappa == 1.0:
        assert lib_grads["B_pd"] is None or torch.count_nonzero(lib_grads["B_pd"]) == 0
        assert torch.count_nonzero(lib_grads["B_rct"]) > 0


def test_phase_overrides_kappa_for_rct_and_pd_phases():
    head, _ = make_head("rms")
    batch = make_batch()
    adapter = make_adapter()
    rct_only = phase_losses(adapter, head, batch, "rct", 0.3)
    pd_only = phase_losses(adapter, head, batch, "pd", 0.3)
    joint = phase_losses(adapter, head, batch, "rct_pd", 0.3)
    assert set(rct_only) == {"rct", "loss"} and torch.equal(rct_only["loss"], rct_only["rct"])
    assert set(pd_only) == {"ce", "loss"} and torch.equal(pd_only["loss"], pd_only["ce"])
    # float32 arithmetic of the same terms: 1e-6
    assert joint["loss"].item() == pytest.approx(0.3 * joint["rct"].item() + 0.7 * joint["ce"].item(), abs=1e-6)


@pytest.mark.parametrize("kappa", [-0.1, 1.5])
def test_phase_losses_rejects_bad_kappa(kappa):
    head, _ = make_head("rms")
    with pytest.raises(ConfigError):
        phase_losses(make_adapter(), head, make_batch(), "rct_pd", kappa)


# ----------------------------------------------------------------------------------------------------------------
# PemaAdapter
# ----------------------------------------------------------------------------------------------------------------

def test_u_is_scaled_A_times_key_in_eval_mode():
    torch.manual_seed(0)
    adapter = PemaAdapter(D, R, alpha=6.0, dropout=0.5).eval()  # dropout must be off in eval mode
    key = torch.randn(N, D)
    u = adapter.u(key)
    assert u.shape == (N, R)
    expected = torch.stack([(6.0 / R) * (adapter.A.detach() @ key[i]) for i in range(N)])
    torch.testing.assert_close(u.detach(), expected, atol=1e-6, rtol=1e-6)  # float32 matmul, d=12
    k_hat, h = adapter(key)
    torch.testing.assert_close(k_hat.detach(), expected @ adapter.B_rct.detach().T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h.detach(), expected @ adapter.B_pd.detach().T, atol=1e-6, rtol=1e-6)


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    adapter = PemaAdapter(D, R, alpha=R, dropout=0.5)
    key = torch.randn(64, D)
    adapter.eval()
    assert torch.equal(adapter.u(key), adapter.u(key))
    adapter.train()
    assert not torch.equal(adapter.u(key), adapter.u(key))


@pytest.mark.parametrize("head_kind", ["rms", "layer"])
def test_zero_B_pd_gives_the_heads_distribution_at_zero(head_kind):
    head, _ = make_head(head_kind)
    adapter = make_adapter().eval()
    adapter.reset_B("B_pd", "zeros")
    key = make_batch()["key"]
    lp = adapter.log_probs(key, head)
    expected = torch.log_softmax(head(torch.zeros(1, D)), dim=-1).expand(N, V)
    torch.testing.assert_close(lp.detach(), expected, atol=1e-6, rtol=0)  # same float32 ops, 1e-6
    # and it is a normalized distribution
    torch.testing.assert_close(torch.logsumexp(lp, -1).detach(), torch.zeros(N), atol=1e-6, rtol=0)


def test_log_probs_equal_log_softmax_of_head_on_B_pd_u():
    head, head_params = make_head("layer")
    adapter = make_adapter().eval()
    key = make_batch()["key"]
    lp = adapter.log_probs(key, head).detach().double()
    for i in range(N):
        h = adapter.B_pd.detach().double() @ (adapter.scale * adapter.A.detach().double() @ key[i].double())
        z = naive_head(h, head_params)
        ref = z - torch.log(torch.exp(z).sum())
        torch.testing.assert_close(lp[i], ref, atol=1e-5, rtol=1e-4)  # float32 vs float64 reference


def test_reset_B_modes():
    adapter = make_adapter()
    adapter.reset_B("B_pd", "from_rct")
    assert torch.equal(adapter.B_pd, adapter.B_rct)
    assert adapter.B_pd.data_ptr() != adapter.B_rct.data_ptr()  # a copy, not shared storage
    with torch.no_grad():
        adapter.B_rct.add_(1.0)
    assert not torch.equal(adapter.B_pd, adapter.B_rct)
    adapter.reset_B("B_rct", "zeros")
    assert torch.count_nonzero(adapter.B_rct) == 0
    with pytest.raises(ValueError):
        adapter.reset_B("B_rct", "from_rct")
    with pytest.raises(ValueError):
        adapter.reset_B("B_pd", "bogus")


def test_constructor_rejects_bad_arguments():
    for args in [(0, 4), (8, 0)]:
        with pytest.raises(ValueError):
            PemaAdapter(*args)
    with pytest.raises(ValueError):
        PemaAdapter(8, 4, dropout=1.0)
