"""Stochastic depth (Huang et al., 2016), used in every iTPN block (paper, Tables 8-9)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability ``p`` while training.

    The rate is held in a buffer, not a Python float: blocks differ only in their rate, and
    torch.compile specialises on Python attributes, so a float would make every block of
    the linearly growing schedule a separate graph (and exhaust the recompile limit).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.enabled = p > 0.0
        self.register_buffer("keep", torch.tensor(1.0 - float(p)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.training:
            return x
        keep = self.keep.to(x.dtype)
        # One Bernoulli draw per sample, broadcast over every other dim: (B, 1, ..., 1).
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * (torch.rand(shape, device=x.device, dtype=x.dtype) < keep).to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={1.0 - float(self.keep):.4f}"
