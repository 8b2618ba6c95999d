"""The fused relative-bias attention (itpn/layers/bias_attention.py) on the CPU: its Triton
kernels in Triton's interpreter (a subprocess, see bias_attention_interpreted.py), its input
checks, and the Attention module's fallback where the kernel cannot run."""

import os
import sys
from pathlib import Path

import pytest
import torch

from itpn.layers import attention_impl
from itpn.layers.attention import Attention, relative_position_index
from itpn.layers.bias_attention import bias_attention

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_match_reference_in_triton_interpreter(run_interpreted):
    run_interpreted("bias_attention_interpreted.py")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted CPU path")
def test_inputs_are_checked_by_name():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"qkv must be \(B, N, 3, H, d\).*\(2, 20, 2, 16\)"):
        bias_attention(torch.randn(2, 20, 2, 16))
    with pytest.raises(ValueError, match="head dim 24"):
        bias_attention(torch.randn(2, 20, 3, 2, 24))
    with pytest.raises(ValueError, match=r"bias must be a float32 \(2, 20, 20\).*\(2, 20, 19\)"):
        bias_attention(torch.randn(2, 20, 3, 2, 16), torch.randn(2, 20, 19))
    with pytest.raises(ValueError, match=r"unit last stride.*strides \(1, 2, 40\)"):
        bias_attention(torch.randn(2, 20, 3, 2, 16), torch.randn(20, 20, 2).permute(2, 1, 0))
    with pytest.raises(ValueError, match="torch.bfloat16"):
        bias_attention(torch.randn(2, 20, 3, 2, 16), torch.randn(2, 20, 20).bfloat16())
    with pytest.raises(RuntimeError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        bias_attention(torch.randn(2, 20, 3, 2, 16), torch.randn(2, 20, 20))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted CPU path")
def test_attention_falls_back_to_sdpa_where_the_kernel_cannot_run():
    """CPU tensors outside the interpreter: the "triton" setting computes what "sdpa" does."""
    torch.manual_seed(0)
    attn = Attention(32, 2, rel_pos_grid=5)
    x = torch.randn(2, 25, 32)
    idx = relative_position_index(5)
    outs = []
    for impl in ("sdpa", "triton"):
        with attention_impl(impl):
            outs.append(attn(x, idx, (5, 5)))
    assert torch.equal(outs[0], outs[1])


def test_preflight_checks_the_attention_setting(tmp_path, monkeypatch):
    from itpn.engine.config import ConfigError, load_config
    from itpn.engine.preflight import preflight
    from itpn.layers import triton_support as module
    (tmp_path / "manifest.json").write_text("{}")
    cfg = load_config("demo", [f"data.train={tmp_path}", "deepspeed.attention=fused"])
    with pytest.raises(ConfigError, match="deepspeed.attention must be sdpa, triton or flex, got 'fused'"):
        preflight(cfg, 1)
    cfg["deepspeed"]["attention"] = "triton"
    if module.available():
        preflight(cfg, 1)
    monkeypatch.setattr(module, "triton", None)
    with pytest.raises(ConfigError, match="deepspeed.attention=triton needs Triton"):
        preflight(cfg, 1)


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_kernels_compile_for_the_h100_without_spilling(kernel):
    """Triton compiles each kernel for sm90 ahead of time and its bundled ptxas assembles it
    (no GPU involved): the GPU-only code path builds, and the autotuner's largest config of
    each kernel fits the H100's registers (no spills beyond a few bytes) and shared memory
    (227 KB per block). benchmarks/kernel_resources.py prints every config."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from kernel_resources import _kernels, compile_report
    finally:
        sys.path.pop(0)
    configs = _kernels("bf16")[kernel][3]
    largest = max(configs, key=lambda c: (c[0] * c[1], c[3]))
    report = compile_report(kernel, largest, arch=90, head_dim=64)
    assert report["registers"] <= 255
    assert report["spill_bytes"] <= 16, report
    assert 0 < report["shared_bytes"] <= 227 * 1024, report


def test_triton_fallbacks_name_the_module_and_the_reason():
    from torch import nn

    from itpn.layers.attention import triton_fallbacks
    model = nn.ModuleDict(dict(a=Attention(64, 2), b=Attention(48, 2)))  # head dims 32 and 24
    on_cpu = triton_fallbacks(model, "cpu", torch.bfloat16)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert on_cpu == ["a: tensors on cpu, not CUDA", "b: tensors on cpu, not CUDA"]
    from itpn.layers import bias_attention as module
    reasons = [module.unusable_reason("cuda", torch.float32, 32), module.unusable_reason("cuda", torch.bfloat16, 24),
               module.unusable_reason("cuda", torch.bfloat16, 64)]
    if module.available() and os.environ.get("TRITON_INTERPRET") != "1":
        assert reasons == ["torch.float32 (bf16 or fp16 on CUDA)", "head dim 24 (a power of two >= 16)", None]
