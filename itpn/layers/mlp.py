"""Two-layer per-token MLP: the feed-forward of every block and the whole of a C-MLP block
(iTPN paper, section 3.2; HiViT stages 1-2)."""

from __future__ import annotations

import torch
from torch import nn

from .linear import ScaledLinear


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form, as the reference) -> fc2. Acts on the last dim only, so
    it never mixes tokens or inner sub-patches. ``out_scale``: a per-channel gain on the
    output (layer scale), folded into fc2 (see linear.py)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = ScaledLinear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = ScaledLinear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)), out_scale)
