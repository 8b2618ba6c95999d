"""The Triton kernels of itpn/layers/bias_attention.py run in Triton's interpreter on the
CPU. Not collected by the suite's own run (the interpreter has to be switched on before
Triton is imported): test_bias_attention.py runs this file in a subprocess with
TRITON_INTERPRET=1. The interpreter multiplies bf16 operands in fp32 (see ``_dot``), fp16 and
fp32 ones as they are; the bf16 GEMMs of the compiled kernels are checked by tests/gpu."""

import os

import pytest
import torch

from itpn.layers import attention_impl
from itpn.layers.attention import Attention, relative_position_index
from itpn.layers import bias_attention as bias_attention_module
from itpn.layers.bias_attention import bias_attention, reference
from itpn.layers.block import Block

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_bias_attention.py"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _random(b, n, dtype=torch.float32, bias_shape=(2,)):
    """qkv (b, n, 3, 2, 16), a bias of (*bias_shape, n, n) (None for None) and an output gradient."""
    qkv = torch.randn(b, n, 3, 2, 16, dtype=dtype, requires_grad=True)
    bias = None if bias_shape is None else torch.randn(*bias_shape, n, n, requires_grad=True)
    return qkv, bias, torch.randn(b, n, 2, 16, dtype=dtype)


@pytest.mark.parametrize("n,bias_shape,dtype", [(20, "shared", torch.float32), (49, "shared", torch.bfloat16),
                                                (20, "per_sample", torch.float32), (16, None, torch.float32),
                                                (33, None, torch.bfloat16), (49, "per_sample", torch.float16)])
def test_matches_reference_with_gradients(n, bias_shape, dtype):
    """Tiles of 16: N = 20, 33 and 49 end in partial query and key tiles; N = 16 in none.
    A bias shared by the batch is (H, N, N), a per-sample one (B, H, N, N)."""
    torch.manual_seed(0)
    with_bias = bias_shape is not None
    qkv, bias, grad = _random(2, n, dtype, None if not with_bias else (2, 2) if bias_shape == "per_sample" else (2,))
    inputs = (qkv, bias) if with_bias else (qkv,)
    out = bias_attention(qkv, bias)
    got = torch.autograd.grad(out, inputs, grad)
    ref = reference(qkv, bias)
    want = torch.autograd.grad(ref, inputs, grad)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert out.shape == (2, n, 2, 16) and out.dtype == dtype
    assert _rel(out, ref) < tol
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel(g, w) < tol


@pytest.mark.parametrize("per_sample", [False, True])
def test_bias_with_padded_rows(per_sample):
    """Inside a compiled graph on CUDA, inductor pads the rows of the bias buffer it hands to the
    op (comprehensive padding: N = 196 floats per row -> 200); the first GPU run of the compiled
    step failed on exactly that. The kernels read the bias through its strides: same values and
    gradients as from a contiguous bias, and the bias gradient comes back contiguous."""
    torch.manual_seed(3)
    n = 20
    qkv, bias, grad = _random(2, n, bias_shape=(2, 2) if per_sample else (2,))
    padded = torch.zeros(*bias.shape[:-1], n + 4)[..., :n]
    padded.copy_(bias.detach())
    padded.requires_grad_()
    assert not padded.is_contiguous() and padded.stride(-2) == n + 4
    want = torch.autograd.grad(bias_attention(qkv, bias), (qkv, bias), grad)
    out = bias_attention(qkv, padded)
    got = torch.autograd.grad(out, (qkv, padded), grad)
    assert _rel(out, reference(qkv, bias)) < 1e-5
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert got[1].is_contiguous()


def test_bias_gradient_is_deterministic_and_skipped_when_frozen():
    torch.manual_seed(1)
    qkv, bias, grad = _random(3, 20)
    a = torch.autograd.grad(bias_attention(qkv, bias), (qkv, bias), grad)
    b = torch.autograd.grad(bias_attention(qkv, bias), (qkv, bias), grad)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    frozen = bias.detach()
    (dq,) = torch.autograd.grad(bias_attention(qkv, frozen), (qkv,), grad)
    assert torch.equal(dq, a[0])


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the op."""
    torch.manual_seed(2)
    qkv = torch.randn(2, 20, 3, 2, 16, requires_grad=True)
    bias = torch.randn(2, 20, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.itpn.bias_attention.default, (qkv, bias, 0.25))
    torch.library.opcheck(torch.ops.itpn.bias_attention.default, (qkv, None, 0.25))


@pytest.mark.parametrize("kept", [False, True])
def test_attention_module_matches_naive_including_the_table_gradient(kept, monkeypatch):
    """All 25 tokens (one bias for the batch), or 9 kept tokens per sample (pixel MIM's
    per-sample bias); the kernel must actually run (counted)."""
    calls = []
    real = bias_attention_module.bias_attention
    monkeypatch.setattr(bias_attention_module, "bias_attention", lambda *a: calls.append(1) or real(*a))
    index = relative_position_index(5)
    if kept:
        ids_keep = torch.stack([torch.randperm(25, generator=torch.Generator().manual_seed(i))[:9] for i in range(2)])
        index = index[ids_keep[:, :, None], ids_keep[:, None, :]]  # (B, 9, 9)
    grads = {}
    for impl in ("naive", "triton"):
        torch.manual_seed(3)
        attn = Attention(32, 2, rel_pos_grid=5)
        x = torch.randn(2, index.shape[-1], 32)
        with attention_impl(impl):
            y = attn(x, index, (5, 5))
        y.square().mean().backward()
        grads[impl] = (y.detach(), attn.relative_position_bias_table.grad, attn.qkv.weight.grad)
    assert len(calls) == 1
    for a, b in zip(grads["triton"], grads["naive"]):
        assert _rel(a, b) < 1e-5


def test_compiled_block_treats_the_kernel_as_one_op():
    """Inside a compiled block the op is opaque (one graph, no break), with eager's values."""
    torch.manual_seed(4)
    block = Block(32, 2, rel_pos_grid=5, layer_scale=0.1)
    x = torch.randn(2, 25, 32, requires_grad=True)
    idx = relative_position_index(5)
    with attention_impl("triton"):
        want = block(x, idx, (5, 5))
        (gx,) = torch.autograd.grad(want.sum(), x)
        compiled = torch.compile(Block._forward, backend="aot_eager", fullgraph=True, dynamic=False)
        got = compiled(block, x, idx, (5, 5))
        (cx,) = torch.autograd.grad(got.sum(), x)
    assert _rel(got, want) < 1e-6 and _rel(cx, gx) < 1e-6


@pytest.mark.parametrize("groups", [1, 2])
def test_bias_gradient_summed_by_groups_of_samples(groups, monkeypatch):
    """Five samples in one or two groups (3 + 2): each dK/dV program adds several samples'
    score gradients into its group's slice, then the groups are summed."""
    monkeypatch.setattr(bias_attention_module, "BIAS_GROUPS", groups)
    torch.manual_seed(5)
    qkv, bias, grad = _random(5, 20)
    got = torch.autograd.grad(bias_attention(qkv, bias), (qkv, bias), grad)
    want = torch.autograd.grad(reference(qkv, bias), (qkv, bias), grad)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_checkpointed_block_replays_the_kernel():
    """Activation checkpointing recomputes the block's forward, our op included, in the backward."""
    torch.manual_seed(6)
    block = Block(32, 2, rel_pos_grid=5, layer_scale=0.1)
    idx = relative_position_index(5)
    x = torch.randn(2, 25, 32, requires_grad=True)
    grads = []
    with attention_impl("triton"):
        for ckpt in (False, True):
            block.grad_checkpointing = ckpt
            block.zero_grad(set_to_none=True)
            (gx,) = torch.autograd.grad(block(x, idx, (5, 5)).square().sum(), x)
            grads.append(gx)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bias_kind", ["shared", "frozen", "none"])
def test_dkdv_launch_survives_the_autotuners_reset(bias_kind, monkeypatch):
    """On CUDA the autotuner zeroes the dK/dV kernel's DBIAS argument before each trial
    launch (reset_to_zero). Zeroing it before the interpreted launch too must change nothing:
    DBIAS is never a live buffer, also when no bias gradient is wanted."""
    real = bias_attention_module._kernels

    class ZeroingLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[6].zero_()  # DBIAS
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(bias_attention_module, "_kernels", lambda device: dict(real(device),
                                                                               dkdv=ZeroingLaunch(real(device)["dkdv"])))
    torch.manual_seed(7)
    qkv, bias, grad = _random(2, 20, bias_shape=None if bias_kind == "none" else (2,))
    if bias_kind == "frozen":
        bias = bias.detach()
    inputs = (qkv, bias) if bias_kind == "shared" else (qkv,)
    got = torch.autograd.grad(bias_attention(qkv, bias), inputs, grad)
    want = torch.autograd.grad(reference(qkv, bias), inputs, grad)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5
