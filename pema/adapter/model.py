"""The PEMA adapter: A (r x d), B_rct (d x r), B_pd (d x r), scale s = alpha / r, input dropout p.

    u     = s * A dropout(k)          (batch, r)
    k_hat = B_rct u                   (batch, d)   reconstruction (RCT)
    h     = B_pd u                    (batch, d)   fed to the PLM's output head: log P_PEMA = log_softmax(head(h))

With ``mlp_hidden`` = m > 0 (``adapter.mlp_hidden``), the non-linear residual variant adds a one-hidden-layer
path to the prediction branch and keeps the head-only contract (the head still maps h to the PLM's vocabulary):

    h     = B_pd u + W_2 gelu(W_1 dropout(k))     W_1 (m x d), W_2 (d x m), W_2 = 0 at the start

so training starts exactly at the linear adapter and the residual learns what a linear map of the key cannot.

Pure torch.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class PemaAdapter(nn.Module):
    def __init__(self, d: int, rank: int, alpha: float = 1.0, dropout: float = 0.2, mlp_hidden: int = 0):
        super().__init__()
        if d <= 0 or rank <= 0 or mlp_hidden < 0:
            raise ValueError(f"d and rank must be > 0 and mlp_hidden >= 0, got d={d}, rank={rank}, "
                             f"mlp_hidden={mlp_hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.d, self.rank, self.alpha, self.p = d, rank, float(alpha), float(dropout)
        self.scale = self.alpha / rank
        self.A = nn.Parameter(torch.empty(rank, d))
        self.B_rct = nn.Parameter(torch.empty(d, rank))
        self.B_pd = nn.Parameter(torch.empty(d, rank))
        self.dropout = nn.Dropout(dropout)
        self.mlp_hidden = int(mlp_hidden)
        if self.mlp_hidden:
            self.W_1 = nn.Parameter(torch.empty(self.mlp_hidden, d))
            self.W_2 = nn.Parameter(torch.zeros(d, self.mlp_hidden))
            nn.init.kaiming_uniform_(self.W_1, a=math.sqrt(5))
        self.reset_A()
        self.reset_B("B_rct")
        self.reset_B("B_pd")

    def reset_A(self) -> None:
        """nn.Linear's default initialisation (uniform in +-1/sqrt(d))."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def reset_B(self, name: str, mode: str = "random") -> None:
        """``random``: nn.Linear default; ``zeros``; ``from_rct``: copy B_rct (B_pd only)."""
        param = getattr(self, name)
        with torch.no_grad():
            if mode == "random":
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            elif mode == "zeros":
                param.zero_()
            elif mode == "from_rct" and name == "B_pd":
                param.copy_(self.B_rct)
            else:
                raise ValueError(f"unknown init mode {mode!r} for {name}")

    def u(self, key: torch.Tensor) -> torch.Tensor:
        """(batch, d) -> (batch, r)."""
        return self.scale * (self.dropout(key) @ self.A.T)

    def reconstruct(self, u: torch.Tensor) -> torch.Tensor:
        return u @ self.B_rct.T

    def pd_hidden(self, u: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, r) -> (batch, d); the residual variant needs the ``key`` (batch, d) too."""
        h = u @ self.B_pd.T
        if self.mlp_hidden:
            if key is None:
                raise ValueError("the residual adapter (mlp_hidden > 0) needs the key")
            h = h + torch.nn.functional.gelu(self.dropout(key) @ self.W_1.T) @ self.W_2.T
        return h

    def forward(self, key: torch.Tensor, rct: bool = True, pd: bool = True):
        """(batch, d) -> (k_hat, h): the reconstruction (batch, d) and the hidden state for the output head
        (batch, d); either is None when not asked for. Training goes through here so that a DDP wrapper sees
        every step."""
        u = self.u(key)
        return (self.reconstruct(u) if rct else None), (self.pd_hidden(u, key) if pd else None)

    def logits(self, key: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """P_PEMA's logits (batch, vocab) for keys (batch, d): the head applied to the prediction branch."""
        return head(self.pd_hidden(self.u(key), key))

    def log_probs(self, key: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """log P_PEMA (batch, vocab) for keys (batch, d)."""
        return torch.log_softmax(self.logits(key, head), dim=-1)
