"""Inductor's CUDA code generation on a machine without a GPU (for ``itpn-roofline``).

What inductor fuses, which intermediates it writes to memory and how it splits reductions
are decided per device: its CPU backend (C++ loops) and its CUDA backend (Triton kernels)
make different choices for the same graph. The roofline counts the bytes of a compiled
block as inductor's scheduler counts them, so it should count the kernels the GPU would run.
This module makes inductor lower graphs for an sm90 GPU (an H100's properties) where there
is none: it pretends, for the duration of ``pretend_cuda()``, that one CUDA device exists,
traces the graphs with fake CUDA tensors and generates their Triton code, which is kept as
text and never compiled or launched.

How, concretely: dynamo traces the block on the CPU; ``cuda_backend`` receives dynamo's
graph, lets inductor's own ``compile_fx`` build and partition the forward + backward graph
(the backward is lowered at once), and for each of the two graphs retraces it with fake CUDA
tensors and runs ``compile_fx_inner`` under ``pretend_cuda()``. What then runs on the CPU is
the uncompiled ATen graph, or (``execute=False``, how the roofline counts at a recipe's real
batch) nothing: the graph returns uninitialised tensors of its outputs' shapes.
The pretence is a list of attribute patches, each undone on exit (torch.cuda's device
queries, dynamo's CUDA device interface, Triton's active driver, and inductor's Triton
compilation step, which records the source instead); pattern passes that build real CUDA
tensors at initialisation (attention and misc patterns: neither matches our blocks, whose
attention is an opaque op) are skipped.

It depends on inductor internals (checked on torch 2.14 and 2.11; the roofline falls back to the
CPU's code generation with a warning where it fails). ``tests/unit/test_roofline.py`` checks
it against a hand count of a pointwise and a reduction kernel and that every patch is undone.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import types

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

# torch.cuda.get_device_properties of an H100 SXM (the fields inductor and Triton read).
H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, warp_size=32,
    total_memory=80 * 2**30, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
    max_threads_per_block=1024, shared_memory_per_block=48 * 1024,
    shared_memory_per_block_optin=227 * 1024, shared_memory_per_multiprocessor=228 * 1024,
    L2_cache_size=50 * 2**20, clock_rate=1_980_000, memory_clock_rate=2_619_000,
    memory_bus_width=5120, gcnArchName="", uuid="no-gpu", is_integrated=False)


class _Driver:
    """Triton's active driver as far as code generation asks: an sm90 target, device 0."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_current_stream(self, *args):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


@contextlib.contextmanager
def patched(patches: list):
    """Sets each (owner, attribute, value) for the duration and restores what was there (a
    class's own attribute as stored, so a staticmethod stays one)."""
    saved = [(owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
             for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def pretend_cuda(kernels: dict | None = None):
    """One sm90 CUDA device for inductor's code generation; Triton kernels are not compiled,
    their source goes into ``kernels`` (name -> source) when given."""
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import torch._inductor.fx_passes.misc_patterns as misc_patterns
    import torch._inductor.runtime.triton_helpers as triton_helpers
    import torch._inductor.scheduler as scheduler
    import torch._subclasses.fake_tensor as fake_tensor
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.async_compile import AsyncCompile
    from triton.runtime.driver import driver

    def keep_source(self, name, source, *args, **kwargs):
        if kernels is not None:
            kernels[name] = source
        return types.SimpleNamespace(name=name)

    def const(value):
        return lambda *args, **kwargs: value

    patches = [
        (torch.cuda, "is_available", const(True)), (torch.cuda, "is_initialized", const(True)),
        (torch.cuda, "device_count", const(1)), (torch.cuda, "current_device", const(0)),
        (torch.cuda, "get_device_properties", const(H100)), (torch.cuda, "get_device_capability", const((9, 0))),
        (torch.cuda, "_lazy_init", const(None)), (torch.cuda.random, "_lazy_init", const(None)),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        (torch.cuda, "set_rng_state", const(None)), (torch.cuda, "set_device", const(None)),
        (torch.cuda, "_exchange_device", const(0)), (torch.cuda, "_maybe_exchange_device", const(0)),
        (torch.cuda, "synchronize", const(None)),
        (CudaInterface, "is_available", staticmethod(const(True))),
        (CudaInterface, "device_count", staticmethod(const(1))),
        (CudaInterface, "current_device", staticmethod(const(0))),
        (CudaInterface, "set_device", staticmethod(const(None))),
        (CudaInterface, "get_device_properties", staticmethod(const(H100))),
        (CudaInterface, "exchange_device", staticmethod(const(0))),
        (CudaInterface, "maybe_exchange_device", staticmethod(const(0))),
        (CudaInterface, "synchronize", staticmethod(const(None))),
        (CudaInterface, "is_bf16_supported", staticmethod(const(True))),
        (scheduler, "has_triton", const(True)),
        # A fake CUDA tensor's first construction makes a real one where CUDA is available
        # (torch 2.11 asks torch.cuda.is_available(), patched above; 2.14 asks torch.accelerator).
        (fake_tensor, "init_gpu_context", const(None)),
        (triton_helpers, "set_driver_to_gpu", const(None)),
        (fuse_attention, "_sfdp_init", const(None)), (misc_patterns, "_misc_patterns_init", const(None)),
        (AsyncCompile, "triton", keep_source), (driver, "_active", _Driver()),
    ]
    with patched(patches):
        yield


@contextlib.contextmanager
def counting_bytes():
    """Inductor counts each scheduler node's bytes (``torch._inductor.metrics.nodes_num_elem``)
    only while its metrics log is enabled: enable it, without output."""
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    saved = log.level, log.propagate, log.handlers[:]
    log.setLevel(logging.INFO)
    log.propagate, log.handlers = False, [logging.NullHandler()]
    try:
        yield
    finally:
        log.setLevel(saved[0])
        log.propagate, log.handlers = saved[1], saved[2]


def _on_cuda(value):
    if isinstance(value, torch.device) and value.type == "cpu":
        return torch.device("cuda", 0)
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cuda(v) for v in value)
    return value


def lower_for_cuda(graph: torch.fx.GraphModule, example_inputs, kernels: dict | None = None, **inner_kwargs):
    """Inductor's CUDA lowering of one partitioned ATen graph traced on the CPU: returns the
    scheduler's (node, bytes) list, extern kernels (GEMMs, custom ops) included."""
    import torch._inductor.metrics as metrics
    from torch._inductor.compile_fx import compile_fx_inner
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = copy.deepcopy(graph)
    for node in graph.graph.nodes:
        node.args, node.kwargs = _on_cuda(node.args), {k: _on_cuda(v) for k, v in node.kwargs.items()}
    graph.recompile()
    mode = FakeTensorMode()
    with pretend_cuda(kernels):
        with mode:
            inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                      if isinstance(t, torch.Tensor) else t for t in example_inputs]
            retraced = make_fx(graph)(*inputs)
        start = len(metrics.nodes_num_elem)
        with torch._guards.tracing(torch._guards.TracingContext(mode)):
            compile_fx_inner(retraced, inputs, **inner_kwargs)
        return [(node, 4 * n) for node, n in metrics.nodes_num_elem[start:]]


#: Forward-only compute-bound ops: in a partitioned backward graph, each is a recomputation
#: (a Linear's backward is two ``mm`` and a sum; attention's is its own backward op).
FORWARD_ONLY_OPS = ("aten.addmm.default", "aten._scaled_dot_product_efficient_attention.default",
                    "aten._scaled_dot_product_flash_attention.default",
                    "aten._scaled_dot_product_cudnn_attention.default", "itpn.bias_attention.default",
                    "itpn.fc1_gelu.default", "itpn.fused_mlp.default")


class RecomputedHeavyOps(ValueError):
    """A compiled backward recomputes GEMMs or attention, whose FLOPs a count of the eager
    step's leaves out."""


def recomputed_heavy_ops(backward: torch.fx.GraphModule) -> collections.Counter:
    """The GEMMs and attention forwards that a partitioned backward graph recomputes (what
    inductor's partitioner does under a low activation memory budget: below 0.6 for iTPN-L + CLIP-L's
    blocks, below 1 for some of the tiny recipe's), by op."""
    return collections.Counter(str(node.target) for node in backward.graph.nodes
                               if node.op == "call_function" and str(node.target) in FORWARD_ONLY_OPS)


def format_op_counts(counts: collections.Counter) -> str:
    """``"2 x aten.addmm.default, 1 x ..."``, by op name; "none" when empty."""
    return ", ".join(f"{n} x {op}" for op, n in sorted(counts.items())) or "none"


def _empty_outputs(graph: torch.fx.GraphModule):
    """A stand-in for ``graph`` that returns uninitialised tensors of its outputs' shapes (an
    ATen graph's ``val`` or a dynamo graph's ``example_value``)."""
    (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
    metas = [node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else node
             for node in outputs]

    def run(*args):
        return tuple(torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=m.device)
                     if isinstance(m, torch.Tensor) else m for m in metas)
    return run


def cuda_backend(record: list, kernels: dict | None = None, execute: bool = True):
    """A dynamo backend that appends, per compiled graph (forward, then backward), inductor's
    CUDA scheduler nodes with their bytes to ``record``, and runs the graph uncompiled on the
    CPU (``execute``) or returns uninitialised outputs of the right shapes (for counting at a
    batch the CPU need not compute). Bytes are counted inside ``counting_bytes()`` only. A
    backward graph that recomputes GEMMs or attention (a low activation memory budget) raises
    ``RecomputedHeavyOps``: the roofline counts those from the eager step, once."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    def inner(graph, example_inputs, **kwargs):
        if kwargs.get("is_backward") and (ops := recomputed_heavy_ops(graph)):
            budget = functorch_config.activation_memory_budget
            raise RecomputedHeavyOps(
                f"at activation memory budget {budget:g} a compiled backward recomputes {format_op_counts(ops)}: "
                "FLOPs this count takes from the eager step once; use a higher budget (iTPN-L + CLIP-L's blocks "
                "recompute none at 0.6 or 0.9)")
        record.append(lower_for_cuda(graph, example_inputs, kernels, **kwargs))
        return graph.forward if execute else _empty_outputs(graph)

    def backend(graph, example_inputs):
        with functorch_config.patch(force_non_lazy_backward_lowering=True), \
                inductor_config.patch(fx_graph_cache=False, compile_threads=1):
            return compile_fx(graph, example_inputs, inner_compile=inner)
    return backend
