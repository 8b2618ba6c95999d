"""itpn-roofline (itpn/cli/roofline.py): bytes and FLOPs per op, the module each op of the
backward is attributed to, FLOPs that agree with the counter the benchmark uses, and
compiled blocks counted as moving fewer bytes than their eager ops."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from itpn.cli.bench import load_recipe, make_batch, teacher_flops
from itpn.cli.roofline import (NodeTagger, OpRecorder, _signature, block_kernels, compiled_block_bytes,
                               efficient_attention, fused_mlp_everywhere, main, print_ceilings, record_step, summarise,
                               teacher_block_bytes, touched_bytes, triton_attention, whole_objective_bytes)
from itpn.engine.build import build_objective
from itpn.layers import Block, attention_impl, relative_position_index
from itpn.objectives import clip_teacher
from itpn.objectives.clip_teacher import CLIPTeacher, target_width, teacher_forward_flops


def _record(model, *inputs):
    tracker = ModuleTracker()
    recorder = OpRecorder(tracker)
    with efficient_attention(), tracker, NodeTagger(tracker), recorder:
        out = model(*inputs)
        out.backward(torch.ones_like(out))
    return recorder.rows


def test_touched_bytes_counts_broadcast_dimensions_once():
    t = torch.empty(1, 4, 8, 8, dtype=torch.bfloat16, device="meta")
    assert touched_bytes(t) == 4 * 8 * 8 * 2
    assert touched_bytes(t.expand(16, 4, 8, 8)) == 4 * 8 * 8 * 2
    assert touched_bytes(t[:, :2]) == 2 * 8 * 8 * 2


def test_a_linear_moves_its_operands_and_its_backward_is_attributed_to_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 48)
            self.act = nn.GELU()
            self.out = nn.Linear(48, 16)

        def forward(self, x):
            return self.out(self.act(self.fc(x)))

    with torch.device("meta"):
        net = Net().to(torch.bfloat16)
    x = torch.empty(10, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    rows = _record(net, x)
    addmm = [r for r in rows if r[3] == "aten.addmm" and r[0] == "Net.fc"]
    assert len(addmm) == 1
    _, phase, kind, _, flops, nbytes = addmm[0]
    assert (phase, kind, flops) == ("forward", "gemm", 2 * 10 * 32 * 48)
    assert nbytes == 2 * (48 + 10 * 32 + 32 * 48 + 10 * 48)  # bias, input, weight read; output written
    gelu_bw = [r for r in rows if r[3] == "aten.gelu_backward"]
    assert [(r[0], r[1]) for r in gelu_bw] == [("Net.act", "backward")]
    # Every gradient GEMM of fc runs in fc's node; none is left to "Global".
    assert {r[0] for r in rows if r[1] == "backward" and r[2] == "gemm"} == {"Net.fc", "Net.out"}


def test_flops_agree_with_the_benchmarks_counter():
    rows, info = record_step("tiny", 4)
    cfg = load_recipe("tiny")
    width = target_width(cfg["teacher"]["arch"])
    cfg["objective"]["teacher_dim"] = width
    with torch.device("meta"):
        model = build_objective(cfg)
        x, mask, _ = make_batch(cfg, 4, "meta")
        targets = torch.empty(4, mask.shape[1], width)
    with attention_impl("naive"), FlopCounterMode(display=False) as counter:
        model(x, mask, targets=targets)["loss"].backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    gemm = sum(r[4] for r in rows if r[2] == "gemm")
    assert gemm == sum(v for k, v in counts.items() if k != "aten.bmm") > 0
    # The naive path's attention is 2 bmms forward and 4 backward; the fused kernel's
    # forward is the same 2.
    forward_attention = sum(r[4] for r in rows if r[3] == "aten._scaled_dot_product_efficient_attention")
    assert 3 * forward_attention == counts["aten.bmm"] > 0
    assert info["params"] == sum(p.numel() for p in model.parameters())


def test_compiled_block_moves_fewer_bytes_than_its_eager_ops():
    torch.manual_seed(0)
    with torch.device("meta"):
        block = Block(64, 2, 4.0, drop_path=0.1, layer_scale=0.1, rel_pos_grid=4).to(torch.bfloat16).train()
    index = relative_position_index(4, device="meta")

    def eager_bytes(b):
        block.zero_grad(set_to_none=True)  # else the second call adds into the first's gradients
        x = torch.empty(b, 16, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        return sum(r[5] for r in _record(lambda t: block(t, index, (4, 4)), x) if r[2] == "other")
    eager_per_image = (eager_bytes(4) - eager_bytes(2)) / 2
    assert eager_per_image == (eager_bytes(8) - eager_bytes(4)) / 4  # linear in the batch
    args = (torch.empty(2, 16, 64, device="meta", dtype=torch.bfloat16), index, (4, 4))
    sig = _signature(block, args)
    compiled = compiled_block_bytes({sig: (block, args)})[sig]
    assert 0 < compiled < eager_per_image
    # Our kernel takes qkv packed and returns its gradient packed: no stack of q, k, v gradients
    # (one (B, N, 3C) bf16 copy read and written: 2 x 16 x 192 x 2 bytes per image); it reads
    # the (H, N, N) bias in fp32, gathered from the table once per call (its share at batch 128).
    packed = compiled_block_bytes({sig: (block, args)}, attention="triton")[sig]
    assert packed <= compiled - 2 * 16 * 192 * 2 + 2 * 16 * 16 * 4 / 128


def test_triton_attention_is_recorded_as_one_op_each_way():
    with torch.device("meta"):
        block = Block(64, 2, 4.0, rel_pos_grid=4).to(torch.bfloat16).train()
    index = relative_position_index(4, device="meta")
    x = torch.empty(3, 16, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    tracker = ModuleTracker()
    recorder = OpRecorder(tracker)
    with triton_attention(), tracker, NodeTagger(tracker), recorder:
        block(x, index, (4, 4)).sum().backward()
    attn = [r for r in recorder.rows if r[2] == "attention"]
    assert [(r[0], r[1], r[3]) for r in attn] == [("Block.attn", "forward", "itpn.bias_attention"),
                                                  ("Block.attn", "backward", "itpn.bias_attention_backward")]
    fwd = 4 * 3 * 2 * 16 * 16 * 32  # 4 B H N^2 d
    assert attn[0][4] == fwd and attn[1][4] == 2 * fwd
    # forward: reads qkv (bf16) and the (H, N, N) fp32 bias, writes out (bf16) and the lse (fp32)
    assert attn[0][5] == 3 * 16 * 192 * 2 + 2 * 16 * 16 * 4 + 3 * 16 * 64 * 2 + 3 * 2 * 16 * 4


def test_fused_mlp_is_two_gemm_ops_and_its_epilogue_traffic():
    """The fused MLP is recorded as its two ops (their FLOPs those of the two GEMMs each way
    that they replace) plus their epilogues' own traffic: fc1's second output a, and h read
    by fc2's input-gradient kernel. GELU's forward and backward and fc1's bias gradient are
    gone from the non-GEMM ops: of the 8 hidden-sized passes, 4 remain (2 of them epilogue)."""
    m, c, hidden = 3 * 16, 64, 256
    rows = {}
    for mlp in ("separate", "fused"):
        with torch.device("meta"):
            block = Block(c, 0, 4.0).to(torch.bfloat16).train()
        block.mlp.fused = mlp == "fused"
        x = torch.empty(3, 16, c, device="meta", dtype=torch.bfloat16, requires_grad=True)
        with fused_mlp_everywhere():
            rows[mlp] = _record(block, x)
    fused = [r for r in rows["fused"] if r[3].startswith("itpn.")]
    assert [(r[1], r[2], r[3]) for r in fused] == [
        ("forward", "epilogue", "itpn.fused_mlp"), ("forward", "gemm", "itpn.fused_mlp"),
        ("backward", "epilogue", "itpn.fc2_dgrad_gelu"), ("backward", "gemm", "itpn.fc2_dgrad_gelu")]
    pass_bytes = m * hidden * 2
    assert fused[0][5] == pass_bytes and fused[2][5] == pass_bytes + hidden * 4
    gemm_flops = {mlp: sum(r[4] for r in rows[mlp] if r[2] == "gemm") for mlp in rows}
    assert gemm_flops["fused"] == gemm_flops["separate"] == 6 * 2 * m * c * hidden
    other = {mlp: sum(r[5] for r in rows[mlp] if r[2] in ("other", "epilogue")) for mlp in rows}
    # separate: GELU 2 passes, GELU' 3, the bias gradient 1 (fc1's output and fc2's input
    # gradient count in the GEMMs' bytes either way); fused: the 2 epilogue passes, and fc1's
    # bias gradient as fp32 parts cast to bf16 (a few bias-sized vectors)
    saved = other["separate"] - other["fused"]
    assert 4 * pass_bytes - 4 * hidden * 4 <= saved < 4 * pass_bytes, (saved, pass_bytes)
    assert not any(r[3] in ("aten.zeros", "aten.gelu", "aten.gelu_backward") for r in rows["fused"])
    # With the block's bytes counted by inductor (here: 1), its epilogue bytes still count.
    table = summarise(rows["fused"], 791e12, 3.35e12, compiled={"Block": 1.0})
    outside = sum(r[5] for r in rows["fused"] if r[2] == "other" and not r[0].startswith("Block"))
    total = sum(g["other_gb"] for g in table.values())
    assert total == pytest.approx((2 * pass_bytes + hidden * 4 + 1 + outside) / 1e9)


def test_cli_prints_the_table(capsys):
    main(["--recipe", "tiny", "--batch", "2", "--top", "3"])
    out = capsys.readouterr().out
    assert "encoder.blocks" in out and "student, all" in out and "optimizer" in out
    assert "step at the bounds, teacher GEMMs at the peak" in out


def test_ceilings_add_the_teacher_forward_and_its_traffic():
    """The step's ceiling: student + the teacher's forward FLOPs at the peak (from its config,
    the same count as the built tower's) + optimizer, then + each teacher traffic."""
    cfg = load_recipe("tiny")
    t = CLIPTeacher(cfg["teacher"]["arch"], None, image_size=cfg["teacher"]["image_size"])
    assert teacher_forward_flops(cfg["teacher"]["arch"], cfg["teacher"]["image_size"]) == teacher_flops(t) > 0
    peak = 1e12
    rows = print_ceilings(argparse.Namespace(recipe="tiny", batch=8), 10.0, 1.0, 5e9, peak,
                          {"eager": 4.0, "compiled": 2.0})
    base = 11.0 + 1e3 * 8 * teacher_flops(t) / peak
    assert [ms for _, ms, _ in rows] == pytest.approx([base, base + 4.0, base + 2.0])
    assert all(img_s == pytest.approx(8 / (ms / 1e3)) for _, ms, img_s in rows)


def test_cuda_codegen_counts_the_triton_kernels_inductor_writes_for_an_sm90_gpu():
    """Inductor's CUDA lowering without a GPU: the kernels are Triton source for cc 90, their
    bytes are the hand count, and the graph itself runs uncompiled on the CPU."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    from itpn.cli.cuda_codegen import counting_bytes, cuda_backend
    graphs, kernels = [], {}
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)

    def f(x, w):
        return F.gelu(x @ w).sum(-1)
    torch._dynamo.reset()
    with counting_bytes():
        y = torch.compile(f, backend=cuda_backend(graphs, kernels))(x, w)
    torch._dynamo.reset()
    assert torch.equal(y, f(x, w))
    assert len(graphs) == 2  # forward, and the backward lowered with it
    h, out = 4 * 16 * 32 * 2, 4 * 16 * 2  # bf16 bytes of x @ w and of the sum
    kernel_bytes = [[b for node, b in g if not isinstance(node, ExternKernelSchedulerNode)] for g in graphs]
    # forward: the GEMM is extern; one kernel reads h, applies GELU, writes the row sums.
    # backward: one kernel reads the sums' gradient and h, writes GELU's input gradient.
    assert kernel_bytes == [[h + out], [out + h + h]]
    assert len(kernels) == 2 and all(name.startswith("triton_") for name in kernels)
    assert all("@triton.jit" in src and "cc=90" in src for src in kernels.values())


def test_pretend_cuda_undoes_every_patch():
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.async_compile import AsyncCompile
    from triton.runtime.driver import driver

    from itpn.cli.cuda_codegen import H100, pretend_cuda
    before = (torch.cuda.is_available(), torch.cuda.get_device_properties, dict(CudaInterface.__dict__),
              AsyncCompile.__dict__["triton"], driver._active)
    with pretend_cuda():
        assert torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
        assert CudaInterface.get_device_properties(0) is H100
        assert driver.active.get_current_target().arch == 90
    after = (torch.cuda.is_available(), torch.cuda.get_device_properties, dict(CudaInterface.__dict__),
             AsyncCompile.__dict__["triton"], driver._active)
    assert after == before


def test_compiled_bytes_do_not_depend_on_the_order_of_the_signatures(tmp_path):
    """Inductor lowers the first graph in which it meets a custom op differently from later
    ones; the roofline counts the later lowering for every signature. Run in a fresh process,
    where our ops and the stand-ins have not been met yet."""
    import subprocess
    import sys
    script = tmp_path / "order.py"
    script.write_text(
        "import torch\n"
        "from itpn.cli.roofline import _signature, compiled_block_bytes\n"
        "from itpn.layers import Block, relative_position_index\n"
        "calls = {}\n"
        "for heads in (0, 2):\n"
        "    with torch.device('meta'):\n"
        "        block = Block(64, heads, 4.0, drop_path=0.1, layer_scale=0.1, rel_pos_grid=4 if heads else None)\n"
        "    block = block.to(torch.bfloat16).train()\n"
        "    args = (torch.empty(2, 16, 64, device='meta', dtype=torch.bfloat16),)\n"
        "    args += (relative_position_index(4, device='meta'), (4, 4)) if heads else (None, None)\n"
        "    calls[_signature(block, args)] = (block, args)\n"
        "first = compiled_block_bytes(calls, 'triton', 'fused')\n"
        "second = compiled_block_bytes(dict(reversed(list(calls.items()))), 'triton', 'fused')\n"
        "print('BYTES', sorted(first.values()), sorted(second.values()))\n"
        "assert first == second, (first, second)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BYTES" in proc.stdout


def test_block_kernels_add_up_to_the_blocks_compiled_bytes(capsys):
    with torch.device("meta"):
        block = Block(64, 2, 4.0, drop_path=0.1, layer_scale=0.1, rel_pos_grid=4).to(torch.bfloat16).train()
    args = (torch.empty(2, 16, 64, device="meta", dtype=torch.bfloat16), relative_position_index(4, device="meta"),
            (4, 4))
    sig = _signature(block, args)
    kernels = block_kernels(block, args, attention="triton", batch=8)
    assert {k[0] for k in kernels} == {"forward", "backward"}
    assert {k[1] for k in kernels} == {"pointwise", "reduction", "extern"}
    assert [k[3] for k in kernels if k[1] == "extern" and "packed_attention" in k[3]]  # our kernel, opaque
    assert sum(k[2] for k in kernels) == pytest.approx(
        compiled_block_bytes({sig: (block, args)}, "triton", batch=8)[sig])
    main(["--recipe", "tiny", "--batch", "2", "--kernels", "encoder.blocks.0"])
    out = capsys.readouterr().out
    assert "backward total" in out and "reduction" in out


def test_the_whole_objective_lowers_as_one_graph_and_moves_fewer_bytes_than_eager():
    rows, _ = record_step("tiny", 4)
    eager = sum(r[5] for r in rows if r[2] == "other")
    nbytes, graphs = whole_objective_bytes("tiny", 4)
    assert graphs == 2  # forward and backward: no graph break
    assert 0 < nbytes < eager


def test_a_region_per_residual_branch_moves_fewer_bytes_at_itpn_l_shapes():
    """iTPN-L's stage-3 shapes: with the residual stream between the branches written by the
    first region, LayerNorm 2's backward reads it like LayerNorm 1's reads its input, instead of
    writing its normalised input in fp32 and reading it back (docs/performance.md)."""
    from itpn.cli.roofline import _compiled_nodes, _compiling, _cpu_block, _kernel_bytes
    with torch.device("meta"):
        block = Block(768, 12, 4.0, drop_path=0.1, layer_scale=0.1, rel_pos_grid=14).to(torch.bfloat16).train()
    args = (torch.empty(2, 196, 768, device="meta", dtype=torch.bfloat16), relative_position_index(14, device="meta"),
            (14, 14))
    with _compiling("sdpa"):
        cpu_block = _cpu_block(block, "separate")
        _compiled_nodes(cpu_block, args, 2, "cuda")
        one = _compiled_nodes(cpu_block, args, 16, "cuda")
        two = _compiled_nodes(cpu_block, args, 16, "cuda", regions="branch")
    assert _kernel_bytes(two) < _kernel_bytes(one)


def _teacher_block_hand_count(recipe: str, batch: int) -> int:
    """Eager non-GEMM bytes of one teacher block with a one-kernel activation (GELU, or QuickGELU
    folded into SiLU), bf16: LN1 (read x, write, its weight and bias, its statistics) +
    residual add (two reads, a write) + LN2 + the activation (read and write the hidden
    activation) + residual add + the fused attention path's q/k/v preparation (read and write
    the 3W projection)."""
    cfg = load_recipe(recipe)
    t = CLIPTeacher(cfg["teacher"]["arch"], None, image_size=cfg["teacher"]["image_size"], dtype=torch.bfloat16)
    M, W = batch * (t.num_tokens + 1), t.width
    ln = 2 * (2 * M * W + 2 * W) + 2 * M * 4  # bf16 in, out, weight, bias; fp32 mean and rstd
    return ln + 2 * 3 * M * W + ln + 2 * 2 * M * 4 * W + 2 * 3 * M * W + 2 * 6 * M * W


def test_teacher_block_bytes_eager_is_the_hand_count(monkeypatch):
    """The tiny recipe's teacher block (GELU) and CLIP-B/16 as the clip_b recipe's OpenAI weights
    make it (QuickGELU, folded into SiLU by CLIPTeacher): the hand count. Unfolded, QuickGELU's
    three kernels (1.702 x, its sigmoid, their product) move 5 more passes over the (M, 4W)
    hidden activation."""
    b = teacher_block_bytes("tiny", 4)
    assert b["ops"] == ["aten.add", "aten.gelu", "aten.native_layer_norm"]
    assert b["eager"] == _teacher_block_hand_count("tiny", 4) and b["layers"] == 2 and b["compiled"] > 0
    b = teacher_block_bytes("clip_b", 2)
    assert b["arch"] == "ViT-B-16-quickgelu" and b["layers"] == 12
    assert b["ops"] == ["aten.add", "aten.native_layer_norm", "aten.silu"]
    assert b["eager"] == _teacher_block_hand_count("clip_b", 2)
    monkeypatch.setattr(clip_teacher, "fold_quick_gelu", lambda tower: 0)
    unfolded = teacher_block_bytes("clip_b", 2)
    assert unfolded["ops"] == ["aten.add", "aten.mul", "aten.native_layer_norm", "aten.sigmoid"]
    M, hidden = 2 * (14 * 14 + 1), 4 * 768
    assert unfolded["eager"] - b["eager"] == 5 * 2 * M * hidden
    # compiling fuses the unfolded QuickGELU's kernels; with the fold there is little left to fuse
    assert unfolded["compiled"] < 0.7 * unfolded["eager"] and b["compiled"] < 1.1 * b["eager"]


def test_an_activation_memory_budget_adds_the_recomputation_and_refuses_recomputed_gemms(memory_budget_restored):
    """Below 1, the partitioner recomputes LayerNorm and GELU outputs in the backward: more
    traffic in the compiled backward's kernels (what the step's ceiling pays for the memory).
    Far below, it recomputes GEMMs and attention too, whose FLOPs the roofline takes from the
    eager step once: it refuses to count that."""
    from itpn.cli.cuda_codegen import RecomputedHeavyOps
    from itpn.cli.roofline import _recompute_error
    from itpn.layers.block import set_activation_memory_budget
    with torch.device("meta"):
        block = Block(64, 2, 4.0, drop_path=0.1, layer_scale=0.1, rel_pos_grid=4).to(torch.bfloat16).train()
    args = (torch.empty(2, 16, 64, device="meta", dtype=torch.bfloat16), relative_position_index(4, device="meta"),
            (4, 4))
    sig = _signature(block, args)
    counted = {}
    for budget in (1.0, 0.9):
        set_activation_memory_budget(budget)
        counted[budget] = compiled_block_bytes({sig: (block, args)}, batch=16)[sig]
    assert counted[0.9] > counted[1.0]
    set_activation_memory_budget(0.1)
    with pytest.raises(Exception) as raised:
        compiled_block_bytes({sig: (block, args)}, batch=16)
    refusal = _recompute_error(raised.value)
    assert isinstance(refusal, RecomputedHeavyOps), raised.value
    assert "at activation memory budget 0.1 a compiled backward recomputes" in str(refusal)
    assert "x aten.addmm.default" in str(refusal)
