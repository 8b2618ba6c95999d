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
        # One Bernoulli draw per sample, broadcast over every other dim: (B, 1, ..., 1). Drawn,
        # divided and applied in fp32, then cast back once: in bf16 the draw's 8-bit grid and a
        # twice-rounded 1 / keep scaled the kept branches by up to ~0.5% too much on average
        # (e.g. keep 0.9: 1.1172 instead of 1.1111), a train / eval mismatch per block.
        # (A bf16 engine casts the buffer too; the draw and the division then use the same
        # rounded keep, so the mean stays exactly 1.)
        keep = self.keep.float()
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        scale = (torch.rand(shape, device=x.device) < keep).float() / keep  # (B, 1, ..., 1) fp32
        return (x.float() * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={1.0 - float(self.keep):.4f}"
