"""LayerNorm defaults shared by every iTPN module (reference doc, section 1)."""

from __future__ import annotations

from torch import nn

#: eps of every LayerNorm in the backbone, pyramid, heads and decoder.
LN_EPS = 1e-6
#: eps inside the two auxiliary CLIP blocks (the released code builds them with torch's default).
AUX_LN_EPS = 1e-5


def layer_norm(dim: int, eps: float = LN_EPS) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps)

