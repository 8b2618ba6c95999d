"""The pixel-MIM image grid for TensorBoard: masked input / reconstruction / original."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

from ..objectives.pixel_mim import patchify


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, p*p*3) in (row, col, channel) order -> (B, 3, H, W)."""
    B = patches.shape[0]
    Hp, Wp = grid
    p = patch_size
    x = patches.reshape(B, Hp, Wp, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, Hp, p, Wp, p)
    return x.reshape(B, 3, Hp * p, Wp * p)


@torch.no_grad()
def mim_grid(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             mean, std, norm_pix: bool = True, n: int = 4) -> torch.Tensor:
    """(3, H', W') grid in [0, 1]: per row the masked input, the reconstruction pasted into the
    visible patches, and the original, for the first ``n`` images."""
    x = images[:n].float()
    B, _, H, W = x.shape
    grid = (H // patch_size, W // patch_size)
    target = patchify(x, patch_size)  # (B, N, p*p*3)
    rec = pred[:n].float()
    if norm_pix:  # predictions are per-patch normalised pixels: undo with the patch's own stats
        mean_p = target.mean(dim=-1, keepdim=True)
        std_p = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        rec = rec * std_p + mean_p
    m = mask[:n].bool()[..., None]  # (B, N, 1)
    masked_in = torch.where(m, torch.zeros_like(target), target)
    pasted = torch.where(m, rec, target)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    rows = [unpatchify(t, patch_size, grid) * std_t + mean_t for t in (masked_in, pasted, target)]
    tiles = torch.stack(rows, dim=1).reshape(-1, 3, H, W).clamp(0, 1)  # (n*3, 3, H, W)
    return make_grid(tiles.cpu(), nrow=3, padding=2)
