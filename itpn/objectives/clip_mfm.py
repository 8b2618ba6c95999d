"""CLIP-supervised masked feature modeling (iTPN paper, section 3.4 and Table 9; reference
doc, section 2).

The student runs the full token sequence: at the stage-3 input a learned mask token replaces
the masked patches. Every pyramid level is projected and flattened to one embed_dim vector
per patch, the levels are summed, and LN + a linear "lm head" predict the teacher's
per-patch CLIP features. An auxiliary branch taps stage 3 after block int(0.75 * depth),
runs two extra blocks and predicts the same targets. Loss: Smooth-L1 over all tokens for
each head, summed.

Stage-1/2 masking. ``stem_masking="paper"`` (default): the stage-1/2 features of masked
patches are zeroed before they enter the pyramid, and the stage-3 input is the mask token,
so no pixel of a masked patch reaches any output. ``"released"``: the released code's
behaviour, where stages 1-2 see the whole image and feed the pyramid unmasked (masked
content leaks into the P8/P4 levels); ``itpn.compat.from_official`` uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AUX_LN_EPS, LN_EPS, Block
from ..models.hivit import HiViT, HiViTConfig, init_weights
from ..models.pyramid import FeaturePyramid, LevelProjection

STEM_MASKING = ("paper", "released")


class ClipMFM(nn.Module):
    def __init__(self, cfg: HiViTConfig, teacher_dim: int = 512, fpn_dim: int = 256, fpn_depth: int = 1,
                 stem_masking: str = "paper", teacher: nn.Module | None = None):
        super().__init__()
        if stem_masking not in STEM_MASKING:
            raise ValueError(f"stem_masking must be one of {STEM_MASKING}, got {stem_masking!r}")
        c = cfg.embed_dim
        self.stem_masking = stem_masking
        self.encoder = HiViT(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pyramid = FeaturePyramid(cfg.dims, fpn_dim, fpn_depth)
        self.level_proj = LevelProjection(fpn_dim, c)
        self.head_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.mfm_head = nn.Linear(c, teacher_dim)
        # The auxiliary tap: output of stage-3 block int(0.75 * depth), 0-based within stage 3.
        self.aux_tap = int(0.75 * cfg.depths[2])
        self.aux_blocks = nn.ModuleList(
            Block(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, layer_scale=cfg.layer_scale,
                  rel_pos_grid=cfg.grid if cfg.rpe else None, norm_eps=AUX_LN_EPS)
            for _ in range(2))
        self.aux_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.aux_head = nn.Linear(c, teacher_dim)
        for module in (self.pyramid, self.level_proj, self.mfm_head, self.aux_blocks, self.aux_head):
            module.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # The frozen teacher is kept out of the module tree: it must never reach an optimizer,
        # a ZeRO partition or the student's checkpoint (see clip_teacher.py).
        self.__dict__["teacher"] = teacher

    def forward_student(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | list]:
        """x (B, 3, H, W); mask (B, N) bool, True = masked.

        Returns "pyramid_tokens" [P16, P8, P4] as (B, N, h, w, F) tokens, "mfm" and "aux"
        predictions (B, N, teacher_dim) and "aux_tokens" (B, N, C). The loss needs no
        (B, F, H/s, W/s) maps of the pyramid, so none is built (a copy per level, 0.27 GB
        held per iTPN-L step at batch 128); `tokens_to_map(p, grid)` makes one.
        """
        enc = self.encoder
        t, grid = enc.embed(x)
        s3, feats = enc.forward_stem(t)  # (B, N, C), [(B, N, 4, 4, C1), (B, N, 2, 2, C2)]
        w = mask.unsqueeze(-1).to(s3.dtype)  # (B, N, 1)
        if self.stem_masking == "paper":
            # Zero masked patches' stage-1/2 features: the pyramid's laterals have no bias, so
            # a masked patch contributes nothing but its position and the mask token.
            feats = [f * (1 - w)[..., None, None] for f in feats]  # w -> (B, N, 1, 1, 1)
        s3 = s3 * (1 - w) + self.mask_token.to(s3.dtype) * w
        s3 = enc.add_pos_embed(s3, grid)
        s3 = enc.forward_blocks(s3, grid, end=self.aux_tap + 1)
        aux = s3
        s3 = enc.forward_blocks(s3, grid, start=self.aux_tap + 1)

        rel_index = enc.rel_index_for(grid)
        for blk in self.aux_blocks:
            aux = blk(aux, rel_index, tuple(grid))
        pyramid = self.pyramid(s3, feats)
        fused = sum(self.level_proj(pyramid))  # (B, N, C)
        return {
            "pyramid_tokens": pyramid,
            "mfm": self.mfm_head(self.head_norm(fused)),
            "aux": self.aux_head(self.aux_norm(aux)),
            "aux_tokens": aux,
        }

    def forward(self, x: torch.Tensor, mask: torch.Tensor, teacher_view: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> dict:
        """Student outputs, plus loss terms when a teacher view (and a teacher) or precomputed
        targets (B, N, teacher_dim) are given: "loss_mfm", "loss_aux", "loss" = their sum."""
        out = self.forward_student(x, mask)
        if targets is None and teacher_view is not None:
            if self.teacher is None:
                raise RuntimeError("ClipMFM got a teacher view but was built without a teacher")
            targets = self.teacher(teacher_view)
        if targets is not None:
            targets = targets.to(out["mfm"].dtype)
            out["loss_mfm"] = F.smooth_l1_loss(out["mfm"], targets)
            out["loss_aux"] = F.smooth_l1_loss(out["aux"], targets)
            out["loss"] = out["loss_mfm"] + out["loss_aux"]
        return out
