"""The one residual block of iTPN: pre-norm attention (optional) + pre-norm MLP, with
optional layer scale and stochastic depth. Layer scale is folded into each branch's output
projection by default (``fold_layer_scale``; linear.py says why); the product is the same.

``num_heads=0`` gives the attention-free per-token MLP block used by HiViT stages 1-2
(the paper's "C-MLP", section 3.2), the pyramid and its lateral paths; ``num_heads>0``
gives the stage-3 transformer block, the auxiliary CLIP blocks and the pixel decoder blocks.
Works on any token layout whose last dim is channels: (B, N, C) or (B, N, h, w, C).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .drop_path import DropPath
from .mlp import Mlp
from .norm import LN_EPS

#: Dynamo cache entries allowed for the one shared ``Block._forward`` code object.
RECOMPILE_LIMIT = 64
# Block.compile's choices: one compiled region per block, or one per residual branch.
COMPILE_REGIONS = ("block", "branch")


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, layer_scale: float | None = None,
                 rel_pos_grid: int | None = None, norm_eps: float = LN_EPS):
        super().__init__()
        self.has_attn = num_heads > 0
        if self.has_attn:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rel_pos_grid=rel_pos_grid)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        # Layer scale (CaiT): a learned per-channel gain on each residual branch.
        if layer_scale:
            if self.has_attn:
                self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.layer_scale = bool(layer_scale)
        # True: gamma scales the branch's output Linear (weight and bias) instead of its
        # output; the same product with a cheaper gradient and one saved activation less per
        # branch. False is the reference's form, which the benchmark's ladder starts from.
        self.fold_layer_scale = True
        # Activation checkpointing of this block (non-reentrant, so frozen or ZeRO-3
        # partitioned parameters inside it are fine); set by the model's
        # set_grad_checkpointing or by the engine for every k-th block.
        self.grad_checkpointing = False
        # Set by compile(): the compiled *function* Block._forward, called with this block as
        # its first argument. Not a bound method: a deep copy (e.g. an EMA model) must
        # compute with its own weights, and copies functions by reference.
        self._compiled_forward = None

    def compile(self, regions: str = "block", **kwargs) -> None:
        """Regional compilation of the block's computation (``_forward``); with
        ``regions="branch"``, a transformer block's two residual branches are compiled as two
        regions (``_attention_residual``, ``_mlp_residual``), so the residual stream between
        them is written once and LayerNorm 2's backward reads it (as LayerNorm 1's reads the
        block's input) instead of inductor writing its normalised input in fp32 and reading
        it back: 0.9 MB less per image and iTPN-L stage-3 block by ``itpn-roofline --regions
        branch``, not measured on a GPU; the benchmark's ``branch`` setting measures it.

        Unlike ``nn.Module.compile``, the compiled region excludes the checkpointing
        wrapper: with ``grad_checkpointing`` on, ``torch.utils.checkpoint`` runs in eager
        around the compiled function and replays it on the backward, so dynamo never has
        to trace the checkpoint (on torch 2.11 tracing it failed inside the region).

        All blocks share one code object, hence one dynamo cache: blocks of one shape share
        one graph (parameters are graph inputs), and every other shape (stage 1, stage 2,
        stage 3, each pyramid level: 6-8 per model) is another entry. Shapes are static by
        default: dynamo's automatic dynamic shapes would otherwise turn the second 5-d shape
        into one symbolic-shape graph for all C-MLP levels; and the recompile limit is
        raised above the number of shapes so that no block silently falls back to eager.
        """
        if regions not in COMPILE_REGIONS:
            choices = " or ".join(map(repr, COMPILE_REGIONS))
            raise ValueError(f"Block.compile: regions must be {choices}, got {regions!r}")
        kwargs.setdefault("dynamic", False)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        if regions == "block" or not self.has_attn:
            self._compiled_forward = torch.compile(Block._forward, **kwargs)
        else:
            self._compiled_forward = _two_regions(torch.compile(Block._attention_residual, **kwargs),
                                                  torch.compile(Block._mlp_residual, **kwargs))

    def forward(self, x: torch.Tensor, rel_index: torch.Tensor | None = None,
                rel_grid: tuple[int, int] | None = None) -> torch.Tensor:
        fn = self._forward if self._compiled_forward is None else functools.partial(self._compiled_forward, self)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, rel_index, rel_grid, use_reentrant=False)
        return fn(x, rel_index, rel_grid)

    def _forward(self, x, rel_index, rel_grid):
        if self.has_attn:
            x = self._attention_residual(x, rel_index, rel_grid)
        return self._mlp_residual(x)

    def _attention_residual(self, x, rel_index, rel_grid):
        return x + self.drop_path(self._branch(self.attn, "gamma_1", self.norm1(x), rel_index, rel_grid))

    def _mlp_residual(self, x):
        return x + self.drop_path(self._branch(self.mlp, "gamma_2", self.norm2(x)))

    def _branch(self, branch: nn.Module, gamma: str, *args) -> torch.Tensor:
        """A residual branch's output, times its layer scale (parameter ``gamma``) if any."""
        if not self.layer_scale:
            return branch(*args)
        if self.fold_layer_scale:
            return branch(*args, out_scale=getattr(self, gamma))
        return getattr(self, gamma) * branch(*args)


def _two_regions(attention_residual, mlp_residual):
    """Block._forward from its two branches compiled apart (a function of the block, as
    ``Block._compiled_forward`` must be)."""
    def forward(block, x, rel_index, rel_grid):
        return mlp_residual(block, attention_residual(block, x, rel_index, rel_grid))
    return forward


def check_activation_memory_budget(budget, name: str = "activation memory budget") -> float:
    """``budget`` as a float in [0, 1], or a ValueError that names ``name`` and the value."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {budget!r}")
    return float(budget)


def set_activation_memory_budget(budget: float, name: str = "activation memory budget") -> float:
    """What the compiled blocks save for the backward: inductor's partitioner keeps at most
    ``budget`` times the activation bytes it keeps by default (1.0) and recomputes the rest in
    the backward (``torch._functorch.config.activation_memory_budget``), cheapest first. For an
    iTPN-L stage-3 block in bf16, any budget in [0.6, 0.95] recomputes the two LayerNorms'
    outputs and GELU's, 39% less saved per step and no GEMM or attention recomputed; lower
    budgets recompute attention and GEMMs too (docs/performance.md, "Selective recompute").
    Process-wide and read when a block is compiled (at its first call), like dynamo's recompile
    limit: set it before the first step. Returns the previous value; a value outside [0, 1] is
    a ValueError that names ``name`` (the setting it came from)."""
    import torch._functorch.config as functorch_config
    budget = check_activation_memory_budget(budget, name)
    previous = functorch_config.activation_memory_budget
    functorch_config.activation_memory_budget = budget
    return previous


def dynamo_counts() -> dict[str, int]:
    """What dynamo has made since its counters were last cleared
    (``torch._dynamo.utils.counters.clear()``): "dynamo_graphs", the graphs it compiled (a
    compiled block gives one per signature), and "graph_breaks" (a break, e.g. a DeepSpeed hook
    traced inside a block, splits a region)."""
    from torch._dynamo.utils import counters
    return {"dynamo_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def compiled_blocks(module: nn.Module):
    """``(name, block)`` for every block of ``module`` whose forward is compiled."""
    return [(name, blk) for name, blk in module.named_modules()
            if isinstance(blk, Block) and blk._compiled_forward is not None]


def misaligned_parameters(prefix: str, module: nn.Module, alignment: int = 16) -> list[str]:
    """Names of ``module``'s parameters whose storage does not start on an ``alignment``-byte
    boundary (as they are now: gathered, for a ZeRO-3 module, only inside its forward)."""
    return [f"{prefix}.{n}" for n, p in module.named_parameters() if p.numel() and p.data_ptr() % alignment]


def misaligned_compiled_parameters(module: nn.Module, alignment: int = 16) -> list[str]:
    """Parameters of compiled blocks whose storage does not start on an ``alignment``-byte
    boundary. Inductor treats parameters as static inputs: it checks their alignment once,
    when it compiles a graph, and its Triton kernels then assume it. Blocks of one shape share
    that graph, so a parameter of another block that sits at an odd offset (a view into a
    flat buffer, as DeepSpeed's ZeRO-1/2 makes without ``parameter_alignment``) is read with
    16-byte vector loads: "CUDA error: misaligned address" on the GPU."""
    return [n for name, blk in compiled_blocks(module) for n in misaligned_parameters(name, blk, alignment)]

