"""Plain-ViT variant of the iTPN pyramid (paper, supplementary C, Table 11).

A ViT-B/16 has no stage-1/2 features, so the outputs of its 4th and 7th blocks stand in for
them, up-sampled 4x and 2x. The up-sampling is per-token nearest (each patch's vector fills
its 4x4 or 2x2 children; the pyramid's lateral Linear then broadcasts over the children), so,
as in iTPN, no output token sees another patch except through the transformer blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import Block, relative_position_index, tokens_to_map
from .hivit import init_weights, linear_drop_path
from .pyramid import FeaturePyramid


@dataclass(frozen=True)
class ViTPyramidConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    rpe: bool = False
    layer_scale: float | None = None
    drop_path_rate: float = 0.0
    taps: tuple[int, int] = (4, 7)  # 1-based blocks whose outputs feed the stride-4 / stride-8 levels

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class ViTPyramid(nn.Module):
    def __init__(self, cfg: ViTPyramidConfig | None = None, fpn_dim: int = 256, fpn_depth: int = 2,
                 num_classes: int = 0, **overrides):
        super().__init__()
        if num_classes:
            raise ValueError("ViTPyramid has no classification head")
        cfg = dataclasses.replace(cfg or ViTPyramidConfig(), **overrides)
        if not 0 < cfg.taps[0] < cfg.taps[1] <= cfg.depth:
            raise ValueError(f"taps {cfg.taps} must be increasing block numbers within depth {cfg.depth}")
        self.cfg = cfg
        c, g = cfg.embed_dim, cfg.grid
        self.grad_checkpointing = False
        self.patch_embed = nn.Conv2d(cfg.in_chans, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g, c))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        dpr = linear_drop_path(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=dpr[i],
                  layer_scale=cfg.layer_scale, rel_pos_grid=g if cfg.rpe else None)
            for i in range(cfg.depth))
        self.register_buffer("rel_pos_index", relative_position_index(g) if cfg.rpe else None,
                             persistent=False)
        self.pyramid = FeaturePyramid((c, c, c), fpn_dim, fpn_depth)
        self.num_features = fpn_dim
        self.apply(init_weights)

    def forward_levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        if x.shape[-1] != self.cfg.img_size or x.shape[-2] != self.cfg.img_size:
            raise ValueError(f"ViTPyramid is built for {self.cfg.img_size}px input, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        g = self.cfg.grid
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        taps = []
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x, self.rel_pos_index, (g, g))
            if i in self.cfg.taps:
                taps.append(x[:, :, None, None, :])  # (B, N, 1, 1, C): broadcast = nearest up-sampling
        return self.pyramid(x, taps), (g, g)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        (p16, p8, p4), grid = self.forward_levels(x)
        maps = [tokens_to_map(p, grid) for p in (p4, p8, p16)]
        maps.append(nn.functional.avg_pool2d(maps[-1], kernel_size=2))
        return maps

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n == "pos_embed" or n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for blk in self.blocks:
            blk.grad_checkpointing = enable
