"""GPU checks (skipped without CUDA): the fast paths compute what the naive path computes,
to bf16 tolerance, and the intended attention kernel really runs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from itpn.layers import Attention, attention_impl, relative_position_index
from itpn.layers import bias_attention as bias_attention_module
from itpn.layers.bias_attention import bias_attention, reference
from itpn.models import HiViTConfig
from itpn.objectives.clip_mfm import ClipMFM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = torch.device("cuda")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rel_bias_runs_on_memory_efficient_kernel():
    attn = Attention(768, 12, rel_pos_grid=14).to(DEV)
    x = torch.randn(8, 196, 768, device=DEV, requires_grad=True)
    idx = relative_position_index(14, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # raises if the kernel refuses the bias
            y = attn(x, idx, (14, 14))
        y.float().square().mean().backward()
        with attention_impl("naive"):
            y2 = attn(x, idx, (14, 14))
    assert rel(y, y2) < 1e-2


def _clip_model():
    cfg = HiViTConfig(img_size=224, embed_dim=256, depths=(1, 1, 4), num_heads=4, layer_scale=0.1)
    return ClipMFM(cfg, teacher_dim=128, fpn_dim=128, fpn_depth=1).to(DEV)


def _grads(model, x, mask, targets, impl, dtype, compile_blocks=False):
    model.zero_grad(set_to_none=True)
    with attention_impl(impl), torch.autocast("cuda", dtype=dtype):
        out = model(x, mask, targets=targets)
    out["loss"].backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _flat(grads):
    return torch.cat([g.float().flatten() for g in grads.values()])


def test_fast_path_matches_naive_outputs_and_grads():
    """SDPA + bf16 (fast) and naive attention + fp16 (the reference's settings) both land
    within bf16 tolerance of an fp32 naive reference, outputs and gradients alike."""
    torch.manual_seed(0)
    model = _clip_model()
    x = torch.randn(4, 3, 224, 224, device=DEV)
    mask = torch.rand(4, 196, device=DEV) < 0.4
    targets = torch.nn.functional.layer_norm(torch.randn(4, 196, 128, device=DEV), (128,))
    ref_out, ref_g = _grads(model, x, mask, targets, "naive", torch.float32)
    for impl, dtype in (("sdpa", torch.bfloat16), ("naive", torch.float16)):
        out, g = _grads(model, x, mask, targets, impl, dtype)
        assert rel(out["mfm"], ref_out["mfm"]) < 2e-2, (impl, dtype)
        assert abs(out["loss"].item() - ref_out["loss"].item()) / ref_out["loss"].item() < 1e-2
        assert rel(_flat(g), _flat(ref_g)) < 3e-2, (impl, dtype, rel(_flat(g), _flat(ref_g)))


@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_fused_bias_attention_matches_naive_including_bias_grad(impl, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(256, 4, rel_pos_grid=14).to(DEV)
    idx = relative_position_index(14, device=DEV)
    x = torch.randn(4, 196, 256, device=DEV)
    calls = []
    real = bias_attention_module.bias_attention
    monkeypatch.setattr(bias_attention_module, "bias_attention", lambda *a: calls.append(1) or real(*a))
    grads = {}
    for name in ("naive", impl):
        attn.zero_grad(set_to_none=True)
        with attention_impl(name), torch.autocast("cuda", dtype=torch.bfloat16):
            y = attn(x, idx, (14, 14))
        y.float().square().mean().backward()
        grads[name] = (y.detach(), attn.relative_position_bias_table.grad.clone(), attn.qkv.weight.grad.clone())
    assert len(calls) == (impl == "triton")  # the kernel ran, not a fallback
    for a, b in zip(grads[impl], grads["naive"]):
        assert rel(a, b) < 2e-2


@pytest.mark.parametrize("n,bias_kind", [(196, "shared"), (49, "per_sample"), (256, "shared"), (196, "none"),
                                         (196, "frozen")])
def test_bias_attention_kernels_match_fp32_reference(n, bias_kind):
    """The compiled Triton kernels (bf16 tensor-core dots, autotuned tiles) against fp32 torch:
    iTPN-L's 196 tokens with one bias for the batch, pixel MIM's 49 kept tokens with a
    per-sample bias, a length that fills every tile, no bias, and a bias without gradient
    (each variant autotunes on its first call, which must leave every input intact)."""
    torch.manual_seed(0)
    B, H, d = 8, 12, 64
    qkv = torch.randn(B, n, 3, H, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    bias = None if bias_kind == "none" else torch.randn(*((B,) if bias_kind == "per_sample" else ()), H, n, n,
                                                         device=DEV, requires_grad=bias_kind != "frozen")
    grad = torch.randn(B, n, H, d, device=DEV, dtype=torch.bfloat16)
    inputs = (qkv, bias) if bias is not None and bias.requires_grad else (qkv,)
    out = bias_attention(qkv, bias)
    got = torch.autograd.grad(out, inputs, grad)
    ref = reference(qkv.float(), bias)
    want = torch.autograd.grad(ref, inputs, grad.float())
    assert rel(out, ref) < 1e-2
    for g, w in zip(got, want):
        assert rel(g, w) < 2e-2
    again = torch.autograd.grad(bias_attention(qkv, bias), inputs, grad)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic: no atomics


@pytest.mark.parametrize("m,dim,hidden,dtype", [(32 * 196, 768, 3072, torch.bfloat16),  # iTPN-L stage 3
                                               (8 * 49 + 5, 512, 2048, torch.float16),  # partial row tile
                                               (4 * 3136, 192, 768, torch.bfloat16)])  # a C-MLP stage
def test_fused_mlp_kernels_match_fp32_reference(m, dim, hidden, dtype):
    """The compiled, autotuned kernels on the tensor cores: output and all five gradients
    within the separate kernels' own distance from fp32 (plus a little), and bit-identical
    reruns (fc1's bias gradient is summed without atomics)."""
    from itpn.layers.fused_mlp import fused_mlp, reference
    torch.manual_seed(0)
    x = torch.randn(m, dim, device=DEV)
    w1, b1 = torch.randn(hidden, dim, device=DEV) * dim ** -0.5, torch.randn(hidden, device=DEV)
    w2, b2 = torch.randn(dim, hidden, device=DEV) * hidden ** -0.5, torch.randn(dim, device=DEV) * 0.1
    inputs = [t.to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    grad = torch.randn(m, dim, device=DEV, dtype=dtype)
    ref = reference(*inputs)
    want = [ref, *torch.autograd.grad(ref, inputs, grad)]
    x_, w1_, b1_, w2_, b2_ = inputs
    sep = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x_, w1_, b1_)), w2_, b2_)
    seps = [sep, *torch.autograd.grad(sep, inputs, grad)]
    runs = []
    for _ in range(2):
        y = fused_mlp(*inputs)
        runs.append([y, *torch.autograd.grad(y, inputs, grad)])
    for got, s, w in zip(runs[0], seps, want):
        assert got.dtype == w.dtype and got.shape == w.shape
        assert rel(got, w) < 1.5 * rel(s, w) + 1e-3, (rel(got, w), rel(s, w))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("ckpt,fp8", [(False, False), (True, False), (False, True)])
def test_compiled_blocks_match_eager(ckpt, fp8):
    """Compiled blocks, also with activation checkpointing (the checkpoint in eager around
    the compiled region), on inductor/CUDA: same outputs and gradients as eager, to bf16
    tolerance; with FP8 linears (inductor fuses the scaling and casts), to fp8 precision."""
    from itpn.engine.build import apply_block_options
    torch.manual_seed(0)
    model = _clip_model()
    x = torch.randn(2, 3, 224, 224, device=DEV)
    mask = torch.rand(2, 196, device=DEV) < 0.4
    targets = torch.randn(2, 196, 128, device=DEV)
    eager_out, eager_g = _grads(model, x, mask, targets, "sdpa", torch.bfloat16)
    assert (apply_block_options(model, 1, ckpt, True, fp8=fp8) > 0) == ckpt
    out, g = _grads(model, x, mask, targets, "sdpa", torch.bfloat16)
    if fp8:
        assert rel(out["mfm"], eager_out["mfm"]) < 5e-2
        assert rel(_flat(g), _flat(eager_g)) < 0.1, rel(_flat(g), _flat(eager_g))
        return
    assert rel(out["mfm"], eager_out["mfm"]) < 1e-2
    worst = max(rel(g[n], eager_g[n]) for n in g if eager_g[n].norm() > 0)
    assert worst < 3e-2, worst


@pytest.mark.parametrize("rows", [2 * 196, 30])  # 30: the weight gradient's padded inner dimension
def test_fp8_gemms_are_the_dequantised_product(rows):
    """cuBLAS's FP8 GEMMs take our operand layouts and compute the product of the dequantised
    operands (the device-independent definition, computed in fp32 on the CPU)."""
    from itpn.layers.fp8 import E4M3, E5M2, fp8_linear, to_fp8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 768, generator=g)
    w = torch.randn(3072, 768, generator=g) * 0.02
    grad = torch.randn(rows, 3072, generator=g)
    xc, wc = x.to(DEV).requires_grad_(), w.to(DEV).requires_grad_()
    out = fp8_linear(xc, wc)
    out.backward(grad.to(DEV))

    def dq(t, dtype):
        t8, inv = to_fp8(t, dtype)
        return t8.float() * inv
    xq, wq, gq = dq(x, E4M3), dq(w, E4M3), dq(grad, E5M2)
    assert rel(out.cpu(), xq @ wq.T) < 1e-3  # forward: cuBLAS's fast accumulation
    # Backward (no fast accumulation): 1.04e-4 and 1.05e-4 on an H200 (2026-12-04), the
    # tensor cores' own FP8 accumulation; a wrong operand layout or scale is off by O(1).
    assert rel(xc.grad.cpu(), gq @ wq) < 3e-4
    assert rel(wc.grad.cpu(), gq.T @ xq) < 3e-4


@pytest.mark.parametrize("recipe,setting", [("tiny", "fused"), ("tiny", "compile"), ("tiny", "fp8"),
                                            ("tiny", "triton"), ("tiny", "mlp")])
def test_training_step_has_no_host_sync(recipe, setting):
    """The benchmark's step (teacher forward, student forward + backward, clipping, fused
    AdamW) after warm-up issues no host-device synchronisation: CUDA's sync debug mode
    turns any into an error. "triton": our attention kernel, its autotuning (which does
    synchronise) done in the warm-up steps; "mlp": and the fused MLP kernels."""
    from itpn.cli import bench
    cfg = bench.load_recipe(recipe)
    fixed = bench.make_batch(cfg, 4, DEV)
    with attention_impl(bench.LADDER[setting]["attn"]):
        step = bench.TrainStep(cfg, bench.LADDER[setting], 4, DEV, iter(lambda: fixed, None))
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("setting,zero,precision", [("fused", "zero1", None), ("compile", "zero1", None),
                                                    ("fused", "zero0", "bf16_autocast")])
def test_deepspeed_step_has_no_host_sync(tmp_path, setting, zero, precision):
    """The trainer's engine (DeepSpeed ZeRO-1, bf16, clipping; our device-side clip and no
    bf16 overflow check; or fp32 weights under autocast without ZeRO, with torch's clip) after
    warm-up: no host read of a device tensor and no synchronising CUDA call in a step
    (``itpn-bench --check-syncs``; a subprocess, as DeepSpeed initialises a process group)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "b.jsonl"
    extra = ["--ds-precision", precision] if precision else []
    proc = subprocess.run([sys.executable, "-m", "itpn.cli.bench", "--recipe", "tiny", "--batch", "4", "--steps", "2",
                           "--warmup", "2", "--ladder", setting, "--zero", zero, *extra, "--check-syncs",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["zero_stage"] == int(zero[-1])
    assert row["host_reads"] == 0 and row["accelerator_syncs"] == 0 and row["cuda_syncs"] == 0, row["sync_report"]


def test_deepspeed_zero3_offload_runs_compiled_blocks(tmp_path):
    """ZeRO-3 with parameters and optimizer on the host, compiled blocks, one GPU (the setting
    of the 24 GiB target): the engine's alignment check passes (DeepSpeed copies each
    offloaded partition into a device buffer of its own; on the CPU the same setting is
    refused, as the partitions are views of one flat buffer there), and each block is one
    gathering unit, so dynamo makes its graphs without a break."""
    import json
    import subprocess
    import sys
    out = tmp_path / "b.jsonl"
    proc = subprocess.run([sys.executable, "-m", "itpn.cli.bench", "--recipe", "tiny", "--batch", "4", "--steps", "2",
                           "--warmup", "1", "--ladder", "fold", "--zero", "zero3_offload", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["zero_stage"] == 3 and row["offload_param"] and row["img_s"] > 0, row
    assert row["dynamo_graphs"] > 0 and row["graph_breaks"] == 0, row
