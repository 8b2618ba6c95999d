"""iTPN models for downstream use (paper, sections 3.2 and 4.2).

- ``ITPN``: the classifier. Stage-3 tokens -> mean over tokens -> LayerNorm (fc_norm) ->
  linear head; the pyramid is not used for classification (as in the paper's fine-tuning).
- ``ITPNDense``: backbone + feature pyramid with a dense API returning stride 4/8/16/32
  feature maps as (B, C, H, W) for detection and segmentation necks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LN_EPS, tokens_to_map
from .hivit import HiViT, HiViTConfig
from .pyramid import FeaturePyramid


class ITPN(HiViT):
    def __init__(self, cfg: HiViTConfig | None = None, num_classes: int = 1000,
                 drop_rate: float = 0.0, global_pool: str = "avg", **overrides):
        super().__init__(cfg, **overrides)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (tokens), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) stage-3 tokens -> (B, num_classes) logits, or (B, C) if pre_logits."""
        if self.global_pool == "":
            return x
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


class ITPNDense(nn.Module):
    """Backbone + pyramid; ``forward`` returns [stride 4, 8, 16, 32] maps (B, fpn_dim, H/s, W/s)."""

    def __init__(self, cfg: HiViTConfig | None = None, fpn_dim: int = 256, fpn_depth: int = 2,
                 num_classes: int = 0, **overrides):
        super().__init__()
        if num_classes:
            raise ValueError("ITPNDense has no classification head; use an itpn_* classifier")
        cfg = (cfg or HiViTConfig()).replace(**overrides)
        self.backbone = HiViT(cfg)
        self.pyramid = FeaturePyramid(cfg.dims, fpn_dim, fpn_depth)
        self.num_features = fpn_dim
        self.feature_info = [dict(num_chs=fpn_dim, reduction=s, module=f"pyramid.p{s}")
                             for s in (4, 8, 16, 32)]

    def forward_levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Images -> pyramid tokens [P16, P8, P4] (B, N, h, w, F) and the patch grid."""
        b = self.backbone
        t, grid = b.embed(x)
        s3, feats = b.forward_stem(t)
        s3 = b.forward_blocks(b.add_pos_embed(s3, grid), grid)
        return self.pyramid(s3, feats), grid

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        (p16, p8, p4), grid = self.forward_levels(x)
        maps = [tokens_to_map(p, grid) for p in (p4, p8, p16)]  # strides 4, 8, 16
        maps.append(F.avg_pool2d(maps[-1], kernel_size=2))  # stride 32 for detection necks
        return maps

    forward_features = forward

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        inner = self.backbone.group_matcher(coarse)
        last = inner("pyramid")
        return lambda name: inner(name[len("backbone."):]) if name.startswith("backbone.") else last
