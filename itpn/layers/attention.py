"""Multi-head self-attention with an optional Swin-style relative position bias
(iTPN paper, section 3.2: stage-3 blocks of HiViT; reference doc, sections 1 and 5).

The bias enters ``torch.nn.functional.scaled_dot_product_attention`` as an additive mask,
so no (B, H, N, N) fp32 score matrix is ever materialised by our code; the "triton" setting
runs our own fused kernel instead (bias_attention.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import bias_attention
from .linear import ScaledLinear

# "sdpa" (default); "flex": FlexAttention with the relative bias read from the table inside
# the kernel (GPU, meant for compiled blocks; falls back to SDPA where it cannot apply);
# "triton": our fused kernel (bias_attention.py: one bias for the batch or one per sample; GPU,
# bf16 or fp16, falls back to SDPA where it cannot apply); "naive": an explicit fp32 softmax over a
# materialised score matrix, kept only as the baseline the speed benchmark and the
# equivalence tests compare against.
_ATTENTION_IMPL = "sdpa"
IMPLS = ("sdpa", "triton", "flex", "naive")
#: The settings a training run may choose (deepspeed.attention): all but the naive baseline.
TRAINING_IMPLS = IMPLS[:-1]
# Measured fastest for N=196, d=64 on an H100 (docs/performance.md).
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}


def set_attention_impl(impl: str) -> None:
    global _ATTENTION_IMPL
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    _ATTENTION_IMPL = impl


@contextlib.contextmanager
def attention_impl(impl: str):
    """Temporarily switch every Attention module to ``impl`` (one of IMPLS)."""
    global _ATTENTION_IMPL
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    previous, _ATTENTION_IMPL = _ATTENTION_IMPL, impl
    try:
        yield
    finally:
        _ATTENTION_IMPL = previous


def _pair(grid) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def relative_position_index(grid, device=None) -> torch.Tensor:
    """Swin's (N, N) index into a ((2h-1)(2w-1), heads) table for an h x w token grid
    (an int means square), N = h*w."""
    h, w = _pair(grid)
    coords = torch.stack(torch.meshgrid(torch.arange(h, device=device),
                                        torch.arange(w, device=device), indexing="ij"))
    coords = coords.flatten(1)  # (2, N): row, col of each token in raster order
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    # Shift the offsets to [0, 2h-2] and [0, 2w-2], then flatten row-major.
    return (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1  # (N, N)


def resize_rel_pos_table(table: torch.Tensor, new_grid) -> torch.Tensor:
    """Bicubically resample a square ((2g-1)^2, H) bias table to ((2h-1)(2w-1), H) for a new grid."""
    old_side = int(round(table.shape[0] ** 0.5))
    if old_side * old_side != table.shape[0]:
        raise ValueError(f"relative-bias table with {table.shape[0]} rows is not square")
    h, w = _pair(new_grid)
    new_size = (2 * h - 1, 2 * w - 1)
    if new_size == (old_side, old_side):
        return table
    heads = table.shape[1]
    t = table.T.reshape(1, heads, old_side, old_side)  # (1, H, 2g-1, 2g-1)
    t = F.interpolate(t.float(), size=new_size, mode="bicubic", align_corners=False)
    return t.reshape(heads, new_size[0] * new_size[1]).T.to(table.dtype)  # ((2h-1)(2w-1), H)


def _stride_aligned(bias: torch.Tensor) -> torch.Tensor:
    """Same values, last-dim stride padded to a multiple of 8.

    SDPA's memory-efficient CUDA kernel refuses an additive mask whose row stride is not
    8-aligned (N = 196 is not) and silently falls back to the math path, 2.6x slower
    (docs/performance-notes). Padding then slicing keeps the logical shape.
    """
    n = bias.shape[-1]
    pad = (-n) % 8
    if pad == 0:
        return bias
    return F.pad(bias, (0, pad))[..., :n]


def triton_fallbacks(model: nn.Module, device, dtype: torch.dtype) -> list[str]:
    """The Attention modules of ``model`` that the "triton" setting would run on SDPA instead
    (``bias_attention.unusable_reason``), each with its reason, for tensors of ``dtype`` on
    ``device``: what the engine warns about when deepspeed.attention=triton."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            reason = bias_attention.unusable_reason(device, dtype, m.head_dim)
            if reason is None and m.attn_drop:
                reason = f"attention dropout {m.attn_drop}"
            if reason is not None:
                out.append(f"{name or type(m).__name__}: {reason}")
    return out


class Attention(nn.Module):
    """qkv (one Linear, one bias) -> SDPA (scale head_dim^-0.5) -> proj.

    ``rel_pos_grid``: the token grid the bias table is sized for (None = no relative bias).
    ``out_scale`` (forward): a per-channel gain on the output (layer scale), folded into proj.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 rel_pos_grid: int | None = None, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = ScaledLinear(dim, dim * 3, bias=qkv_bias)
        self.proj = ScaledLinear(dim, dim)
        self.attn_drop = attn_drop
        self.rel_pos_grid = rel_pos_grid
        if rel_pos_grid is not None:
            side = 2 * rel_pos_grid - 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.relative_position_bias_table = None

    def rel_pos_bias(self, index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bias for an index of shape (n, n) -> (1, H, n, n), or (B, n, n) -> (B, H, n, n);
        ``grid`` is the (h, w) token grid the index was built for."""
        # Gathered in fp32 even when the weights are bf16/fp16 (DeepSpeed's bf16 engine): the
        # gather's backward adds every query-key pair's gradient into a few hundred table
        # entries, which in bf16 rounds at every add (1.2% error on the CPU) and on CUDA runs as
        # compare-and-swap loops: 49 ms of a 317 ms iTPN-L step on an H200 (docs/performance.md).
        table = self.relative_position_bias_table.float()
        if tuple(grid) != (self.rel_pos_grid, self.rel_pos_grid):
            table = resize_rel_pos_table(table, grid)
        bias = table[index]  # (..., n, n, H)
        bias = bias.movedim(-1, -3)  # (..., H, n, n)
        return bias if bias.ndim == 4 else bias.unsqueeze(0)

    def forward(self, x: torch.Tensor, rel_index: torch.Tensor | None = None,
                rel_grid: tuple[int, int] | None = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3C) -> (B, N, 3, H, d) -> three (B, H, N, d) views. Unbinding dim 2 (not a
        # permuted dim 0) makes the backward stack the q, k, v gradients straight into the
        # (B, N, 3C) layout qkv's weight gradient reads, without a permuted copy of it.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        drop = self.attn_drop if self.training else 0.0
        has_bias = self.relative_position_bias_table is not None and rel_index is not None
        grid = rel_grid or (self.rel_pos_grid,) * 2
        if _ATTENTION_IMPL == "triton" and drop == 0.0 and bias_attention.usable(qkv):
            # An fp32 bias, (H, N, N) for the batch or (B, H, n, n) per sample; the kernel reads
            # q, k, v inside qkv and returns (B, N, H, d), so neither side needs a copy.
            bias = None
            if has_bias:
                bias = self.rel_pos_bias(rel_index, grid).float()
                bias = (bias[0] if rel_index.ndim == 2 else bias).contiguous()
            out = bias_attention.bias_attention(qkv, bias)
            return self.proj(out.reshape(B, N, C), out_scale)
        if (_ATTENTION_IMPL == "flex" and q.is_cuda and drop == 0.0 and
                (not has_bias or (rel_index.ndim == 2 and tuple(grid) == (self.rel_pos_grid,) * 2))):
            # fp32: the kernel adds it to fp32 scores, and its backward accumulates the bias
            # gradient with atomic adds over the batch, which in bf16 would round at every add.
            bias = self.rel_pos_bias(rel_index, grid).float() if has_bias else None
            out = _flex_attention(q, k, v, bias)
            return self.proj(out.transpose(1, 2).reshape(B, N, C), out_scale)
        bias = None
        if has_bias:
            bias = self.rel_pos_bias(rel_index, grid).to(q.dtype)
        if _ATTENTION_IMPL == "naive":
            out = _naive_attention(q, k, v, bias, drop)
        else:
            if bias is not None:
                bias = _stride_aligned(bias)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, H, N, d) -> (B, N, C)
        return self.proj(out, out_scale)


_compiled_flex = None


def _flex_attention(q, k, v, bias):
    """FlexAttention with score + bias[0, h, i, j] for a (1, H, N, N) bias: its backward
    accumulates the bias gradient inside the kernel (no (B, H, N, N) gradient to reduce).
    Reading the ((2g-1)^2, H) table through the index directly was measured 1.6x slower
    for the whole step: every query-key pair then adds into a few thousand table entries."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if bias is None:
        score_mod = None
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx].to(score.dtype)
    if torch.compiler.is_compiling():
        fn = flex_attention
    else:  # eager flex_attention is a slow reference path: compile the call itself
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, score_mod=score_mod, kernel_options=FLEX_KERNEL_OPTIONS)


def _naive_attention(q, k, v, bias, drop):
    """The reference implementation's attention: fp32 scores and softmax, materialised."""
    scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        scores = scores + bias.float()
    attn = F.dropout(scores.softmax(dim=-1), p=drop)
    return (attn @ v.float()).to(v.dtype)
