"""The Triton kernels of itpn/layers/fused_mlp.py run in Triton's interpreter on the CPU. Not
collected by the suite's own run (the interpreter has to be switched on before Triton is
imported): test_fused_mlp.py runs this file in a subprocess with TRITON_INTERPRET=1. fp32 and
fp16 operands go to the interpreter's dot as they are; bf16 ones are multiplied in fp32 (its
bf16 dot is wrong: numpy has no bf16, and its fp32 -> bf16 cast truncates), so the bf16
tensor-core path is left to tests/gpu."""

import os

import pytest
import torch

from itpn.layers import fused_mlp as fused_mlp_module
from itpn.layers.block import Block
from itpn.layers.fused_mlp import fused_mlp, reference
from itpn.layers.mlp import Mlp

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_fused_mlp.py"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _random(lead, dim, hidden, out, dtype):
    """x (*lead, dim) and the four parameters, all requiring gradients, and an output gradient."""
    x = torch.randn(*lead, dim)
    w1, b1 = torch.randn(hidden, dim) * dim ** -0.5, torch.randn(hidden)
    w2, b2 = torch.randn(out, hidden) * hidden ** -0.5, torch.randn(out) * 0.1
    inputs = [t.to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    return inputs, torch.randn(*lead, out, dtype=dtype)


@pytest.mark.parametrize("lead,dim,hidden,out,dtype,tol", [
    ((40,), 24, 72, 24, torch.float32, 1e-5),  # partial row and column tiles, K not a tile multiple
    ((2, 5, 3, 3), 16, 64, 16, torch.float32, 1e-5),  # a C-MLP block's (B, N, h, w, C) tokens
    ((3, 13), 32, 128, 40, torch.float16, 2e-3),  # fp16 operands straight into the dot
    ((3, 13), 32, 128, 40, torch.bfloat16, 2e-2),
])
def test_matches_reference_with_gradients(lead, dim, hidden, out, dtype, tol):
    torch.manual_seed(0)
    inputs, grad = _random(lead, dim, hidden, out, dtype)
    y = fused_mlp(*inputs)
    got = torch.autograd.grad(y, inputs, grad)
    ref = reference(*inputs)
    want = torch.autograd.grad(ref, inputs, grad)
    assert y.shape == (*lead, out) and y.dtype == dtype
    assert _rel(y, ref) < tol
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel(g, w) < tol


def test_rounds_where_the_separate_kernels_round():
    """Against the unfused module in the same dtype (h rounded before GELU, fc2's input
    gradient rounded before GELU'), the fused path is much closer than either is to fp32.
    fp16 only: the interpreter casts fp32 to bf16 by truncation (twice the error of the GPU's
    round-to-nearest), which no bf16 comparison this tight survives."""
    torch.manual_seed(1)
    inputs, grad = _random((64,), 32, 128, 32, torch.float16)
    y = fused_mlp(*inputs)
    got = torch.autograd.grad(y, inputs, grad)
    x, w1, b1, w2, b2 = inputs
    y_sep = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    sep = torch.autograd.grad(y_sep, inputs, grad)
    ref = reference(*inputs)
    want = torch.autograd.grad(ref, inputs, grad)
    assert _rel(y, y_sep) < 0.5 * _rel(y_sep, ref)
    for g, s, w in zip(got, sep, want):
        assert _rel(g, s) < 0.5 * _rel(s, w) + 1e-6


def test_deterministic_and_partial_bias_sums_in_any_number_of_rows(monkeypatch):
    """Bit-identical reruns; fc1's bias gradient, summed by row tile into an uninitialised
    buffer (here NaN), is the same when the buffer has more rows than there are tiles (on CUDA
    it is sized for the smallest BM of the autotuner's configs, and a larger BM fills fewer
    rows): only the rows the kernel wrote are summed."""
    torch.manual_seed(2)
    inputs, grad = _random((40,), 16, 64, 16, torch.float32)
    a = torch.autograd.grad(fused_mlp(*inputs), inputs, grad)
    b = torch.autograd.grad(fused_mlp(*inputs), inputs, grad)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    monkeypatch.setattr(fused_mlp_module, "_min_bm", lambda device: 4)  # 10 rows for 3 tiles
    monkeypatch.setattr(fused_mlp_module, "_parts_buffer",
                        lambda rows, cols, device: torch.full((rows, cols), float("nan"), device=device))
    c = torch.autograd.grad(fused_mlp(*inputs), inputs, grad)
    assert torch.equal(c[2], a[2])


def test_only_the_gradients_asked_for():
    """A frozen input (or frozen weights) is not differentiated; the rest is as before."""
    torch.manual_seed(3)
    inputs, grad = _random((20,), 16, 64, 16, torch.float32)
    full = torch.autograd.grad(fused_mlp(*inputs), inputs, grad)
    x = inputs[0].detach()
    part = torch.autograd.grad(fused_mlp(x, *inputs[1:]), inputs[1:], grad)
    assert all(torch.equal(p, f) for p, f in zip(part, full[1:]))


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the ops."""
    torch.manual_seed(4)
    (x, w1, b1, w2, b2), grad = _random((20,), 16, 64, 16, torch.float32)
    torch.library.opcheck(torch.ops.itpn.fused_mlp.default, (x, w1, b1, w2, b2))
    h = torch.randn(20, 64)
    torch.library.opcheck(torch.ops.itpn.fc1_gelu.default, (x.detach(), w1.detach(), b1.detach()))
    torch.library.opcheck(torch.ops.itpn.fc2_dgrad_gelu.default, (grad, w2.detach(), h))


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_blocks_match_the_separate_kernels(layer_scale):
    """A transformer block (layer scale folded into fc2: its gain's gradient too) and a C-MLP
    block; the kernels must actually run (counted)."""
    calls = []
    real = fused_mlp_module._fused_mlp
    for heads, shape in ((2, (2, 9, 32)), (0, (2, 4, 2, 2, 32))):
        results = []
        for fused in (False, True):
            torch.manual_seed(5)
            block = Block(32, heads, layer_scale=layer_scale)
            block.mlp.fused = fused
            x = torch.randn(*shape, requires_grad=True)
            fused_mlp_module._fused_mlp = lambda *a: calls.append(1) or real(*a)
            try:
                y = block(x)
            finally:
                fused_mlp_module._fused_mlp = real
            y.square().mean().backward()
            results.append([y.detach(), x.grad] + [p.grad for p in block.parameters()])
        for a, b in zip(*results):
            assert _rel(a, b) < 1e-5
    assert len(calls) == 2


def test_autocast_runs_the_kernels_in_its_dtype():
    """fp32 parameters under bf16 autocast (the benchmark's setting): the kernels take bf16
    operands, as the Linears would, and the gradients reach the fp32 parameters."""
    torch.manual_seed(6)
    mlp = Mlp(32, 128)
    x = torch.randn(2, 9, 32)
    outs = {}
    for fused in (False, True):
        mlp.fused = fused
        mlp.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(x)
        y.float().square().mean().backward()
        outs[fused] = (y, mlp.fc1.weight.grad, mlp.fc1.bias.grad)
    assert outs[True][0].dtype == torch.bfloat16 and outs[True][1].dtype == torch.float32
    for a, b in zip(outs[True], outs[False]):
        assert _rel(a, b) < 2e-2


def test_compiled_and_checkpointed_blocks():
    """Inside a compiled block the op is opaque (one graph, no break), with eager's values;
    activation checkpointing replays it in the backward."""
    torch.manual_seed(7)
    block = Block(32, 2, layer_scale=0.1)
    block.mlp.fused = True
    x = torch.randn(2, 9, 32, requires_grad=True)
    want = block(x)
    (gx,) = torch.autograd.grad(want.sum(), x)
    compiled = torch.compile(Block._forward, backend="aot_eager", fullgraph=True, dynamic=False)
    got = compiled(block, x, None, None)
    (cx,) = torch.autograd.grad(got.sum(), x)
    assert _rel(got, want) < 1e-6 and _rel(cx, gx) < 1e-6
    block.grad_checkpointing = True
    (kx,) = torch.autograd.grad(block(x).sum(), x)
    assert torch.equal(kx, gx)
