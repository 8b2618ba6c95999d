"""The iTPN feature pyramid (paper, section 3.2 and supplementary B; reference doc, section 1).

Built top-down from the backbone's three stages, with no convolution and no attention, so
each output token depends only on its own patch (masked content cannot leak sideways):

    P16 = Linear(s3)                                    (B, N, 1, 1, F)
    P8  = blocks(PatchSplit(s3) + Linear(f2))           (B, N, 2, 2, F)
    P4  = blocks(PatchSplit(P8) + Linear(f1))           (B, N, 4, 4, F)

then one more F-wide MLP block per level. ``f1``/``f2`` are the stage-1/2 features, i.e.
the inputs of the merges that end those stages.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Block, PatchSplit


class FeaturePyramid(nn.Module):
    def __init__(self, in_dims: tuple[int, int, int], fpn_dim: int = 256, depth: int = 2,
                 mlp_ratio: float = 4.0):
        super().__init__()
        c1, c2, c3 = in_dims
        self.fpn_dim = fpn_dim
        self.proj16 = nn.Linear(c3, fpn_dim) if c3 != fpn_dim else nn.Identity()
        self.split16 = PatchSplit(c3, fpn_dim)
        self.lateral8 = nn.Linear(c2, fpn_dim, bias=False)
        self.blocks8 = nn.Sequential(*(Block(fpn_dim, 0, mlp_ratio) for _ in range(depth)))
        self.split8 = PatchSplit(fpn_dim, fpn_dim)
        self.lateral4 = nn.Linear(c1, fpn_dim, bias=False)
        self.blocks4 = nn.Sequential(*(Block(fpn_dim, 0, mlp_ratio) for _ in range(depth)))
        self.out_blocks = nn.ModuleList(Block(fpn_dim, 0, mlp_ratio) for _ in range(3))

    def forward(self, s3: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """s3 (B, n, C3); feats [f1 (B, n, 4, 4, C1), f2 (B, n, 2, 2, C2)]
        -> [P16 (B, n, 1, 1, F), P8 (B, n, 2, 2, F), P4 (B, n, 4, 4, F)]."""
        f1, f2 = feats
        t = s3[:, :, None, None, :]  # (B, n, 1, 1, C3)
        p8 = self.blocks8(self.split16(t) + self.lateral8(f2))
        p4 = self.blocks4(self.split8(p8) + self.lateral4(f1))
        p16 = self.proj16(t)
        return [blk(p) for blk, p in zip(self.out_blocks, (p16, p8, p4))]


class LevelProjection(nn.Module):
    """Per level LN + Linear to ``out_dim / (h*w)`` per child, flattened in (h, w, C) order so
    every level becomes one ``out_dim`` vector per patch and the levels can be summed
    (the pixel decoder's and the CLIP head's input; reference doc, sections 2 and 5)."""

    def __init__(self, fpn_dim: int, out_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        if out_dim % 16:
            raise ValueError(f"output width {out_dim} must be divisible by 16 (4x4 children at stride 4)")
        self.levels = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(fpn_dim, eps=norm_eps), nn.Linear(fpn_dim, out_dim // (4 ** i)))
            for i in range(3))

    def forward(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        """[P16, P8, P4] (B, n, h, w, F) -> three (B, n, out_dim) tensors."""
        return [proj(p).flatten(2) for proj, p in zip(self.levels, pyramid)]
