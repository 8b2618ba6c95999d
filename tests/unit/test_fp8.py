"""FP8 matmuls (itpn/layers/fp8.py): each of the three GEMMs computes exactly the product of
the dequantised fp8 operands it is documented to use, the whole stays within fp8 precision
of the fp32 Linear, autocast and bf16 weights give the dtypes F.linear gives, the engine
switches on the transformer blocks' linears only, and FP8 saves half of each Linear's saved input and weight."""

import pytest
import torch
import torch.nn.functional as F

from itpn.engine.build import apply_block_options
from itpn.layers import Block, ScaledLinear, relative_position_index
from itpn.layers.fp8 import E4M3, E5M2, fp8_linear, scaled_mm, to_fp8
from itpn.models.flops import saved_activation_bytes


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dequant(t, dtype):
    t8, inv = to_fp8(t, dtype)
    return t8.float() * inv


def test_to_fp8_maps_the_largest_magnitude_to_the_format_maximum():
    t = torch.tensor([[0.5, -3.0], [1e-3, 2.0]])
    for dtype in (E4M3, E5M2):
        t8, inv = to_fp8(t, dtype)
        assert t8.dtype == dtype
        assert t8.float().abs().max().item() == torch.finfo(dtype).max  # -3.0 -> -fmax
        assert (t8.float() * inv)[0, 1].item() == pytest.approx(-3.0, rel=1e-6)
    zeros8, inv = to_fp8(torch.zeros(4, 4), E4M3)
    assert torch.isfinite(inv) and not zeros8.float().any()


def test_cpu_product_is_torchs_scaled_mm():
    g = torch.Generator().manual_seed(0)
    a8, a_inv = to_fp8(torch.randn(40, 64, generator=g), E5M2)
    b8, b_inv = to_fp8(torch.randn(32, 64, generator=g), E4M3)
    for out_dtype in (torch.float32, torch.bfloat16):
        ours = scaled_mm(a8, b8.t(), a_inv, b_inv, out_dtype)
        torch.testing.assert_close(ours, torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype))
        assert ours.dtype == out_dtype


@pytest.mark.parametrize("rows", [64, 30])  # 30: the weight gradient pads the tokens to 32
def test_fp8_linear_is_the_product_of_the_dequantised_operands(rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 96, generator=g).requires_grad_()
    w = (torch.randn(48, 96, generator=g) * 0.05).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_()
    grad = torch.randn(rows, 48, generator=g)
    out = fp8_linear(x, w, b)
    out.backward(grad)
    xq, wq, gq = _dequant(x.detach(), E4M3), _dequant(w.detach(), E4M3), _dequant(grad, E5M2)
    torch.testing.assert_close(out, xq @ wq.T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gq.T @ xq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, grad.sum(0))
    # ... which is the fp32 Linear to fp8 precision (e4m3: 3 mantissa bits; e5m2 gradients: 2).
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.linear(xr, wr, b).backward(grad)
    assert 1e-3 < _rel(out, F.linear(xr, wr, b)) < 0.04
    assert 1e-3 < _rel(x.grad, xr.grad) < 0.1
    assert 1e-3 < _rel(w.grad, wr.grad) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_fp8_linear_has_eagers_gradients(dtype):
    """Under torch.compile too: on torch 2.11, an output cast to the dtype it already had made
    every input gradient zero (fp32, the CPU's and the demo's dtype)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 64, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(48, 64, generator=g, dtype=dtype).requires_grad_()
    grad = torch.randn(30, 48, generator=g, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(fp8_linear, backend="aot_eager", fullgraph=True)
    want = torch.autograd.grad(fp8_linear(x, w), (x, w), grad)
    got = torch.autograd.grad(compiled(x, w), (x, w), grad)
    torch._dynamo.reset()
    for a, b in zip(got, want):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scaled_linear_fp8_dtypes_and_folded_gain():
    torch.manual_seed(0)
    lin = ScaledLinear(32, 64)
    lin.fp8 = True
    gain = torch.full((64,), 0.1, requires_grad=True)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x, gain)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 64)
    out.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and gain.grad is not None
    assert _rel(out, 0.1 * F.linear(x, lin.weight, lin.bias)) < 0.04
    lin_bf16 = ScaledLinear(32, 64).to(torch.bfloat16)  # DeepSpeed's bf16: weights and activations bf16
    lin_bf16.fp8 = True
    xb = torch.randn(10, 32, dtype=torch.bfloat16, requires_grad=True)
    lin_bf16(xb).sum().backward()
    assert xb.grad.dtype == lin_bf16.weight.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="in=32, out=40"):
        ScaledLinear(32, 40).fp8 = True


def _block(dim=64, heads=4):
    torch.manual_seed(0)
    return Block(dim, heads, layer_scale=0.1, rel_pos_grid=4)


def test_engine_switches_fp8_on_in_transformer_blocks_only():
    model = torch.nn.Sequential(_block(), Block(48, 0))  # a 48-d C-MLP block: fc1 48 -> 192, stays bf16
    apply_block_options(model, 0, False, False, fp8=True)
    lins = {n: m.fp8 for n, m in model.named_modules() if isinstance(m, ScaledLinear)}
    assert lins == {"0.attn.qkv": True, "0.attn.proj": True, "0.mlp.fc1": True, "0.mlp.fc2": True,
                    "1.mlp.fc1": False, "1.mlp.fc2": False}
    apply_block_options(model, 0, False, False, fp8=False)
    assert not any(m.fp8 for m in model.modules() if isinstance(m, ScaledLinear))
    with pytest.raises(ValueError, match=r"^1\.attn\.qkv: FP8 .* in=40, out=120"):
        apply_block_options(torch.nn.Sequential(_block(), Block(40, 4)), 0, False, False, fp8=True)


def test_fp8_block_trains_like_bf16_and_saves_half_the_linear_bytes():
    idx = relative_position_index(4)
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for fp8 in (False, True):
        blk = _block()
        apply_block_options(blk, 0, False, False, fp8=fp8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved = saved_activation_bytes(lambda: blk(x, idx), blk)
            out = blk(x, idx)
        out.float().pow(2).mean().backward()
        results[fp8] = saved, out, {n: p.grad for n, p in blk.named_parameters()}
    (saved_bf16, out_bf16, grads_bf16), (saved_fp8, out_fp8, grads_fp8) = results[False], results[True]
    assert _rel(out_fp8, out_bf16) < 0.01  # the residual stream dominates the output
    for name, grad in grads_bf16.items():
        assert _rel(grads_fp8[name], grad) < 0.15, name
    # Each of the four Linears saves its (tokens, in) input and the (out, in) weight autocast
    # cast as 1 byte each instead of bf16's 2, plus two fp32 scales.
    tokens = 4 * 16
    inputs = tokens * (64 + 64 + 64 + 256)
    weights = 192 * 64 + 64 * 64 + 256 * 64 + 64 * 256
    assert saved_bf16 - saved_fp8 == inputs + weights - 4 * 2 * 4


def _fp8_demo_config(tmp_path):
    from itpn.engine.config import load_config
    (tmp_path / "manifest.json").write_text("{}")
    return load_config("demo", [f"data.train={tmp_path}", "deepspeed.fp8=true"])


@pytest.mark.parametrize("capability,name,fails", [((8, 0), "NVIDIA A100-SXM4-80GB", True),
                                                   ((8, 9), "NVIDIA L40S", False),
                                                   ((9, 0), "NVIDIA H100 80GB HBM3", False)])
def test_preflight_refuses_fp8_on_a_gpu_without_fp8_tensor_cores(capability, name, fails, tmp_path, monkeypatch):
    from itpn.engine.config import ConfigError
    from itpn.engine.preflight import preflight
    cfg = _fp8_demo_config(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    if fails:
        with pytest.raises(ConfigError, match=r"deepspeed.fp8=true needs FP8 tensor cores .* A100-SXM4-80GB, is sm80"):
            preflight(cfg, 1)
    else:
        preflight(cfg, 1)
    cfg["deepspeed"]["fp8"] = False
    preflight(cfg, 1)  # bf16 runs anywhere


def test_preflight_accepts_fp8_on_the_cpu(tmp_path, monkeypatch):
    from itpn.engine.preflight import preflight
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preflight(_fp8_demo_config(tmp_path), 1)
