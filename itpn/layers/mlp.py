"""Two-layer per-token MLP: the feed-forward of every block and the whole of a C-MLP block
(iTPN paper, section 3.2; HiViT stages 1-2)."""

from __future__ import annotations

import torch
from torch import nn

from . import fused_mlp
from .linear import ScaledLinear


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form, as the reference) -> fc2. Acts on the last dim only, so
    it never mixes tokens or inner sub-patches. ``out_scale``: a per-channel gain on the
    output (layer scale), folded into fc2 (see linear.py).

    ``fused`` (set by the engine, off by default): the same product with GELU and fc1's bias
    gradient in the epilogues of fc1's and fc2's GEMMs (fused_mlp.py), wherever the kernels
    can run (``fused_reason``); elsewhere, and with FP8 linears, the separate kernels."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = ScaledLinear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = ScaledLinear(hidden_dim, out_dim or dim)
        self.fused = False

    def fused_reason(self, device, dtype: torch.dtype) -> str | None:
        """Why the fused path would not run for inputs of ``dtype`` on ``device`` (None: it would)."""
        if self.fc1.fp8 or self.fc2.fp8:
            return "FP8 linears"
        return fused_mlp.unusable_reason(device, dtype, self.fc1.in_features, self.fc1.out_features,
                                         self.fc2.out_features)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused:
            # Under autocast the Linears would run in its dtype: so do the kernels.
            kind = x.device.type
            # (A fixed list of devices: dynamo on torch 2.11 cannot trace torch.amp.is_autocast_available;
            # the meta device, which the roofline uses, has no autocast to ask about.)
            autocast = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)
            dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
            if self.fused_reason(x.device, dtype) is None:
                w2, b2 = self.fc2.scaled(out_scale)
                return fused_mlp.fused_mlp(*(t.to(dtype) for t in (x, self.fc1.weight, self.fc1.bias, w2, b2)))
        return self.fc2(self.act(self.fc1(x)), out_scale)
