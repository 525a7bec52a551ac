"""Context responses: the PLM owner's answer to a context is its key f(c) (and, from the model's own forward,
its next-token logits).

:class:`ContextTap` hooks the PLM's final norm and keeps the norm's input of the latest forward pass, so both
teacher-forced memory building and step-by-step generation read keys without computing anything twice.
"""
from __future__ import annotations

import torch
from torch import nn

from pema.formats.keys import normalize
from pema.owner.plm import head_modules


class ContextTap:
    """Context manager that records the final norm's input on every forward of ``model``.

    ``keys()`` -> (batch, seq, d) float32 keys of the latest forward; ``last_key()`` -> (batch, d) keys of its last
    position (the context that the next token is predicted from).
    """

    def __init__(self, model: nn.Module):
        heads = head_modules(model)
        self.norm_type, self.eps, self._norm = heads.norm_type, heads.eps, heads.norm
        self._handle = None
        self._hidden: torch.Tensor | None = None

    def _hook(self, _module, args):
        self._hidden = args[0]

    def __enter__(self) -> "ContextTap":
        if self._handle is not None:
            raise RuntimeError("ContextTap is already attached")
        self._handle = self._norm.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._hidden = None, None

    def _latest(self) -> torch.Tensor:
        if self._hidden is None:
            raise RuntimeError("no forward pass was recorded: run the model inside `with ContextTap(model):`")
        return self._hidden

    def hidden(self) -> torch.Tensor:
        """The raw final-norm input of the latest forward, (batch, seq, d) in the model's dtype."""
        return self._latest()

    def keys(self) -> torch.Tensor:
        return normalize(self._latest(), self.norm_type, self.eps)

    def last_key(self) -> torch.Tensor:
        return normalize(self._latest()[:, -1, :], self.norm_type, self.eps)


def left_padded(prompts, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` (rows, longest prompt) of token-id ``prompts``, left-padded with ``pad_id`` (mask 0) as
    ``generate()`` pads a decoder-only model's prompts, on ``device``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask, as ``generate()`` sets them: padding does not count."""
    return (mask.cumsum(-1) - 1).clamp_min(0)
