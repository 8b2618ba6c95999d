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

``fp8 = True`` (set by the engine on the transformer blocks' linears, off by default) runs the
three matmuls of the Linear in FP8 (fp8.py); the gain, if any, is still folded into the weight
first, so it scales the weight before the weight is quantised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import check_fp8_shape, fp8_linear


class ScaledLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) with an optional output gain.

    The product with ``scale`` happens inside this module's own forward, so a ZeRO-3 engine,
    which gathers a module's parameters around that module's forward, sees the weight used
    where it is gathered. ``fp8``: FP8 matmuls (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._fp8 = False

    @property
    def fp8(self) -> bool:
        return self._fp8

    @fp8.setter
    def fp8(self, enable: bool) -> None:
        if enable:
            check_fp8_shape(self.in_features, self.out_features)
        self._fp8 = bool(enable)

    def scaled(self, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias with the output gain folded in (the parameters themselves
        without one). Under ZeRO-3, a caller other than this module's forward must have them
        gathered (Mlp's fused path: ``register_external_parameter``)."""
        weight, bias = self.weight, self.bias
        if scale is not None:
            weight = weight * scale[:, None]  # (out, in) scaled by row
            bias = None if bias is None else bias * scale
        return weight, bias

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.scaled(scale)
        return fp8_linear(x, weight, bias) if self._fp8 else F.linear(x, weight, bias)
