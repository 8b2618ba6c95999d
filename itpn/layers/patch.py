"""Token-layout layers of HiViT and the iTPN pyramid (paper, section 3.2; reference doc,
sections 1 and 5).

Every patch of ``patch_size`` pixels is one token; stages 1-2 carry an inner h x w grid of
sub-patches per token, laid out as (B, N, h, w, C): N patches in raster order, then the
inner grid (row, col). Nothing here mixes information across patches, which is what lets
masked patches be dropped (or hidden) consistently at every level of the pyramid.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import LN_EPS


class PatchEmbed(nn.Module):
    """Conv (kernel = stride = patch/inner) + LayerNorm -> (B, N, inner, inner, C)."""

    def __init__(self, patch_size: int = 16, inner_patches: int = 4, in_chans: int = 3,
                 embed_dim: int = 128, norm_eps: float = LN_EPS):
        super().__init__()
        if patch_size % inner_patches:
            raise ValueError(f"patch_size {patch_size} is not divisible by inner_patches {inner_patches}")
        self.patch_size = patch_size
        self.inner_patches = inner_patches
        k = patch_size // inner_patches
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=k, stride=k)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input size {height}x{width} is not divisible by the patch size "
                             f"{self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        Hp, Wp = self.grid(H, W)
        i = self.inner_patches
        x = self.proj(x)  # (B, C, Hp*i, Wp*i)
        x = x.view(B, -1, Hp, i, Wp, i).permute(0, 2, 4, 3, 5, 1)  # (B, Hp, Wp, i, i, C)
        x = x.reshape(B, Hp * Wp, i, i, -1)  # (B, N, i, i, C)
        return self.norm(x)


class PatchMerge(nn.Module):
    """Halve the inner grid, double the width: (B, N, h, w, C) -> (B, N, h/2, w/2, 2C)."""

    def __init__(self, dim: int, norm_eps: float = LN_EPS):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference concatenates x[..., r::2, c::2, :] in the order (r, c) = (0, 0), (1, 0),
        # (0, 1), (1, 1): channel block 2c + r. Weights depend on that order. One permuted copy
        # gives the same tensor; its gradient is one copy back, where four strided slices and a
        # cat cost four full-size zero fills, four copies and three adds in the backward
        # (docs/performance.md, "Since then (2026-12-07)").
        B, N, h, w, C = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"PatchMerge needs an even inner grid, got {h}x{w}")
        x = x.reshape(B, N, h // 2, 2, w // 2, 2, C)  # (B, N, i, r, j, c, C): row 2i + r, col 2j + c
        x = x.permute(0, 1, 2, 4, 5, 3, 6).reshape(B, N, h // 2, w // 2, 4 * C)  # (B, N, i, j, [c, r, C])
        return self.reduction(self.norm(x))


class PatchSplit(nn.Module):
    """Double the inner grid: (B, N, h, w, C) -> (B, N, 2h, 2w, out_dim).

    LN, Linear(C -> 4*out_dim, no bias); the 4*out_dim output is read as (a, b, out_dim) and
    child (a, b) of inner cell (y, x) lands at (2y + a, 2x + b).
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = LN_EPS):
        super().__init__()
        self.out_dim = out_dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.reduction = nn.Linear(dim, 4 * out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, h, w, _ = x.shape
        x = self.reduction(self.norm(x)).view(B, N, h, w, 2, 2, self.out_dim)  # (B, N, h, w, a, b, C)
        x = x.permute(0, 1, 2, 4, 3, 5, 6)  # (B, N, h, a, w, b, C)
        return x.reshape(B, N, 2 * h, 2 * w, self.out_dim)


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, h, w, C) tokens of a Hp x Wp patch grid -> (B, C, Hp*h, Wp*w) feature map."""
    B, N, h, w, C = x.shape
    Hp, Wp = grid
    if Hp * Wp != N:
        raise ValueError(f"{N} tokens do not fill a {Hp}x{Wp} grid")
    x = x.view(B, Hp, Wp, h, w, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, Hp, h, Wp, w)
    return x.reshape(B, C, Hp * h, Wp * w)
