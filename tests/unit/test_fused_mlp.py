"""The fused MLP (itpn/layers/fused_mlp.py) on the CPU: its Triton kernels in Triton's
interpreter (a subprocess, see fused_mlp_interpreted.py), its input checks, the Mlp module's
fallback where the kernels cannot run, the engine's switches, and the kernels compiled for
the H100 ahead of time."""

import os
import sys
from pathlib import Path

import pytest
import torch

from itpn.layers import Mlp
from itpn.layers import fused_mlp as module
from itpn.layers import triton_support
from itpn.layers.fused_mlp import fused_mlp

ROOT = Path(__file__).resolve().parents[2]
NOT_INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="checks the non-interpreted CPU path")


def test_kernels_match_reference_in_triton_interpreter(run_interpreted):
    run_interpreted("fused_mlp_interpreted.py")


def _params(dim=16, hidden=64, out=16, dtype=torch.float32):
    return (torch.randn(hidden, dim, dtype=dtype), torch.randn(hidden, dtype=dtype),
            torch.randn(out, hidden, dtype=dtype), torch.randn(out, dtype=dtype))


@NOT_INTERPRETED
def test_inputs_are_checked_by_name():
    pytest.importorskip("triton")
    w1, b1, w2, b2 = _params()
    with pytest.raises(ValueError, match=r"expected x \(M, 16\).*got x \(4, 12\)"):
        fused_mlp(torch.randn(4, 12), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"one dtype.*torch.bfloat16.*torch.float32"):
        fused_mlp(torch.randn(4, 16), w1.bfloat16(), b1, w2, b2)
    w1, b1, w2, b2 = _params(hidden=60)
    with pytest.raises(ValueError, match="widths 16 -> 60 -> 16 must be multiples of 8"):
        fused_mlp(torch.randn(4, 16), w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        fused_mlp(torch.randn(4, 16), *_params())


@NOT_INTERPRETED
def test_mlp_runs_the_separate_kernels_where_the_fused_ones_cannot():
    """CPU tensors outside the interpreter: a fused Mlp computes what the plain one does, and
    says why it did not fuse (also for FP8 linears and odd widths)."""
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(2, 5, 16)
    want = mlp(x)
    mlp.fused = True
    assert torch.equal(mlp(x), want)
    if module.available():
        assert mlp.fused_reason("cpu", torch.float32) == "tensors on cpu, not CUDA"
        assert mlp.fused_reason("cuda", torch.float32) == "torch.float32 (bf16 or fp16 on CUDA)"
        assert mlp.fused_reason("cuda", torch.bfloat16) is None
        assert Mlp(16, 60).fused_reason("cuda", torch.bfloat16) == "widths 16 -> 60 -> 16 (multiples of 8)"
    mlp.fc1.fp8 = True
    assert mlp.fused_reason("cuda", torch.bfloat16) == "FP8 linears"


def test_engine_switches_every_mlp_and_zero3_gathers_it_with_its_block():
    """apply_block_options sets Mlp.fused on every MLP of the model (transformer blocks, C-MLP
    blocks, pyramid). The fused path reads fc1's and fc2's parameters in the Mlp's forward, not
    theirs; under ZeRO-3 they are gathered because every MLP sits inside a block that
    zero3_gather_per_block makes one gathering unit (DeepSpeed's leaf), which installs no hook
    below it."""
    from deepspeed.utils import z3_leaf_module

    from itpn.engine.build import apply_block_options, build_objective, zero3_gather_per_block
    from itpn.engine.config import load_config
    from itpn.layers import Block
    cfg = load_config("demo", ["teacher.weights=null"])
    model = build_objective(cfg)
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    apply_block_options(model, 0, False, False, fused_mlp=True)
    assert mlps and all(m.fused for m in mlps)
    blocks = [b for b in model.modules() if isinstance(b, Block)]
    assert zero3_gather_per_block(model) == len(blocks)
    assert [m for m in model.modules() if z3_leaf_module(m)] == blocks
    inside = {id(m) for b in blocks for m in b.mlp.modules()}
    assert all(id(m) in inside for m in mlps)
    assert zero3_gather_per_block(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
    apply_block_options(model, 0, False, False)
    assert not any(m.fused for m in mlps)


def test_preflight_checks_the_setting(tmp_path, monkeypatch):
    from itpn.engine.config import ConfigError, load_config
    from itpn.engine.preflight import preflight
    (tmp_path / "manifest.json").write_text("{}")
    cfg = load_config("demo", [f"data.train={tmp_path}"])
    cfg["deepspeed"]["fused_mlp"] = "yes"
    with pytest.raises(ConfigError, match="deepspeed.fused_mlp must be true or false, got 'yes'"):
        preflight(cfg, 1)
    cfg["deepspeed"]["fused_mlp"] = True
    if module.available():
        preflight(cfg, 1)
    monkeypatch.setattr(triton_support, "triton", None)
    with pytest.raises(ConfigError, match="deepspeed.fused_mlp=true needs Triton"):
        preflight(cfg, 1)


@pytest.mark.parametrize("kernel", ["mlp_fwd", "mlp_dgrad"])
def test_kernels_compile_for_the_h100_on_its_tensor_cores(kernel):
    """Each autotuner config of both kernels compiles for sm90, specialized as for iTPN-L's
    stage-3 MLP, without spilling, within the H100's 227 KB of shared memory, pipelined
    (at least two stages of tiles in shared memory), and on Hopper's warpgroup MMA (wgmma),
    without which a GEMM gets a fraction of the tensor cores' rate. Compiled ahead of time
    with Triton's bundled ptxas; no GPU involved."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from kernel_resources import _kernels, compile_report
    finally:
        sys.path.pop(0)
    for config in _kernels("bf16")[kernel][3]:
        bm, bn, bk = config[:3]
        report = compile_report(kernel, config, arch=90)
        assert report["spill_bytes"] == 0 and report["mma"] == "wgmma", report
        assert 2 * (bm + bn) * bk * 2 <= report["shared_bytes"] <= 227 * 1024, report
