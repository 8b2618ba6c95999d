"""Stochastic depth (Huang et al., 2016), used in every iTPN block (paper, Tables 8-9)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability ``p`` while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # One Bernoulli draw per sample, broadcast over every other dim: (B, 1, ..., 1).
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
