"""Exact RCT (pema.adapter.rct_exact) against naive references, and the mixture objective of phase 2."""
import math

import pytest
import torch

from pema.adapter.model import PemaAdapter
from pema.adapter.rct_exact import fit_rct_exact, key_second_moment, principal_basis
from pema.adapter.train import mixture_nll


def keys(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    # anisotropic keys with a non-zero mean, as the RMS-normalized keys are
    scales = torch.linspace(3.0, 0.1, d)
    return torch.randn(n, d, generator=g) * scales + 0.5


def batches(k, size=64):
    return [{"key": k[i:i + size]} for i in range(0, len(k), size)]


def test_second_moment_matches_one_matmul():
    k = keys()
    total, n = key_second_moment(batches(k, 37))
    assert n == len(k)
    torch.testing.assert_close(total, k.double().T @ k.double(), atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("rank", [1, 4, 11])
def test_exact_rct_equals_truncated_svd_reconstruction(rank):
    """B_rct s A k equals the rank-r truncated SVD of K (Eckart-Young), to 1e-4 in float32."""
    k = keys()
    adapter = PemaAdapter(k.shape[1], rank, alpha=2.0 * rank, dropout=0.0).eval()
    fit_rct_exact(adapter, batches(k))
    with torch.no_grad():
        k_hat, _ = adapter(k, pd=False)
    U, S, Vh = torch.linalg.svd(k.double(), full_matrices=False)
    reference = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    torch.testing.assert_close(k_hat.double(), reference, atol=1e-4, rtol=0)
    # and no other rank-r linear autoencoder does better: SGD from a random start ends above it
    mse_exact = torch.mean((k_hat - k) ** 2).item()
    sgd = PemaAdapter(k.shape[1], rank, alpha=2.0 * rank, dropout=0.0)
    opt = torch.optim.Adam([sgd.A, sgd.B_rct], lr=1e-2)
    for _ in range(300):
        loss = torch.mean((sgd(k, pd=False)[0] - k) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mse_exact <= loss.item() + 1e-6


def test_exact_rct_full_rank_is_identity_and_extra_rank_is_zero():
    k = keys(d=8)
    for rank in (8, 11):
        adapter = PemaAdapter(8, rank, alpha=1.0, dropout=0.0).eval()
        fit_rct_exact(adapter, batches(k))
        with torch.no_grad():
            torch.testing.assert_close(adapter(k, pd=False)[0], k, atol=1e-4, rtol=0)
    basis = principal_basis(k.double().T @ k.double(), 11)
    assert torch.equal(basis[:, 8:], torch.zeros(8, 3, dtype=torch.float64))


def test_exact_rct_bad_input():
    with pytest.raises(ValueError, match="empty"):
        key_second_moment([])
    with pytest.raises(ValueError, match="width"):
        fit_rct_exact(PemaAdapter(5, 2), batches(keys(d=6)))
    with pytest.raises(ValueError, match="square"):
        principal_basis(torch.zeros(3, 4), 2)


def test_mixture_nll_matches_probability_space_reference():
    g = torch.Generator().manual_seed(1)
    lp, lq = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    y = torch.tensor([0, 3, 8, 2, 2, 5])
    for lam in (0.1, 0.5, 0.9, 1.0):
        p_lm, p_pema = torch.softmax(lp.double(), -1), torch.softmax(lq.double(), -1)
        expected = -torch.log((1 - lam) * p_lm[range(6), y] + lam * p_pema[range(6), y]).mean()
        assert mixture_nll(lq.double(), lp.double(), y, lam).item() == pytest.approx(expected.item(), abs=1e-10)
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="mixture lam"):
            mixture_nll(lq, lp, y, bad)


def test_mixture_nll_gradient_reaches_pema_only():
    g = torch.Generator().manual_seed(2)
    lq = torch.randn(4, 7, generator=g, requires_grad=True)
    lp = torch.randn(4, 7, generator=g)
    y = torch.tensor([1, 2, 3, 4])
    mixture_nll(lq, lp, y, 0.5).backward()
    # naive reference gradient of the mean mixture NLL w.r.t. the PEMA logits
    p, q = torch.softmax(lp, -1), torch.softmax(lq.detach(), -1)
    mix = 0.5 * p[range(4), y] + 0.5 * q[range(4), y]
    w = (0.5 * q[range(4), y] / mix)[:, None]  # the posterior weight of PEMA for the gold token
    onehot = torch.nn.functional.one_hot(y, 7).float()
    expected = -(w * (onehot - q)) / 4
    torch.testing.assert_close(lq.grad, expected, atol=1e-6, rtol=0)
    assert math.isfinite(lq.grad.sum().item())
