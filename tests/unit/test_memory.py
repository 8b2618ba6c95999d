"""itpn-memory: the step's memory simulated with fake tensors (itpn/cli/memory.py)."""

import contextlib
import math

import pytest
import torch
from torch import nn

from itpn.cli import memory
from itpn.cli.memory import LiveBytes, build, cuda_forward_live, simulate, static_bytes, storage_keys


def test_live_bytes_follows_what_autograd_keeps():
    torch.manual_seed(0)
    lin = nn.Linear(64, 256)
    x = torch.randn(8, 64)
    act = 8 * 256 * 4
    with LiveBytes(storage_keys([lin])) as live:
        h = lin(x)
        y = torch.nn.functional.gelu(h)  # saves h
        loss = y.sum()
        assert live.poll() == 2 * act + 4  # h, y, the loss; the weights are not counted
        del h, y
        assert live.poll() == act + 4  # y is freed, h is kept for GELU's backward
        loss.backward()
        del loss
        assert live.poll() == 64 * 256 * 4 + 256 * 4  # the gradients alone are left
    assert live.peak >= act + 4 + 64 * 256 * 4  # the weight gradient made while h's gradient lives


def test_simulated_step_allocates_what_the_real_step_allocates():
    # Same step, fake tensors against real ones: the same peak, saved bytes and gradients.
    built = build("tiny", "plain", "fp32", initialise=True)
    args = dict(recipe="tiny", batch=4, precision="fp32", attention="naive", built=built)
    fake, real = simulate(**args), simulate(**args, fake=False)
    assert (fake.dynamic_peak, fake.forward_live, fake.grads) == (real.dynamic_peak, real.forward_live, real.grads)
    n = sum(p.numel() for p in built[1].parameters())
    assert fake.grads == 4 * n  # fp32 weights, every parameter gets a gradient
    assert fake.forward_live > 0 and fake.dynamic_peak > fake.forward_live
    # and under bf16 autocast (where LayerNorm's meta kernel gives bf16 statistics that LiveBytes
    # counts as the fp32 ones the CPU's and CUDA's kernels make)
    args.update(precision="autocast", cuda_policy=False)
    fake, real = simulate(**args), simulate(**args, fake=False)
    assert (fake.dynamic_peak, fake.forward_live, fake.grads) == (real.dynamic_peak, real.forward_live, real.grads)


def test_checkpointing_keeps_block_inputs_and_recomputes():
    plain = simulate("tiny", 8, precision="fp32", attention="naive")
    built = build("tiny", "plain", "fp32", ckpt_every=1, initialise=True)
    ckpt = simulate("tiny", 8, precision="fp32", attention="naive", ckpt_every=1, built=built)
    real = simulate("tiny", 8, precision="fp32", attention="naive", ckpt_every=1, built=built, fake=False)
    assert (ckpt.dynamic_peak, ckpt.forward_live) == (real.dynamic_peak, real.forward_live)
    assert ckpt.forward_live < plain.forward_live
    assert ckpt.dynamic_peak < plain.dynamic_peak
    assert ckpt.grads == plain.grads


def test_saved_bytes_grow_linearly_with_the_batch():
    built = build("tiny", "plain", "autocast")
    s = [simulate("tiny", b, cuda_policy=False, built=built) for b in (2, 4, 6)]
    assert s[1].forward_live - s[0].forward_live == s[2].forward_live - s[1].forward_live > 0


def _fake_cuda_ok() -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        with FakeTensorMode():
            torch.empty(1, device="cuda")
        return True
    except (RuntimeError, AssertionError):
        return False


@pytest.mark.skipif(not _fake_cuda_ok(), reason="this torch build cannot make fake CUDA tensors")
def test_cpu_simulation_saves_what_a_cuda_forward_saves(monkeypatch):
    # Without autocast the device changes nothing: the two counts agree to the byte.
    cfg, student, teacher = built = build("tiny", "zero1", "bf16")
    s = simulate("tiny", 4, "zero1", "bf16", built=built)
    targets = torch.float32  # the teacher's targets are LayerNormed in fp32
    assert cuda_forward_live(cfg, student, 4, torch.bfloat16, targets, autocast=False) == s.forward_live
    # Under autocast they agree because the CPU run follows CUDA's policy for LayerNorm and
    # softmax (cuda_autocast_policy); with the CPU's own policy the CUDA forward saves more.
    cfg, student, _ = built = build("tiny", "plain", "autocast")
    a = simulate("tiny", 4, built=built)
    assert a.correction == 0
    assert cuda_forward_live(cfg, student, 4, torch.bfloat16, targets) == a.forward_live
    monkeypatch.setattr(memory, "cuda_autocast_policy", contextlib.nullcontext)
    cpu_policy = simulate("tiny", 4, built=built)
    assert cpu_policy.forward_live < a.forward_live
    assert cpu_policy.correction == a.forward_live - cpu_policy.forward_live
    assert cpu_policy.peak == pytest.approx(a.peak, rel=0.02)  # the correction stands in for the policy


def test_static_bytes_per_engine():
    _, student, teacher = build("tiny", "zero1", "bf16")
    n = sum(p.numel() for p in student.parameters())
    t = sum(p.numel() * p.element_size() for p in teacher.tower.parameters())
    assert t > 0
    z1 = static_bytes("zero1", student, teacher.tower, world=4)
    assert z1["weights"] == z1["flat gradients"] == 2 * n and z1["teacher weights"] == t
    assert z1["fp32 master + AdamW moments"] == 12 * -(-n // 4)
    z3 = static_bytes("zero3_offload", student, teacher.tower)
    z = memory.zero3_settings()
    assert z["reduce_bucket_size"] == 50_000_000  # ds_configs/zero3_offload.json
    assert z["stage3_max_live_parameters"] == 1_000_000_000  # DeepSpeed's default: the fragment leaves it out
    small = sum(p.numel() for p in student.parameters() if p.numel() < z["stage3_param_persistence_threshold"])
    assert z3["persistent parameters"] == 2 * small
    assert z3["gathered parameters"] == 2 * (n - small)
    assert z3["reduction bucket"] == 2 * 50_000_000
    with pytest.raises(ValueError, match="engine must be one of"):
        static_bytes("zero2", student, teacher.tower)
    with pytest.raises(ValueError, match="use --precision bf16"):
        build("tiny", "zero1", "autocast")


def test_zero3_offload_moves_gradients_off_the_gpu():
    built = build("tiny", "zero3_offload", "bf16")
    s = simulate("tiny", 4, "zero3_offload", "bf16", built=built)
    z1 = simulate("tiny", 4, "zero1", "bf16", built=build("tiny", "zero1", "bf16"))
    assert s.grads == 0 and z1.grads > 0
    assert s.dynamic_peak < z1.dynamic_peak


def test_cli_finds_the_largest_batch_in_a_budget(capsys):
    budget = simulate("tiny", 12, precision="fp32").peak  # batch 12 fits exactly
    memory.main(["--recipe", "tiny", "--precision", "fp32", "--batch", "8", "--budget-gib", str(budget / 2 ** 30),
                 "--headroom", "0", "--max-batch", "64", "--granularity", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split()[-1] == "12"
    probed = {int(line.split()[0]) for line in lines if line.split()[0].isdigit()}
    assert probed == {8, 16, 12, 14}  # doubling from 8, then bisection: 12 fits, 14 does not


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be positive"),
    (["--budget-gib", "-1"], "--budget-gib must be positive"),
    (["--headroom", "1"], "--headroom is a fraction"),
    (["--engine", "zero1", "--precision", "autocast"], "use --precision bf16"),
    (["--world", "0"], "--world must be at least 1, got 0"),
    (["--granularity", "0"], "--granularity must be at least 1, got 0"),
    (["--ckpt-every", "-1"], "--ckpt-every must be at least 0, got -1"),
    (["--activation-memory-budget", "0.9"], "--activation-memory-budget needs --compiled"),
    (["--compiled", "--activation-memory-budget", "2"],
     "--activation-memory-budget must be a number in [0, 1], got 2.0"),
])
def test_cli_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        memory.main(["--recipe", "tiny", *argv])
    assert message in capsys.readouterr().err


def _graph_for_fusion():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w, a, b, c, d):
        h = (x * 2 + 1).exp()  # read by a GEMM (through a view): written out
        y = h.view(-1, 32) @ w  # a GEMM: written out
        s = x.sin()  # read by a reduction only: fused into it
        m = a + b + c + d + x  # read by two reductions and computed from five tensors: written out once
        return y.sum() + s.sum() + m.sum() + m.amax()
    torch.manual_seed(0)
    inputs = [torch.randn(64, 32), torch.randn(32, 16), *[torch.randn(64, 32) for _ in range(4)]]
    return make_fx(f)(*inputs), inputs


def test_materialised_follows_inductors_rules():
    g, _ = _graph_for_fusion()
    written = memory.materialised(g.graph)
    assert [str(n.target) for n in g.graph.nodes if n in written] == [
        "aten.exp.default",  # h: the GEMM reads it (the multiply and add before it are fused into it)
        "aten.mm.default",
        "aten.add.Tensor",  # m, the last of its four additions (the three before are fused into it)
        "aten.sum.default", "aten.sum.default",  # y.sum(); s.sum(), with sin fused into it
        "aten.sum.default", "aten.amax.default",  # m's two reductions
        "aten.add.Tensor",  # the result: the graph's output (the two additions before are fused into it)
    ]
    m = [n for n in g.graph.nodes if str(n.target) == "aten.add.Tensor"][4]  # after x * 2 + 1's add, m's four
    assert m in written and len(m.users) == 2
    assert memory.materialised(g.graph, reads_threshold=5) == written - {m}  # five reads are not more than five


def test_fused_graph_counts_only_what_is_written():
    g, inputs = _graph_for_fusion()
    eager = LiveBytes(storage_keys([]))
    with eager:
        g(*inputs)
    fused = LiveBytes()
    with fused:
        (out,) = [memory.FusedGraph(g).boxed_run(list(inputs))]
    h, y, m = 64 * 32 * 4, 64 * 16 * 4, 64 * 32 * 4
    # In the graph's order (the code make_fx wrote): h and the GEMM's output y live together
    # (h + y); h is freed after the GEMM; m is written while y waits for its sum, and that sum
    # is the largest moment: y + m + 4 bytes. The fused chains (x * 2 + 1, sin, m's first
    # three additions) are never counted.
    assert fused.peak == max(h + y, y + m + 4) == y + m + 4
    assert fused.poll() == 4  # the result alone is left
    assert eager.peak > fused.peak  # the graph run with every intermediate allocated
    torch.testing.assert_close(out, g(*inputs))


def test_compiled_step_fake_equals_real_and_saves_less_than_eager():
    built = build("tiny", "plain", "autocast", initialise=True)
    args = dict(recipe="tiny", batch=4, attention="naive", built=built, cuda_policy=False)
    graphs = {}
    fake = simulate(**args, compiled=True, graphs=graphs)
    n = len(graphs)
    real = simulate(**args, compiled=True, graphs=graphs, fake=False)
    assert len(graphs) == n > 1  # one graph per block signature, shared by both runs
    assert (fake.dynamic_peak, fake.forward_live, fake.grads) == (real.dynamic_peak, real.forward_live, real.grads)
    eager = simulate(**args)
    assert fake.grads == eager.grads
    # inductor's partitioner recomputes cheap pointwise results in the backward instead of saving them
    assert fake.forward_live < eager.forward_live
    assert fake.dynamic_peak < eager.dynamic_peak


def test_compiled_block_saves_what_inductor_saves(memory_budget_restored):
    # The tensors our capture saves for the backward are the ones torch.compile's inductor
    # saves for the same block (compiled for the CPU here: the partition is the same), at the
    # default activation memory budget and at a lower one, where both save less.
    import torch._functorch.config as functorch_config

    from itpn.layers import Block
    torch.manual_seed(0)
    block = Block(32, num_heads=2, drop_path=0.1, layer_scale=0.1).train()
    x = torch.randn(2, 8, 32, requires_grad=True)

    def saved(forward):
        sizes = []

        def pack(t):
            sizes.append((tuple(t.shape), t.dtype))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            forward(block, x, None, None)
        return sorted(sizes, key=str)
    found = {}
    for budget in (1.0, 0.9):
        functorch_config.activation_memory_budget = budget
        torch._dynamo.reset()
        with memory.cuda_autocast_policy(), memory._attention("naive"):  # as compiled_block_forwards compiles
            real = saved(torch.compile(Block._forward, dynamic=False))
        calls = {}
        handles = memory._record_block_inputs(block, calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)
        for h in handles:
            h.remove()
        ((_, _, forward),) = memory.compiled_block_forwards(calls, torch.bfloat16, True, "naive")
        found[budget] = ours = saved(forward)
        torch._dynamo.reset()
        assert ours == real and len(ours) > 4, budget

    def nbytes(sizes):
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in sizes)
    assert nbytes(found[0.9]) < nbytes(found[1.0])


def test_cli_names_the_gemms_a_low_activation_memory_budget_recomputes(capsys, memory_budget_restored):
    memory.main(["--recipe", "tiny", "--batch", "4", "--compiled", "--activation-memory-budget", "0.1"])
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "recomputed in the backward" in x]
    assert line.startswith("#   activation memory budget 0.1; GEMMs and attention forwards recomputed in the "
                           "backward per step: ")
    assert "x aten.addmm.default" in line, line
