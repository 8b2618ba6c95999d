"""Roofline of the student's training step, by part of the model (issue #6, "find out why").

Runs one forward + backward of a recipe's objective on the meta device (no memory, no time)
the way the trainer runs it under DeepSpeed bf16 (bf16 weights and activations, no
autocast), and records every ATen op with the module it ran in (forward and backward, by
``torch.utils.module_tracker``). Each op gets a lower bound on its GPU time,

    max(FLOPs / peak, bytes / bandwidth)

with FLOPs from torch's flop formulas and bytes = the elements it reads (its tensor
arguments, broadcast dimensions counted once) + the elements it writes, as one eager kernel
would move them. Views cost nothing. Attention is counted as SDPA's memory-efficient kernel
(``aten._scaled_dot_product_efficient_attention`` and its backward, what CUDA runs for a
relative bias), not as the math path the meta device would otherwise decompose it into.

What it tells: which parts are bound by GEMMs and which by memory traffic, and how far the
eager sum of bounds is from the step's measured time. Compilation fuses pointwise ops, so the
non-GEMM bytes of a compiled step are lower than these eager ones; the GEMM and attention
rows do not change. It is a model: it counts no launch gaps, no kernel inefficiency.

``--compiled`` replaces the eager bytes of every block (the trainer's regional compilation)
by the bytes of the kernels inductor generates for it, counted by inductor itself
(``Scheduler`` nodes other than extern GEMM / attention calls). By default (``--codegen
cuda``) those are the Triton kernels inductor generates for an sm90 GPU, without one
(``itpn/cli/cuda_codegen.py``): each block signature is traced on the CPU and its forward and
backward are lowered for CUDA at the recipe's batch, nothing runs, and bytes / batch is the
count per image (the weights' share included). ``--codegen cpu`` counts inductor's C++ kernels
instead, compiled and run at batch 2 and 4 (the slope is per image). Attention is an opaque
op either way, so its math-path scores are not counted, with its output and gradients in the
layout CUDA's kernel gives them. ``--kernels BLOCK`` lists one block's compiled kernels.

``--attention triton`` counts attention as our kernel (``itpn/layers/bias_attention.py``) runs
it: one op reading q, k, v inside qkv and the (H, N, N) fp32 bias, writing (B, N, H, d) and
the log-sum-exp; its backward writes the (B, N, 3, H, d) qkv gradient and the bias gradient
(FLOPs as torch counts SDPA's: 4 B H N^2 d forward, 8 backward).

    itpn-roofline --recipe clip_l --batch 128 [--peak 791] [--bandwidth 3.35] [--compiled]
                  [--attention sdpa|triton] [--mlp separate|fused] [--codegen cuda|cpu]
                  [--regions block|branch] [--whole] [--kernels encoder.blocks.0]
    (= python benchmarks/roofline.py ...)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

from itpn.cli.bench import RECIPES, load_recipe, make_batch
from itpn.cli.cuda_codegen import RecomputedHeavyOps, counting_bytes, cuda_backend, patched
from itpn.engine.build import apply_block_options, build_objective
from itpn.layers import Block, attention_impl
from itpn.layers.block import COMPILE_REGIONS, set_activation_memory_budget
from itpn.layers import bias_attention as bias_attention_module
from itpn.layers import fused_mlp as fused_mlp_module
from itpn.objectives.clip_teacher import CLIPTeacher, target_width, teacher_forward_flops

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten.convolution_backward,
         aten._scaled_mm}
ATTENTION = {aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_efficient_attention_backward}


def _packed_attention_flops(qkv: torch.Tensor, backward: bool) -> int:
    """FLOPs of attention on a (B, N, 3, H, d) qkv, counted as torch counts SDPA's."""
    b, n, _, h, d = qkv.shape
    return (8 if backward else 4) * b * h * n * n * d


#: Our kernel's two ops -> their FLOPs from the op's arguments.
PACKED_ATTENTION = {"itpn.bias_attention": lambda args: _packed_attention_flops(args[0], False),
                    "itpn.bias_attention_backward": lambda args: _packed_attention_flops(args[1], True)}


def _fused_mlp_fwd(args, out) -> tuple[int, int, int]:
    x, w1, b1, w2, b2 = args
    y, h, a = out
    flops = 2 * x.shape[0] * w1.shape[0] * (w1.shape[1] + w2.shape[0])  # fc1 and fc2: 2 M K N each
    # fc1 as a GEMM reads x, w1, b1 and writes h, fc2 reads a, w2, b2 and writes y; the
    # epilogue's own traffic is the second output of fc1, a.
    gemm = sum(touched_bytes(t) for t in (x, w1, b1, h, a, w2, b2, y))
    return flops, gemm, touched_bytes(a)


def _fused_mlp_dgrad(args, out) -> tuple[int, int, int]:
    dy, w2, h = args
    dh, db1 = out
    # fc2's input gradient as a GEMM reads dy and w2 and writes dh; the epilogue reads h and
    # writes the fp32 bias-gradient parts.
    return (2 * dy.shape[0] * dy.shape[1] * h.shape[1], sum(touched_bytes(t) for t in (dy, w2, dh)),
            touched_bytes(h) + touched_bytes(db1))


#: The fused MLP's two ops (fused_mlp.py) -> (FLOPs, bytes as GEMMs, the epilogue's extra
#: bytes). The extra bytes are bounded as a memory-bound op of their own ("epilogue", summed
#: with the other non-GEMM ops and kept where a block's bytes are inductor's count): a ceiling
#: that assumes no overlap of a tile's epilogue with other tiles' main loops.
FUSED_MLP = {"itpn.fused_mlp": _fused_mlp_fwd, "itpn.fc2_dgrad_gelu": _fused_mlp_dgrad}


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 dimensions once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """SDPA as CUDA runs it with an additive bias: the memory-efficient kernel (it has meta
    kernels and a derivative, so its backward is recorded as one op too)."""
    if attn_mask is not None:
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out, *_ = aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                           is_causal, scale=scale)
    return out


@contextlib.contextmanager
def _sdpa_replaced(fn):
    """``F.scaled_dot_product_attention`` (which ``Attention`` calls) is ``fn`` inside."""
    with patched([(F, "scaled_dot_product_attention", fn)]):
        yield


def efficient_attention():
    return _sdpa_replaced(_efficient_sdpa)


def _innermost(tracker: ModuleTracker) -> str:
    return max(tracker.parents, key=lambda name: name.count("."))


class NodeTagger(TorchFunctionMode):
    """In the forward, tags every autograd node a call creates with the module it ran in, so
    that the backward's ops can be attributed by the node that runs them
    (``torch._C._current_autograd_node``); the module tracker's own backward view keeps a
    module open until all of its inputs have their gradients, which for the pyramid (fed by
    stages 1-2) spans the whole stage-3 backward."""

    def __init__(self, tracker: ModuleTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.tracker.is_bw:
            module = _innermost(self.tracker)
            stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            while stack:
                node = stack.pop()
                if node is None or "module" in node.metadata:
                    continue
                node.metadata["module"] = module
                stack.extend(next_node for next_node, _ in node.next_functions)
        return out


class OpRecorder(TorchDispatchMode):
    """Records (module, phase, kind, op, flops, bytes) for every op that is not a view."""

    def __init__(self, tracker: ModuleTracker):
        super().__init__()
        self.tracker = tracker
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in (aten.detach, aten.alias, aten._unsafe_view):
            return out
        packet = func.overloadpacket
        flops = 0
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        elif str(packet) in PACKED_ATTENTION:
            flops = PACKED_ATTENTION[str(packet)](args)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(touched_bytes(t) for t in inputs) + sum(touched_bytes(t) for t in outputs)
        kind = "gemm" if packet in GEMMS else "attention" if packet in ATTENTION or str(packet) in PACKED_ATTENTION \
            else "other"
        backward = self.tracker.is_bw
        if backward:
            node = torch._C._current_autograd_node()
            module = node.metadata.get("module", "Global") if node is not None else "Global"
        else:
            module = _innermost(self.tracker)
        phase = "backward" if backward else "forward"
        if str(packet) in FUSED_MLP:
            flops, nbytes, extra = FUSED_MLP[str(packet)](args, out)
            self.rows.append((module, phase, "epilogue", str(packet), 0, extra))
            kind = "gemm"
        self.rows.append((module, phase, kind, str(packet), flops, nbytes))
        return out


_SDPA = F.scaled_dot_product_attention  # the real one, for the opaque op's CPU kernels


def _bmhk(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) values stored as (B, N, H, d): the layout CUDA's memory-efficient kernel
    allocates its output and its q, k, v gradients in, so that (B, N, H * d) is a view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_bmhk(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return torch.empty(b, n, h, d, dtype=t.dtype, device=t.device).transpose(1, 2)


@torch.library.custom_op("itpn_roofline::attention", mutates_args=())
def _opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      dropout_p: float) -> torch.Tensor:
    return _bmhk(_SDPA(q, k, v, attn_mask=bias, dropout_p=dropout_p))


@_opaque_attention.register_fake
def _(q, k, v, bias, dropout_p):
    return _empty_bmhk(q)


@torch.library.custom_op("itpn_roofline::attention_backward", mutates_args=())
def _opaque_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               bias: torch.Tensor | None) -> list[torch.Tensor]:
    # The math-path gradients, written out (autograd is off inside a custom op's kernel).
    scale = q.shape[-1] ** -0.5
    qf, kf, vf, gf = q.float(), k.float(), v.float(), grad.float()
    scores = qf @ kf.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias.float()
    prob = scores.softmax(-1)
    dprob = gf @ vf.transpose(-2, -1)
    dscores = prob * (dprob - (dprob * prob).sum(-1, keepdim=True))
    grads = [(dscores @ kf * scale).to(q.dtype), (dscores.transpose(-2, -1) @ qf * scale).to(k.dtype),
             (prob.transpose(-2, -1) @ gf).to(v.dtype)]
    if bias is not None:
        dims = [i for i, (n, m) in enumerate(zip(bias.shape, dscores.shape)) if n == 1 and m != 1]
        grads.append((dscores.sum(dims, keepdim=True) if dims else dscores).to(bias.dtype))
    return [_bmhk(g) for g in grads[:3]] + [g.contiguous() for g in grads[3:]]


@_opaque_attention_backward.register_fake
def _(grad, q, k, v, bias):
    return [_empty_bmhk(t) for t in (q, k, v)] + (
        [] if bias is None else [torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)])


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, _ = inputs
    ctx.save_for_backward(q, k, v, bias)
    ctx.has_bias = bias is not None


def _attention_grad(ctx, grad):
    q, k, v, bias = ctx.saved_tensors
    grads = _opaque_attention_backward(grad, q, k, v, bias if ctx.has_bias else None)
    return grads[0], grads[1], grads[2], grads[3] if ctx.has_bias else None, None


_opaque_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def _sdpa_as_opaque(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    # nn.MultiheadAttention (the CLIP teacher's) passes is_causal positionally
    if is_causal or scale is not None:
        raise NotImplementedError("the roofline's attention stand-in takes neither is_causal nor scale")
    return _opaque_attention(query, key, value, attn_mask, dropout_p)


@torch.library.custom_op("itpn_roofline::packed_attention", mutates_args=())
def _opaque_packed(qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (B, N, 3, H, d) -> (B, N, H, d), as bias_attention; CPU kernels for inductor's byte count
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return _SDPA(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype)).transpose(1, 2).contiguous()


@_opaque_packed.register_fake
def _(qkv, bias):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty(b, n, h, d)


@torch.library.custom_op("itpn_roofline::packed_attention_backward", mutates_args=())
def _opaque_packed_backward(grad: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor | None) -> list[torch.Tensor]:
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    full = None if bias is None else bias.expand(q.shape[0], *bias.shape[-3:]) if bias.ndim == 3 else bias
    grads = _opaque_attention_backward(grad.transpose(1, 2), q, k, v, full)
    dqkv = torch.stack([g.transpose(1, 2) for g in grads[:3]], dim=2)  # (B, N, 3, H, d)
    if bias is None:
        return [dqkv]
    dbias = grads[3].float()
    return [dqkv, dbias.sum(0) if bias.ndim == 3 else dbias]


@_opaque_packed_backward.register_fake
def _(grad, qkv, bias):
    return [torch.empty_like(qkv)] + ([] if bias is None else [torch.empty_like(bias)])


def _packed_setup(ctx, inputs, output):
    qkv, bias = inputs
    ctx.save_for_backward(qkv, bias)
    ctx.has_bias = bias is not None


def _packed_grad(ctx, grad):
    qkv, bias = ctx.saved_tensors
    grads = _opaque_packed_backward(grad, qkv, bias if ctx.has_bias else None)
    return grads[0], grads[1] if ctx.has_bias else None


_opaque_packed.register_autograd(_packed_grad, setup_context=_packed_setup)


@contextlib.contextmanager
def triton_attention(stand_in=None):
    """The Attention modules take the "triton" path on any device; with ``stand_in`` (a CPU
    stand-in for inductor's byte count) it replaces the kernel's op."""
    patches = [(bias_attention_module, "usable", lambda qkv: True)]
    if stand_in is not None:
        patches.append((bias_attention_module, "bias_attention", stand_in))
    with patched(patches), attention_impl("triton"):
        yield


@torch.library.custom_op("itpn_roofline::fc1_gelu", mutates_args=())
def _stand_in_fc1_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # fused_mlp's forward kernel, on the CPU, for inductor's byte count (an extern call to it)
    h = F.linear(x, w1, b1)
    return h, F.gelu(h)


_stand_in_fc1_gelu.register_fake(fused_mlp_module.fc1_gelu_fake)


@torch.library.custom_op("itpn_roofline::fc2_dgrad_gelu", mutates_args=())
def _stand_in_dgrad(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dh = torch.ops.aten.gelu_backward(dy @ w2, h)
    return dh, dh.float().sum(0)


_stand_in_dgrad.register_fake(fused_mlp_module.dgrad_gelu_fake)


@contextlib.contextmanager
def fused_mlp_everywhere(stand_in: bool = False):
    """Every Mlp with ``fused`` set takes the fused path on any device; with ``stand_in``, the
    two kernels' ops are replaced by CPU stand-ins (the fused op and its backward stay)."""
    patches = [(fused_mlp_module, "unusable_reason", lambda *a: None)]
    if stand_in:
        patches += [(fused_mlp_module, "_fc1_gelu", _stand_in_fc1_gelu),
                    (fused_mlp_module, "_fc2_dgrad_gelu_op", _stand_in_dgrad)]
    with patched(patches):
        yield


def _attention_context(attention: str, compiled: bool):
    if attention == "triton":
        return triton_attention(_opaque_packed if compiled else None)
    return _sdpa_replaced(_sdpa_as_opaque) if compiled else efficient_attention()


def _signature(block: Block, args: tuple) -> tuple:
    params = tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
    shapes = tuple(None if a is None else tuple(a.shape[1:]) if isinstance(a, torch.Tensor) and i == 0
                   else tuple(a.shape) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    return params, shapes, block.drop_path.enabled


def _node_ops(node) -> str:
    """The ATen ops an inductor scheduler node was lowered from (a fused kernel: all of them)."""
    names = set()
    for sub in node.get_nodes():
        for origin in getattr(sub.node, "origins", ()):
            if origin.op == "call_function":
                target = origin.target
                names.add(target._overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else str(target))
    return ",".join(sorted(names))


def _compiled_nodes(block: Block, args: tuple, batch: int, target: str, regions: str = "block") -> list:
    """(phase, scheduler node, bytes) of the block compiled at ``batch``, forward then backward;
    call inside ``counting_bytes()``. For "cuda" nothing runs (the graphs are lowered and their
    outputs are uninitialised tensors), so any batch costs the same; "cpu" runs the kernels.
    ``regions``: as ``Block.compile`` takes it ("block", the trainer's; "branch": a transformer
    block as two compiled regions, one per residual branch)."""
    import torch._inductor.metrics as metrics

    make = torch.empty if target == "cuda" else torch.randn
    x = make(batch, *args[0].shape[1:], dtype=torch.bfloat16, requires_grad=True)
    rest = [torch.randint(0, 2, a.shape) if isinstance(a, torch.Tensor) else a for a in args[1:]]
    if rest and isinstance(rest[0], torch.Tensor) and rest[0].ndim == 3:
        rest[0] = torch.zeros(batch, *rest[0].shape[1:], dtype=torch.long)
    torch._dynamo.reset()
    try:
        if target == "cuda":  # forward and backward are lowered when dynamo compiles
            graphs = []
            block.compile(regions, backend=cuda_backend(graphs, execute=False))
            block(x, *rest)
            phases = ("forward", "backward") * (len(graphs) // 2)
            return [(phase, node, n) for phase, graph in zip(phases, graphs) for node, n in graph]
        metrics.reset()
        block.compile(regions)
        y = block(x, *rest)
        forward = len(metrics.nodes_num_elem)
        y.backward(torch.ones_like(y))
    finally:
        block._compiled_forward = None
    return [("forward" if i < forward else "backward", node, 4 * n)
            for i, (node, n) in enumerate(metrics.nodes_num_elem)]


def _kernel_bytes(nodes: list) -> int:
    from torch._inductor.scheduler import ExternKernelSchedulerNode
    return sum(n for _, node, n in nodes if not isinstance(node, ExternKernelSchedulerNode))


@contextlib.contextmanager
def _compiling(attention: str):
    import torch._inductor.config as inductor_config
    with counting_bytes(), _attention_context(attention, compiled=True), fused_mlp_everywhere(stand_in=True), \
            inductor_config.patch(fx_graph_cache=False):
        try:
            yield
        finally:
            torch._dynamo.reset()


def _cpu_block(meta_block: Block, mlp: str) -> Block:
    block = copy.deepcopy(meta_block).to_empty(device="cpu").to(torch.bfloat16)
    block.mlp.fused = mlp == "fused"
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.drop_path.keep.fill_(0.9)
    return block.train()


# Not counted, in both functions below: the first compile of each signature. Inductor registers
# a fallback lowering for each custom op (our kernels, the stand-ins) the first time it meets
# one, and lowers that first graph differently (in an iTPN-L stage-3 block, fc2's output
# gradient written twice). Counted is the lowering of every later graph with the same ops, so
# the count does not depend on the order in which the signatures come.

def compiled_block_bytes(calls: dict, attention: str = "sdpa", mlp: str = "separate", target: str = "cuda",
                         batch: int = 128, regions: str = "block") -> dict:
    """Per block signature: non-extern bytes per image of the compiled block's forward +
    backward, from inductor's own count. ``calls``: signature -> (meta block, args);
    ``attention``: "sdpa" (SDPA's memory-efficient kernel) or "triton" (bias_attention);
    ``mlp``: "separate" or "fused" (fused_mlp, an extern call: its epilogues count with its GEMMs);
    ``target``: whose code generation decides the kernels: "cuda", inductor's Triton kernels for
    an sm90 GPU (generated without one, ``itpn.cli.cuda_codegen``) at ``batch``, divided by it
    (the weights' share included); or "cpu", its C++ kernels, which run, so the count is the
    slope between batch 2 and 4 (per-image bytes only). ``regions``: as in ``_compiled_nodes``."""
    out = {}
    with _compiling(attention):
        blocks = {sig: _cpu_block(meta_block, mlp) for sig, (meta_block, _) in calls.items()}
        for sig, (_, args) in calls.items():
            _compiled_nodes(blocks[sig], args, 2, target, regions)
        for sig, (_, args) in calls.items():
            if target == "cuda":
                out[sig] = _kernel_bytes(_compiled_nodes(blocks[sig], args, batch, target, regions)) / batch
            else:
                small, large = (_kernel_bytes(_compiled_nodes(blocks[sig], args, b, target, regions)) for b in (2, 4))
                out[sig] = (large - small) / 2
    return out


def block_kernels(meta_block: Block, args: tuple, attention: str = "sdpa", mlp: str = "separate",
                  target: str = "cuda", batch: int = 128) -> list:
    """The compiled block's kernels in order, (phase, kind, bytes per image, ATen ops) with kind
    "pointwise", "reduction" or "extern" (GEMMs, attention, our kernels: bytes not counted),
    compiled at ``batch`` (bytes / batch, the weights' share included)."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode
    with _compiling(attention):
        block = _cpu_block(meta_block, mlp)
        _compiled_nodes(block, args, 2, target)
        nodes = _compiled_nodes(block, args, batch, target)
    rows = []
    for phase, node, n in nodes:
        extern = isinstance(node, ExternKernelSchedulerNode)
        kind = "extern" if extern else "reduction" if node.is_reduction() else "pointwise"
        rows.append((phase, kind, 0.0 if extern else n / batch, _node_ops(node)))
    return rows


def group_of(module: str) -> str:
    """The row a module's ops are summed in: encoder.<part>, else the objective's child."""
    parts = module.split(".")[1:]  # drop the root objective's class name
    if not parts:
        return "(objective)"
    return ".".join(parts[:2]) if parts[0] == "encoder" and len(parts) > 1 else parts[0]


def _objective(recipe: str, batch: int, mlp: str, device: str) -> tuple:
    """The recipe's objective as the trainer runs it under DeepSpeed bf16 (bf16 weights, folded
    layer scale), its inputs at ``batch`` and the forward's keyword arguments (the teacher's
    targets for CLIP-MFM); on ``device`` "meta", or "cpu" with uninitialised weights."""
    cfg = load_recipe(recipe)
    clip = cfg["objective"]["kind"] == "clip"
    teacher_dim = target_width(cfg["teacher"]["arch"]) if clip else 0
    cfg["objective"]["teacher_dim"] = teacher_dim
    with torch.device("meta"):
        model = build_objective(cfg)
    model = (model if device == "meta" else model.to_empty(device=device)).to(torch.bfloat16).train()
    apply_block_options(model, 0, False, False, fold_layer_scale=True, fused_mlp=mlp == "fused")
    x, mask, _ = make_batch(cfg, batch, device)
    kwargs = {}
    if clip:
        kwargs["targets"] = torch.empty(batch, mask.shape[1], teacher_dim, device=device, dtype=torch.bfloat16)
    return model, (x.to(torch.bfloat16), mask), kwargs


def whole_objective_bytes(recipe: str, batch: int, attention: str = "sdpa", mlp: str = "separate") -> tuple:
    """Non-extern bytes of the objective's forward + backward compiled as one graph (the
    trainer's ``compile_whole``, the benchmark's ``compile_model``), as inductor's kernels for an
    sm90 GPU move them at ``batch``, and the number of graphs dynamo made. Nothing runs; the
    lowering takes ~90 s for iTPN-L."""
    model, inputs, kwargs = _objective(recipe, batch, mlp, "cpu")
    graphs = []
    with _compiling(attention):
        torch.compile(model, dynamic=False, backend=cuda_backend(graphs, execute=False))(*inputs, **kwargs)
    return _kernel_bytes([(None, node, n) for graph in graphs for node, n in graph]), len(graphs)


def record_step(recipe: str, batch: int, attention: str = "sdpa", mlp: str = "separate") -> tuple[list, dict]:
    """Rows (module, phase, kind, op, FLOPs, bytes) of one forward + backward at ``batch``,
    and the parameter count, the root's class name and every Block call (name, block, args).
    ``mlp="fused"``: every MLP as fused_mlp runs it."""
    model, (x, mask), kwargs = _objective(recipe, batch, mlp, "meta")
    tracker = ModuleTracker()
    recorder = OpRecorder(tracker)
    block_calls = []
    names = {m: n for n, m in model.named_modules()}

    def record_call(block, args, kwargs):  # Block.forward(x, rel_index=None, rel_grid=None)
        block_calls.append((names[block], block, (tuple(args) + tuple(kwargs.values()) + (None, None))[:3]))
    hooks = [m.register_forward_pre_hook(record_call, with_kwargs=True)
             for m in model.modules() if isinstance(m, Block)]
    with _attention_context(attention, compiled=False), fused_mlp_everywhere(), tracker, NodeTagger(tracker), \
            recorder:
        model(x, mask, **kwargs)["loss"].backward()
    for h in hooks:
        h.remove()
    n_params = sum(p.numel() for p in model.parameters())
    return recorder.rows, {"params": n_params, "block_calls": block_calls, "root": type(model).__name__}


def teacher_block_bytes(recipe: str, batch: int) -> dict:
    """One residual block of the recipe's CLIP teacher (its activation as the recipe's weights
    give it, bf16, no autograd) at ``batch``: its non-GEMM bytes eager and compiled, its GEMM
    FLOPs and the number of blocks.

    Eager is the GPU's eager block: every ATen op outside attention one kernel (LayerNorms,
    residual adds, the activation: QuickGELU is three), as the meta device records them, plus
    nn.MultiheadAttention's fused path's preparation of q, k and v counted at its least, one
    read and one write of the (tokens, 3 x width) projection (``_transform_bias_rescale_qkv``;
    the meta device runs the unfused path, whose copies the GPU's fused path does not make).
    Compiled is inductor's Triton kernels for an sm90 GPU (``CLIPTeacher.compile_blocks``, the
    trainer's ``teacher.compile``), attention's preparation and output layout included."""
    cfg = load_recipe(recipe)
    if cfg["objective"]["kind"] != "clip":
        raise ValueError(f"recipe {recipe} has no CLIP teacher")
    t = cfg["teacher"]
    teacher = CLIPTeacher(t["arch"], None, image_size=t["image_size"], dtype=torch.bfloat16)
    block = teacher.tower.transformer.resblocks[0]
    x = torch.empty(batch, teacher.num_tokens + 1, teacher.width, dtype=torch.bfloat16)
    meta_block, meta_x = copy.deepcopy(block).to("meta"), x.to("meta")
    tracker = ModuleTracker()
    recorder = OpRecorder(tracker)
    with torch.no_grad(), _attention_context("sdpa", compiled=False), tracker, recorder:
        meta_block(meta_x)
    outside = [r for r in recorder.rows if r[2] == "other" and ".attn" not in r[0]]
    qkv_prep = 2 * x.numel() * 3 * x.element_size()
    graphs = []
    with torch.no_grad(), _compiling("sdpa"):
        block.compile(dynamic=False, backend=cuda_backend(graphs, execute=False))
        block(x)
    return {"eager": sum(r[5] for r in outside) + qkv_prep,
            "compiled": _kernel_bytes([(None, node, n) for graph in graphs for node, n in graph]),
            "gemm_flops": sum(r[4] for r in recorder.rows if r[2] == "gemm"), "layers": teacher.layers,
            "arch": teacher.arch, "ops": sorted({r[3] for r in outside})}


def in_compiled(module: str, blocks) -> bool:
    """Whether ``module`` is one of ``blocks`` (qualified names) or inside one."""
    return bool(blocks) and any(module == b or module.startswith(b + ".") for b in blocks)


def summarise(rows, peak: float, bandwidth: float, compiled: dict | None = None):
    """Per group: FLOPs, bytes and the time bound of GEMMs, attention and the rest, in ms.
    ``compiled``: {qualified block name: non-GEMM bytes of its compiled kernels}; the eager
    non-GEMM ops inside those blocks are then replaced by that count."""
    table = defaultdict(lambda: defaultdict(float))
    compiled = compiled or {}
    for module, phase, kind, _, flops, nbytes in rows:
        if kind == "other" and in_compiled(module, compiled):
            continue
        kind = "other" if kind == "epilogue" else kind  # fused GEMM epilogues: not in inductor's count
        g = table[group_of(module)]
        g[f"{kind}_ms"] += 1e3 * max(flops / peak, nbytes / bandwidth)
        g[f"{kind}_gflop"] += flops / 1e9
        g[f"{kind}_gb"] += nbytes / 1e9
    for block, nbytes in compiled.items():
        g = table[group_of(block)]
        g["other_ms"] += 1e3 * nbytes / bandwidth
        g["other_gb"] += nbytes / 1e9
    return table


def print_block_kernels(info: dict, args) -> None:
    calls = {name: (block, block_args) for name, block, block_args in reversed(info["block_calls"])}
    if args.kernels not in calls:
        raise SystemExit(f"--kernels {args.kernels}: no such block in recipe {args.recipe}; blocks: "
                         + ", ".join(sorted(calls)))
    block, block_args = calls[args.kernels]
    batch = args.batch if args.codegen == "cuda" else 4  # the CPU's kernels run
    kernels = block_kernels(block, block_args, args.attention, args.mlp, args.codegen, batch)
    print(f"{info['root']}.{args.kernels} compiled ({args.codegen} kernels, attention {args.attention}, "
          f"MLP {args.mlp}) at batch {batch}: MB per image (the weights' share included); extern calls' "
          "bytes are counted elsewhere")
    for phase, kind, nbytes, ops in kernels:
        print(f"  {phase:8s} {kind:9s} {'' if kind == 'extern' else f'{nbytes / 1e6:7.3f}':>7s}  {ops}")
    for phase in ("forward", "backward"):
        by_kind = defaultdict(float)
        for ph, kind, nbytes, _ in kernels:
            if ph == phase:
                by_kind[kind] += nbytes
        print(f"  {phase} total {sum(by_kind.values()) / 1e6:.3f} MB (pointwise {by_kind['pointwise'] / 1e6:.3f}, "
              f"reductions {by_kind['reduction'] / 1e6:.3f})")


def print_ceilings(args, student_ms: float, opt_ms: float, student_flops: float, peak: float,
                   teacher_traffic: dict) -> list[tuple[str, float, float]]:
    """The step at every bound: the student's bounds, the CLIP teacher's forward at the peak
    (its GEMMs and attention), the optimizer; then (``--teacher``) with the teacher blocks'
    non-GEMM traffic, eager and compiled. Prints and returns (label, ms, img/s) rows; MFU
    counts the student's and the teacher's FLOPs against ``peak``."""
    cfg = load_recipe(args.recipe)
    teacher_flops = 0.0
    if cfg["objective"]["kind"] == "clip":
        teacher_flops = teacher_forward_flops(cfg["teacher"]["arch"], cfg["teacher"]["image_size"]) * args.batch
    base = student_ms + 1e3 * teacher_flops / peak + opt_ms
    rows = [("teacher GEMMs at the peak", base)] + [
        (f"+ the teacher's other traffic, {kind}", base + ms) for kind, ms in teacher_traffic.items()]
    out = []
    for label, ms in rows:
        img_s = args.batch / (ms / 1e3)
        mfu = 100 * (student_flops + teacher_flops) / (ms / 1e3) / peak
        print(f"step at the bounds, {label}: {ms:.1f} ms -> {img_s:,.0f} img/s, {mfu:.1f}% MFU")
        out.append((label, ms, img_s))
    return out


def _recompute_error(e: BaseException) -> RecomputedHeavyOps | None:
    """The ``RecomputedHeavyOps`` behind ``e`` (dynamo wraps a backend's exception), if any."""
    while e is not None:
        if isinstance(e, RecomputedHeavyOps):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="clip_l")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--peak", type=float, default=791.0, help="bf16 matmul TFLOP/s (measured on the H100: 791)")
    p.add_argument("--bandwidth", type=float, default=3.35, help="memory TB/s (H100 SXM HBM3: 3.35)")
    p.add_argument("--top", type=int, default=8, help="also list the N ops with the largest non-GEMM bound")
    p.add_argument("--compiled", action="store_true",
                   help="count each block's non-GEMM bytes as inductor's compiled kernels move them")
    p.add_argument("--attention", choices=["sdpa", "triton"], default="sdpa",
                   help="attention as SDPA's memory-efficient kernel or as our Triton kernel (bias_attention)")
    p.add_argument("--mlp", choices=["separate", "fused"], default="separate",
                   help="the MLPs' GELU as separate kernels or in the GEMMs' epilogues (fused_mlp)")
    p.add_argument("--codegen", choices=["cuda", "cpu"], default="cuda",
                   help="with --compiled: count the kernels inductor generates for an sm90 GPU (without one) "
                        "or for the CPU")
    p.add_argument("--regions", choices=COMPILE_REGIONS, default="block",
                   help="with --compiled: one compiled region per block, as the trainer runs it, or one "
                        "per residual branch (Block.compile)")
    p.add_argument("--whole", action="store_true",
                   help="count the objective compiled as one graph (compile_model) instead of per block: "
                        "inductor's GPU kernels; the non-GEMM bytes are then one row, (objective)")
    p.add_argument("--kernels", metavar="BLOCK",
                   help="instead of the table: the compiled kernels of one block (e.g. encoder.blocks.0) "
                        "with their bytes per image")
    p.add_argument("--teacher", action="store_true",
                   help="also count the CLIP teacher's non-GEMM bytes per step, eager against its blocks "
                        "compiled (teacher.compile, inductor's GPU kernels), and the step's ceilings with them")
    p.add_argument("--activation-memory-budget", type=float, metavar="B",
                   help="with --compiled or --whole (CUDA kernels): compile under this activation memory budget "
                        "(the trainer's deepspeed.activation_memory_budget), so the backward's kernels include "
                        "what the partitioner recomputes")
    args = p.parse_args(argv)
    if args.activation_memory_budget is not None:
        if not (args.compiled or args.whole) or args.codegen != "cuda":
            p.error("--activation-memory-budget needs --compiled or --whole with --codegen cuda")
        try:
            set_activation_memory_budget(args.activation_memory_budget, "--activation-memory-budget")
        except ValueError as e:
            p.error(str(e))
    peak, bandwidth = args.peak * 1e12, args.bandwidth * 1e12
    teacher_traffic = {}  # "eager" / "compiled" -> ms of the teacher blocks' non-GEMM traffic
    if args.teacher:
        b = teacher_block_bytes(args.recipe, args.batch)
        n, gemm_ms = b["layers"], 1e3 * b["layers"] * b["gemm_flops"] / peak
        print(f"teacher {b['arch']} at batch {args.batch}, {n} blocks (bf16, no autograd); GEMMs {gemm_ms:.1f} ms at "
              f"{args.peak:g} TFLOP/s; eager non-GEMM ops outside attention: {', '.join(b['ops'])}")
        for kind in ("eager", "compiled"):
            gb = n * b[kind] / 1e9
            teacher_traffic[kind] = 1e3 * gb * 1e9 / bandwidth
            print(f"  blocks {kind:8s} non-GEMM {gb:6.1f} GB {teacher_traffic[kind]:6.1f} ms at "
                  f"{args.bandwidth:g} TB/s ({b[kind] / args.batch / 1e6:.2f} MB per image and block)")
    rows, info = record_step(args.recipe, args.batch, args.attention, args.mlp)
    if args.kernels:
        print_block_kernels(info, args)
        return
    compiled = None
    if args.whole:
        try:
            nbytes, graphs = whole_objective_bytes(args.recipe, args.batch, args.attention, args.mlp)
        except Exception as e:
            if (recompute := _recompute_error(e)) is None:
                raise
            p.error(str(recompute))
        compiled = {info["root"]: nbytes}
        print(f"{info['root']} compiled whole (inductor, CUDA kernels, {graphs} graphs with the backward's): "
              f"{nbytes / 1e9:.1f} GB of non-GEMM traffic, {nbytes / args.batch / 1e6:.2f} MB per image")
    elif args.compiled:
        calls, names = {}, defaultdict(list)  # signature -> (first block, its args); -> qualified names
        for name, block, block_args in info["block_calls"]:
            sig = _signature(block, block_args)
            calls.setdefault(sig, (block, block_args))
            names[sig].append(f"{info['root']}.{name}")
        try:
            per_image = compiled_block_bytes(calls, args.attention, args.mlp, args.codegen, args.batch, args.regions)
        except Exception as e:  # inductor internals moved (itpn/cli/cuda_codegen.py): say so, count the CPU's
            if (recompute := _recompute_error(e)) is not None:
                p.error(str(recompute))
            if args.codegen != "cuda":
                raise
            print(f"inductor's CUDA code generation without a GPU failed ({type(e).__name__}: {e}); "
                  "counting its CPU kernels instead")
            args.codegen = "cpu"
            per_image = compiled_block_bytes(calls, args.attention, args.mlp, "cpu", regions=args.regions)
        compiled = {name: per_image[sig] * args.batch for sig in calls for name in names[sig]}
        how = f"at batch {args.batch}" if args.codegen == "cuda" else "slope, batch 2 to 4"
        print(f"{len(calls)} block signatures compiled (inductor, {args.codegen.upper()} kernels) for {len(compiled)} "
              f"block calls; non-GEMM MB per image and call, eager (bytes / batch) -> compiled ({how}):")
        for sig in calls:
            first = names[sig][0]
            eager = sum(r[5] for r in rows if r[2] == "other" and in_compiled(r[0], [first]))
            print(f"  {first:40s} x{len(names[sig]):<3d} {eager / args.batch / 1e6:8.2f} -> "
                  f"{per_image[sig] / 1e6:8.2f}")
    table = summarise(rows, peak, bandwidth, compiled=compiled)
    mode = ("objective compiled whole (cuda kernels)" if args.whole else
            f"compiled blocks ({args.codegen} kernels)" if compiled else "eager")
    print(f"recipe {args.recipe}, batch {args.batch}, bf16 weights and activations, folded layer scale, "
          f"{mode}, attention {args.attention}, "
          f"MLP {args.mlp}; bounds at {args.peak:g} TFLOP/s and {args.bandwidth:g} TB/s")
    print(f"{'part':22s} {'GEMM GFLOP':>11s} {'GEMM ms':>8s} {'attn ms':>8s} {'other GB':>9s} {'other ms':>9s} "
          f"{'total ms':>9s}")
    totals = defaultdict(float)
    order = sorted(table, key=lambda g: -sum(v for k, v in table[g].items() if k.endswith("_ms")))
    for name in order:
        g = table[name]
        total = g["gemm_ms"] + g["attention_ms"] + g["other_ms"]
        for k, v in g.items():
            totals[k] += v
        print(f"{name:22s} {g['gemm_gflop']:11.0f} {g['gemm_ms']:8.1f} {g['attention_ms']:8.1f} "
              f"{g['other_gb']:9.1f} {g['other_ms']:9.1f} {total:9.1f}")
    total = totals["gemm_ms"] + totals["attention_ms"] + totals["other_ms"]
    print(f"{'student, all':22s} {totals['gemm_gflop']:11.0f} {totals['gemm_ms']:8.1f} "
          f"{totals['attention_ms']:8.1f} {totals['other_gb']:9.1f} {totals['other_ms']:9.1f} {total:9.1f}")
    # Optimizer under DeepSpeed bf16 ZeRO-1 on one GPU: fp32 master, m, v read and written,
    # the fp32 gradient read, the bf16 weights written.
    opt_bytes = info["params"] * (3 * 4 * 2 + 4 + 2)
    opt_ms = 1e3 * opt_bytes / bandwidth
    print(f"optimizer (fused AdamW, fp32 state, {info['params'] / 1e6:.1f} M parameters): "
          f"{opt_bytes / 1e9:.1f} GB, {opt_ms:.1f} ms")
    print_ceilings(args, total, opt_ms, sum(r[4] for r in rows), peak, teacher_traffic)
    others = defaultdict(lambda: [0.0, 0.0, 0])
    for module, phase, kind, op, flops, nbytes in rows:
        if kind == "other" and not in_compiled(module, compiled):
            key = (group_of(module), phase, op)
            others[key][0] += 1e3 * nbytes / bandwidth
            others[key][1] += nbytes / 1e9
            others[key][2] += 1
    print("largest non-GEMM bounds outside compiled blocks (part, phase, op: ms, GB, calls):")
    for (part, phase, op), (ms, gb, n) in sorted(others.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {part:20s} {phase:8s} {op:40s} {ms:7.1f} ms {gb:7.1f} GB {n:5d}")


if __name__ == "__main__":
    main()
