"""Pixel masked image modeling with the integrally pre-trained pyramid (iTPN paper, section
3.3 and Table 7; reference doc, section 2).

Masked patches are removed right after the patch embedding, so every stage and every
pyramid level sees only the same visible patches (the masks are aligned across the pyramid
by construction). Each level is projected and flattened to one decoder-width vector per
patch; one shared mask token fills the removed positions in every level; a fixed 2-D
sin-cos position embedding is added to the top level; the sum goes through transformer
decoder blocks and a linear pixel head. Loss: MSE to per-patch normalised pixels over the
masked patches.

MFM with an EMA teacher (paper, sections 3.3-3.4; not in the public release), on when
``mfm_weight > 0`` (the paper uses 0.3): an EMA copy of the patch embedding + backbone sees
the same visible patches; the last output of each of its stages is the target of the
pyramid level of the same resolution (P4 <- stage 1, P8 <- stage 2, P16 <- stage 3), through
a per-token linear head (fpn_dim -> stage width). Each term is the MSE between the head's
output and the layer-normalised (parameter-free) target, averaged over visible tokens and
their sub-patches; total = MIM + mfm_weight * sum of the three terms. The engine updates the
teacher after each optimizer step (see ema.py).

``pos_embed_quirk=True`` reproduces the released code, which bicubically resizes the
absolute position embedding with scale (g + 0.1) / g whenever tokens are dropped (always,
during pre-training); the values shift slightly. Off by default: a clean gather of the kept
positions is what the method means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LN_EPS, Block
from ..models.hivit import HiViT, HiViTConfig, init_weights
from ..models.pyramid import FeaturePyramid, LevelProjection
from .ema import EMATeacher


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (1, grid*grid, dim): half the channels encode the column,
    half the row, each as [sin | cos] over dim/4 frequencies (MAE's convention)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos):
        out = pos.reshape(-1, 1) * omega  # (N, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (N, dim/2)

    # MAE encodes the width coordinate first; kept so stored tables agree.
    return torch.cat([encode(cols), encode(rows)], dim=1).float().unsqueeze(0)  # (1, N, dim)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3) in (row within patch, column, channel) order."""
    B, C, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, Hp, Wp, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def normalized_pixel_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                          patch_size: int, norm_pix: bool = True) -> torch.Tensor:
    """MSE to per-patch normalised pixels (mean, unbiased var, eps 1e-6), averaged over the
    masked patches. pred (B, N, p*p*3); mask (B, N), 1 = masked."""
    target = patchify(imgs, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class PixelDecoder(nn.Module):
    """Transformer blocks (no relative bias) -> LN -> Linear to the patch's pixels."""

    def __init__(self, num_patches_side: int, dim: int = 512, depth: int = 8, num_heads: int = 16,
                 mlp_ratio: float = 4.0, out_dim: int = 16 * 16 * 3):
        super().__init__()
        # Stored in checkpoints and loaded as is (not recomputed): see reference doc, section 5.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, num_patches_side), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class PixelMIM(nn.Module):
    def __init__(self, cfg: HiViTConfig, fpn_dim: int = 256, fpn_depth: int = 2, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 pos_embed_quirk: bool = False, mfm_weight: float = 0.0, mask_ratio: float = 0.75):
        super().__init__()
        self.cfg = cfg
        # Fixes the number of visible tokens (MAE's int(N * (1 - ratio))) without reading the
        # mask on the host, which would stall the GPU every step.
        self.num_keep = int(cfg.grid ** 2 * (1 - mask_ratio))
        self.norm_pix_loss = norm_pix_loss
        self.pos_embed_quirk = pos_embed_quirk
        self.encoder = HiViT(cfg)
        self.pyramid = FeaturePyramid(cfg.dims, fpn_dim, fpn_depth)
        self.level_proj = LevelProjection(fpn_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder = PixelDecoder(cfg.grid, decoder_dim, decoder_depth, decoder_heads,
                                    out_dim=cfg.patch_size ** 2 * cfg.in_chans)
        self.mfm_weight = mfm_weight
        if mfm_weight > 0:
            # Heads for P16, P8, P4 -> stage-3, stage-2, stage-1 widths.
            self.mfm_heads = nn.ModuleList(nn.Linear(fpn_dim, d) for d in reversed(cfg.dims))
        for module in (self.pyramid, self.level_proj, self.decoder, getattr(self, "mfm_heads", nn.Identity())):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        # Kept out of the module tree (see ema.py): never optimised, partitioned or saved with
        # the student; the engine saves it as client state.
        self.__dict__["ema"] = EMATeacher(self.encoder) if mfm_weight > 0 else None

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules outside the trained tree that the engine must place on the device."""
        return {"ema": self.ema.module} if self.ema is not None else {}

    def _encoder_pos_embed(self, enc: HiViT, grid, ids_keep):
        if not self.pos_embed_quirk:
            return enc.pos_embed_for(grid, ids_keep)
        g = int(math.sqrt(enc.pos_embed.shape[1]))
        pos = enc.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        scale = (grid[0] + 0.1) / math.sqrt(enc.pos_embed.shape[1])
        pos = F.interpolate(pos, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).flatten(1, 2)  # (1, N, C), values shifted
        return pos.expand(ids_keep.shape[0], -1, -1).gather(
            1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))

    def encode_visible(self, enc: HiViT, x: torch.Tensor, ids_keep: torch.Tensor) -> list[torch.Tensor]:
        """Run ``enc`` (the student or its EMA) on the visible patches ids_keep (B, n).
        Returns the stage outputs [f1 (B, n, 4, 4, C1), f2 (B, n, 2, 2, C2), s3 (B, n, C3)]."""
        t, grid = enc.embed(x)  # (B, N, 4, 4, C1)
        t = t.gather(1, ids_keep[:, :, None, None, None].expand(-1, -1, *t.shape[2:]))  # (B, n, 4, 4, C1)
        s3, feats = enc.forward_stem(t)
        if enc.pos_embed is not None:
            s3 = s3 + self._encoder_pos_embed(enc, grid, ids_keep)
        return feats + [enc.forward_blocks(s3, grid, ids_keep)]

    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor):
        """Visible patches only -> pyramid [P16, P8, P4] (B, n, h, w, F) and the stage outputs."""
        f1, f2, s3 = self.encode_visible(self.encoder, x, ids_keep)
        return self.pyramid(s3, [f1, f2]), [f1, f2, s3]

    def forward_decoder(self, pyramid: list[torch.Tensor], ids_keep: torch.Tensor, num_patches: int):
        B, n = ids_keep.shape
        levels = []
        for level in self.level_proj(pyramid):  # each (B, n, D)
            full = self.mask_token.to(level.dtype).expand(B, num_patches, -1).clone()  # (B, N, D)
            full.scatter_(1, ids_keep[:, :, None].expand(-1, -1, level.shape[-1]), level)
            levels.append(full)
        x = levels[0] + self.decoder.pos_embed.to(levels[0].dtype) + levels[1] + levels[2]
        return self.decoder(x)  # (B, N, p*p*3)

    def _check_keep_counts(self, mask: torch.Tensor) -> None:
        """Host-side check of a CPU mask (B, N): every sample keeps ``num_keep`` patches."""
        counts = (~mask).sum(1)
        if (counts != self.num_keep).any():
            raise ValueError(f"every sample must keep {self.num_keep} of {mask.shape[1]} patches "
                             f"(mask ratio {1 - self.num_keep / mask.shape[1]:.3f}), got {counts.tolist()}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W); mask (B, N), 1/True = removed, ``N - num_keep`` in every sample
        (checked when the mask is on the CPU in eager mode; on a GPU the check would be a host
        sync per step, in a compiled graph a graph break).

        Returns "pred" (B, N, p*p*3) in raster patch order, "loss" (normalised-pixel MSE
        over masked patches) and "mask"."""
        mask = mask.bool()
        B, N = mask.shape
        if mask.device.type == "cpu" and not torch.compiler.is_compiling():
            self._check_keep_counts(mask)
        # Visible patches in raster order: (B, n). Stages 1-2 are per-token and stage 3 has no
        # order-dependent term besides the position embedding, so the order is immaterial.
        ids_keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, : self.num_keep]
        pyramid, _ = self.forward_encoder(x, ids_keep)
        pred = self.forward_decoder(pyramid, ids_keep, N)
        loss = normalized_pixel_loss(pred, x, mask, self.cfg.patch_size, self.norm_pix_loss)
        out = {"pred": pred, "loss_pix": loss, "mask": mask}
        if self.ema is not None:
            # The EMA weights stay fp32; their forward runs in the training precision.
            # autocast refuses "meta", the FLOP counter's device; no kernel runs there anyway.
            device = "cpu" if x.device.type == "meta" else x.device.type
            low = x.dtype in (torch.float16, torch.bfloat16)
            with torch.no_grad(), torch.autocast(device, dtype=x.dtype, enabled=low):
                targets = self.encode_visible(self.ema.module, x, ids_keep)[::-1]  # s3, f2, f1
            for name, head, level, target in zip(("p16", "p8", "p4"), self.mfm_heads, pyramid, targets):
                pred_feat = head(level)  # (B, n, h, w, C_s)
                target = F.layer_norm(target.float(), target.shape[-1:]).view(pred_feat.shape)
                out[f"loss_mfm_{name}"] = F.mse_loss(pred_feat.float(), target)
            loss = loss + self.mfm_weight * sum(out[f"loss_mfm_{n}"] for n in ("p16", "p8", "p4"))
        out["loss"] = loss
        return out
