"""A Linear whose output can carry a per-channel gain folded into its weight: the residual
branches' output projections (attention ``proj``, MLP ``fc2``) under layer scale (CaiT;
iTPN's CLIP recipes, paper Table 9).

``linear(x, scale)`` equals ``scale * linear(x)`` but is computed as
``x @ (scale[:, None] * W)^T + scale * b``. The gradient of ``scale`` is then a reduction over
the (out, in) weight instead of over every token of the batch, and the branch output is no
longer saved for the backward: one (B, N, C) activation per residual branch less. What it
saves instead is the scaled weight, where the plain Linear would have saved the weight
parameter itself (no autocast, e.g. DeepSpeed's bf16): (out, in) elements per branch, which
a batch of more than a few images outweighs (iTPN-L: 5.9 MB per block against 0.6 MB per
image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) with an optional output gain.

    The product with ``scale`` happens inside this module's own forward, so a ZeRO-3 engine,
    which gathers a module's parameters around that module's forward, sees the weight used
    where it is gathered."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias * scale
        return F.linear(x, self.weight * scale[:, None], bias)  # (out, in) scaled by row
