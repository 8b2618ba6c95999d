"""Parameter and multiply-add counts, as the paper's Table 1 reports them; bytes saved for
the backward (activation memory).

MACs are counted with torch's FlopCounterMode (MACs = FLOPs / 2) on the meta device, so
even the large variants cost no memory or time. Attention runs through the naive path while
counting: CPU SDPA kernels are not known to the counter, and the naive path's two matmuls
are exactly the FLOPs any attention kernel performs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers import attention_impl


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_activation_bytes(fn: Callable[[], object], module: nn.Module) -> int:
    """Bytes autograd saves for the backward while ``fn()`` runs, each storage once, the
    parameters of ``module`` (and views of them) excluded: the activation memory of a forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def count_macs(build: Callable[[], nn.Module], img_size: int = 224, batch: int = 1,
               forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> int:
    """Multiply-adds of one forward pass of ``build()`` on a (batch, 3, S, S) input."""
    with torch.device("meta"):
        model = build().eval()
    x = torch.empty(batch, 3, img_size, img_size, device="meta")
    with torch.no_grad(), attention_impl("naive"), FlopCounterMode(display=False) as counter:
        forward(model, x) if forward else model(x)
    return counter.get_total_flops() // 2


def count_train_flops(build: Callable[[], nn.Module], make_inputs: Callable[[], dict], batch: int) -> float:
    """Forward + backward FLOPs per sample of ``build()(**make_inputs())["loss"]``, counted
    on the meta device with naive attention (see the module docstring)."""
    with torch.device("meta"):
        model = build()
        inputs = make_inputs()
    model.train()
    with attention_impl("naive"), FlopCounterMode(display=False) as counter:
        model(**inputs)["loss"].backward()
    return counter.get_total_flops() / batch


def vit_forward_flops(width: int, layers: int, patch: int, image: int, out_dim: int, cls_token: bool = True) -> float:
    """Forward FLOPs of a plain ViT tower per image (matmuls and attention, as
    FlopCounterMode counts them): patch embedding, ``layers`` blocks, output projection."""
    patches = (image // patch) ** 2
    n = patches + int(cls_token)
    per_layer = 24 * n * width * width + 4 * n * n * width  # qkv, proj, 4x MLP; q @ k^T and attn @ v
    return 2 * patches * 3 * patch * patch * width + layers * per_layer + 2 * patches * width * out_dim
