"""The non-linear residual adapter (``adapter.mlp_hidden``): h = B_pd u + W_2 gelu(W_1 k), against a naive
reference, its start at the linear adapter, which phase trains it, and its bundle round trip. Tolerance 1e-5."""
import math

import pytest
import torch

from pema.adapter.head import OutputHead
from pema.adapter.io import load_adapter, save_adapter
from pema.adapter.model import PemaAdapter
from pema.adapter.train import PhaseData, PhaseHooks, train_phase
from pema.errors import MemoryFormatError

D, R, M = 6, 3, 4


def naive_hidden(ad, k):
    out = []
    for row in k.tolist():
        u = [ad.scale * sum(ad.A[i, j].item() * row[j] for j in range(D)) for i in range(R)]
        g = [sum(ad.W_1[i, j].item() * row[j] for j in range(D)) for i in range(M)]
        g = [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in g]
        out.append([sum(ad.B_pd[a, i].item() * u[i] for i in range(R)) +
                    sum(ad.W_2[a, i].item() * g[i] for i in range(M)) for a in range(D)])
    return torch.tensor(out)


def test_residual_hidden_matches_reference_and_starts_linear():
    torch.manual_seed(0)
    ad = PemaAdapter(D, R, 2.0, 0.0, mlp_hidden=M).eval()
    lin = PemaAdapter(D, R, 2.0, 0.0).eval()
    lin.load_state_dict({k: v for k, v in ad.state_dict().items() if not k.startswith("W_")})
    k = torch.randn(5, D)
    assert torch.allclose(ad(k)[1], lin(k)[1], atol=1e-6)  # W_2 = 0: the linear adapter exactly
    with torch.no_grad():
        ad.W_2.normal_()
    assert torch.allclose(ad(k)[1], naive_hidden(ad, k), atol=1e-5)


def test_pd_phase_trains_the_residual_and_rct_does_not():
    torch.manual_seed(1)
    head = OutputHead(norm_type="rms", eps=1e-6, norm_weight=torch.ones(D), lm_head_weight=torch.randn(11, D))
    ad = PemaAdapter(D, R, 2.0, 0.0, mlp_hidden=M)
    batches = lambda e=0: [{"key": torch.randn(16, D), "token": torch.randint(0, 11, (16,))}]
    w1 = ad.W_1.detach().clone()
    quiet = PhaseHooks(progress=False)
    train_phase(ad, head, PhaseData(batches, 16, batches), phase="rct", epochs=1, lr=0.1, hooks=quiet)
    assert torch.equal(ad.W_1, w1) and not ad.W_2.any()
    train_phase(ad, head, PhaseData(batches, 16, batches), phase="rct_pd", epochs=3, lr=0.1, hooks=quiet)
    assert ad.W_2.abs().sum() > 0


def test_bundle_round_trip_and_a_lying_header(tmp_path):
    torch.manual_seed(2)
    ad = PemaAdapter(D, R, 2.0, 0.0, mlp_hidden=M)
    with torch.no_grad():
        ad.W_2.normal_()
    save_adapter(ad, tmp_path / "a")
    back, meta = load_adapter(tmp_path / "a")
    k = torch.randn(3, D)
    assert meta["mlp_hidden"] == M and torch.allclose(back(k)[1], ad.eval()(k)[1])
    js = tmp_path / "a" / "adapter.json"
    js.write_text(js.read_text().replace(f'"mlp_hidden": {M}', '"mlp_hidden": 5'))
    with pytest.raises(MemoryFormatError, match="mlp_hidden=5"):
        load_adapter(tmp_path / "a")
