"""HiViT backbone (Zhang et al., 2022), the encoder of iTPN (paper, section 3.2).

Stages 1-2 are per-token MLP blocks over an inner grid of 4x4 then 2x2 sub-patches of each
16x16 patch (no attention, no spatial mixing); stage 3 is a plain transformer over the N
patch tokens with absolute position embedding and optional relative position bias. The
model is a single-device module: no distributed or DeepSpeed code lives here.

Token layouts (B = batch, N = patches, n = visible patches when tokens are dropped):
    embed        (B, N, 4, 4, C/4)
    stage-1 out  (B, N, 4, 4, C/4)  -> merge ->  (B, N, 2, 2, C/2)
    stage-2 out  (B, N, 2, 2, C/2)  -> merge ->  (B, N, 1, 1, C) -> (B, N, C)
    stage-3 out  (B, N, C)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Block, PatchEmbed, PatchMerge, relative_position_index


@dataclass(frozen=True)
class HiViTConfig:
    """Hyperparameters of the backbone. ``embed_dim`` is the stage-3 width; stages 1 and 2
    are ``embed_dim // 4`` and ``embed_dim // 2`` wide."""

    img_size: int = 224
    patch_size: int = 16
    inner_patches: int = 4
    in_chans: int = 3
    embed_dim: int = 512
    depths: tuple[int, int, int] = (3, 3, 24)
    num_heads: int = 8
    stem_mlp_ratio: float = 3.0
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = True
    rpe: bool = True
    layer_scale: float | None = None
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.inner_patches != 4:
            raise ValueError("HiViT has two patch merges, so inner_patches must be 4")
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))

    def replace(self, **overrides) -> "HiViTConfig":
        """A copy with some fields changed; an unknown field name is an error that names it."""
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown HiViTConfig field(s): {sorted(unknown)}; "
                            f"known: {sorted(self.__dataclass_fields__)}")
        return dataclasses.replace(self, **overrides)

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.embed_dim // 4, self.embed_dim // 2, self.embed_dim

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)


class HiViT(nn.Module):
    def __init__(self, cfg: HiViTConfig | None = None, **overrides):
        super().__init__()
        cfg = (cfg or HiViTConfig()).replace(**overrides)
        self.cfg = cfg
        d1, d2, d3 = cfg.depths
        c1, c2, c3 = cfg.dims
        self.embed_dim = self.num_features = c3
        self.grid_size = cfg.grid
        self.grad_checkpointing = False
        # Stochastic depth grows linearly over all s1 + s2 + s3 blocks.
        dpr = linear_drop_path(cfg.drop_path_rate, cfg.num_blocks)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.inner_patches, cfg.in_chans, c1)
        self.stage1 = nn.ModuleList(
            Block(c1, 0, cfg.stem_mlp_ratio, drop_path=dpr[i], layer_scale=cfg.layer_scale)
            for i in range(d1))
        self.merge1 = PatchMerge(c1)
        self.stage2 = nn.ModuleList(
            Block(c2, 0, cfg.stem_mlp_ratio, drop_path=dpr[d1 + i], layer_scale=cfg.layer_scale)
            for i in range(d2))
        self.merge2 = PatchMerge(c2)
        if cfg.ape:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, c3))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        rel_grid = cfg.grid if cfg.rpe else None
        self.blocks = nn.ModuleList(
            Block(c3, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=dpr[d1 + d2 + i],
                  layer_scale=cfg.layer_scale, rel_pos_grid=rel_grid)
            for i in range(d3))
        if cfg.rpe:
            # Rebuilt from the grid, never loaded: not part of the state dict.
            self.register_buffer("rel_pos_index", relative_position_index(cfg.grid), persistent=False)
        else:
            self.rel_pos_index = None
        self.apply(init_weights)

    # -- pieces the classifier, the pyramid models and the objectives compose ----------------

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> tokens (B, N, 4, 4, C/4) and the patch grid (Hp, Wp)."""
        grid = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        return self.patch_embed(x), grid

    def forward_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stages 1-2. (B, n, 4, 4, C/4) -> stage-3 input (B, n, C) and the stage features
        [f1 (B, n, 4, 4, C/4), f2 (B, n, 2, 2, C/2)] (the inputs of the two merges)."""
        feats = []
        for stage, merge in ((self.stage1, self.merge1), (self.stage2, self.merge2)):
            for blk in stage:
                x = blk(x)
            feats.append(x)
            x = merge(x)
        return x[:, :, 0, 0, :], feats  # (B, n, 1, 1, C) -> (B, n, C)

    def pos_embed_for(self, grid: tuple[int, int], ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Absolute position embedding for a grid: (1, N, C), or (B, n, C) gathered at ids_keep."""
        pos = resize_pos_embed(self.pos_embed, grid)
        if ids_keep is not None:
            pos = pos.expand(ids_keep.shape[0], -1, -1).gather(
                1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))  # (B, n, C)
        return pos

    def rel_index_for(self, grid: tuple[int, int], ids_keep: torch.Tensor | None = None):
        """Relative-bias index for a grid: (N, N), or (B, n, n) for kept tokens; None if no rpe."""
        if self.rel_pos_index is None:
            return None
        index = self.rel_pos_index
        if tuple(grid) != (self.grid_size, self.grid_size):
            index = relative_position_index(grid, device=index.device)
        if ids_keep is not None:
            # (N, N) -> rows then columns of the kept tokens: (B, n, n)
            index = index[ids_keep[:, :, None], ids_keep[:, None, :]]
        return index

    def forward_blocks(self, x: torch.Tensor, grid: tuple[int, int], ids_keep: torch.Tensor | None = None,
                       start: int = 0, end: int | None = None) -> torch.Tensor:
        """Stage-3 blocks [start:end] on (B, n, C) tokens; ids_keep says which patches they are."""
        rel_index = self.rel_index_for(grid, ids_keep)
        for blk in self.blocks[start:end]:
            x = blk(x, rel_index, tuple(grid))
        return x

    def add_pos_embed(self, x: torch.Tensor, grid, ids_keep=None) -> torch.Tensor:
        return x if self.pos_embed is None else x + self.pos_embed_for(grid, ids_keep)

    # -- timm model API ---------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> stage-3 tokens (B, N, C)."""
        t, grid = self.embed(x)
        x, _ = self.forward_stem(t)
        x = self.add_pos_embed(x, grid)
        return self.forward_blocks(x, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for blk in self.modules():
            if isinstance(blk, Block):
                blk.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n == "pos_embed" or n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer ids for layer decay (reference doc, section 3): patch and position embedding
        -> 0; block i of the s1+s2+s3 blocks -> i+1 (a merge shares the id of the block after
        it); everything after the backbone -> the last id. ``coarse`` groups by stage."""
        d1, d2, d3 = self.cfg.depths
        last = d1 + d2 + d3 + 1

        def layer_id(name: str) -> int:
            head, _, rest = name.partition(".")
            index = int(rest.split(".")[0]) if rest[:1].isdigit() else 0
            if head in ("patch_embed", "pos_embed"):
                return 0
            ids = {"stage1": 1 + index, "merge1": 1 + d1, "stage2": 1 + d1 + index,
                   "merge2": 1 + d1 + d2, "blocks": 1 + d1 + d2 + index}
            if head not in ids:
                return last
            if not coarse:
                return ids[head]
            return {"stage1": 1, "merge1": 2, "stage2": 2, "merge2": 3, "blocks": 3}[head]

        return layer_id


def resize_pos_embed(pos: torch.Tensor, grid) -> torch.Tensor:
    """Bicubically resample a square (1, g*g, C) position table to a (Hp, Wp) grid."""
    g = int(round(pos.shape[1] ** 0.5))
    if tuple(grid) == (g, g):
        return pos
    # (1, N, C) -> (1, C, g, g) -> bicubic to (Hp, Wp) -> (1, Hp*Wp, C)
    x = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)


def linear_drop_path(rate: float, n: int) -> list[float]:
    """Stochastic-depth rates growing linearly from 0 to ``rate`` over n blocks (plain Python,
    so models can be built on the meta device)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


def init_weights(m: nn.Module):
    """Truncated-normal Linear weights, zero biases, unit LayerNorms (as MAE and the reference)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

