"""A training step's peak GPU memory, simulated on the CPU without a GPU (``itpn-memory``,
issue #6: the largest batch with and without activation checkpointing, and ZeRO-3 + CPU
offload in a 24 GiB budget).

Simulated, op by op, with fake tensors (nothing is allocated, so iTPN-L at batch 384 runs on a
laptop in under a minute): the teacher's forward and the student's forward and backward at
the recipe's batch, as ``itpn-bench``'s step runs them (its synthetic batch, the teacher's
view included, stays alive for the whole step). A dispatch mode records each storage
an operation creates, its size, and when it is freed; the peak is the largest sum alive after
any operation. Attention runs as CUDA runs it with an additive bias: SDPA's memory-efficient
kernel, whose meta kernel gives what it saves (bf16 q, k, v and output, an fp32 log-sum-exp)
and its backward's outputs (``--attention naive``: the explicit fp32 softmax). Checkpointed
blocks keep their inputs and are recomputed in the backward, as on the GPU.

Counted, not simulated: the weights, the optimizer's state and each engine's buffers
(``static_bytes``): ``plain`` is the benchmark outside DeepSpeed (fp32 weights, torch AdamW,
autocast); ``zero1`` is the trainer's DeepSpeed bf16 engine with ``flat_zero1_reduction``
(bf16 weights, a flat bf16 gradient buffer and this rank's partition of it, fp32 master
weights and AdamW moments for 1/world of the weights, the partition cast to fp32 at the step);
``zero3_offload`` keeps weights and optimizer on the host, so the GPU holds the parameters
below DeepSpeed's persistence threshold, the gathered ones (at most
``stage3_max_live_parameters``, 1e9 by default: with the default reuse distance DeepSpeed may
keep every gathered parameter of iTPN-L until its backward, so all are counted) and one
gradient reduction bucket; each gradient leaves the GPU when the backward has produced it.

Where the CPU is not CUDA: autocast's policy. CUDA's autocast runs LayerNorm and a
half-precision softmax in fp32, the CPU's in bf16 / fp16. The simulation runs those two as CUDA
does (``cuda_autocast_policy``, which the backward's recomputation of checkpointed blocks
follows too). As a check of what else may differ, the student's forward is run a second time
with fake CUDA tensors under CUDA's own autocast (a CUDA build of torch does that without a
GPU), and the difference between the bytes the two forwards leave alive, 0 for our recipes,
is added to the peak. (The backward cannot run on fake CUDA tensors: autograd's CUDA worker
thread needs a device.)

Compiled blocks (``--compiled``, the trainer's and ``itpn-bench``'s default ``fold`` setting):
each block signature is compiled once, before the simulation, by dynamo and inductor's own
``compile_fx`` (its joint-graph passes and partitioner: the tensors saved for the backward are
the ones the trainer's compiled blocks save), but the partitioned ATen graphs are not lowered:
they run op by op inside the simulation (``FusedGraph``), and the results that inductor would
fuse into its kernels (pointwise chains that no GEMM, attention or other library kernel reads,
``materialised``) are not counted. Dynamo does not trace under a Python dispatch mode such as
``LiveBytes``, hence the compile first, on real uninitialised inputs of the recipe's shapes,
with a backend that computes nothing. The teacher's blocks stay eager, as ``fold`` runs them.
``--activation-memory-budget B`` compiles them under the trainer's
``deepspeed.activation_memory_budget``: the partitioner saves less and its backward graphs
recompute the rest, which the simulation runs; the GEMMs and attention forwards they
recompute are listed (none for iTPN-L + CLIP-L's blocks at 0.6 and 0.9; at 0.9 the tiny
recipe's recompute one GEMM).

Not modelled: the CUDA context and the caching allocator's fragmentation (neither is in
``torch.cuda.max_memory_allocated``, which ``itpn-bench`` reports, but both take memory that
a batch cannot have), workspaces that kernels allocate for themselves (cuBLAS, the
memory-efficient attention's backward), and where inductor writes a fused result into the
buffer of an input that dies with it (counted as a new buffer). docs/performance.md compares
the predictions with the measured peaks; the budget search keeps ``--headroom`` (10%) free for
what is not modelled.

    itpn-memory --recipe clip_l --batch 128 [--engine plain|zero1|zero3_offload]
                [--precision autocast|fp16|fp32|bf16] [--ckpt-every N] [--attention sdpa|naive]
                [--no-fold] [--compiled [--activation-memory-budget B]] [--world W]
                [--budget-gib G [--headroom F] [--granularity N]]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..engine.build import apply_block_options, build_objective, build_teacher
from ..engine.config import load_ds_fragments
from ..layers import Block
from ..layers.block import set_activation_memory_budget
from ..layers.attention import attention_impl
from ..objectives.pixel_mim import PixelMIM
from .bench import RECIPES, largest_batch, load_recipe, make_batch
from .cuda_codegen import _empty_outputs, format_op_counts, patched, recomputed_heavy_ops
from .roofline import efficient_attention

GIB = 2 ** 30
ENGINES = ("plain", "zero1", "zero3_offload")
DTYPES = {"autocast": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: DeepSpeed 0.19's defaults of the ZeRO-3 settings that decide what stays on the GPU, where
#: ds_configs/zero3_offload.json leaves them out. With stage3_max_reuse_distance at its default
#: (1e9) a parameter reused within that many elements is not released, and in a forward +
#: backward every one is, so up to stage3_max_live_parameters gathered elements stay.
ZERO3_DEFAULTS = {"stage3_param_persistence_threshold": 100_000, "reduce_bucket_size": 500_000_000,
                  "stage3_max_live_parameters": 1_000_000_000}


def zero3_settings(fragment: str = "zero3_offload") -> dict:
    """The ZeRO-3 settings above as the trainer's fragment (ds_configs/) sets them."""
    z = load_ds_fragments([fragment])["zero_optimization"]
    return {k: int(z.get(k, default)) for k, default in ZERO3_DEFAULTS.items()}


_LAYER_NORM = torch.ops.aten.native_layer_norm.default


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operations create and that are still alive: ``total`` now,
    ``peak`` the largest total after any operation. Storages in ``exclude`` (the weights) and
    storages that existed before the mode are not counted, nor those made inside
    ``uncounted()`` (a compiled graph's fused intermediates, ``FusedGraph``). Works on real
    and fake tensors. ``LiveBytes.active``: the innermost one entered, or None."""

    active: LiveBytes | None = None

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = set(exclude)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.virtual: dict[int, StorageWeakRef] = {}
        self.total = self.peak = 0
        self.counting = True
        self._outer = None

    def __enter__(self):
        self._outer, LiveBytes.active = LiveBytes.active, self
        return super().__enter__()

    def __exit__(self, *exc):
        LiveBytes.active = self._outer
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def uncounted(self):
        """Storages made inside are not counted, nor later views of them."""
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    def poll(self) -> int:
        """Forgets the storages freed since the last call; returns ``total``. (A storage's
        address is not reused while its weak reference is held, so a key names one storage.)"""
        expired = torch.UntypedStorage._expired
        for key in [k for k in self.live if expired(k)]:
            self.total -= self.live.pop(key)[1]
        for key in [k for k in self.virtual if expired(k)]:
            del self.virtual[key]
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Freed storages first: one freed inside this operation may share its address with an output.
        self.poll()
        for i, t in enumerate(tree_leaves(out)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                key = ref.cdata
                if key in self.live or key in self.exclude or key in self.virtual:
                    continue
                if not self.counting:
                    self.virtual[key] = ref
                    continue
                n = storage.nbytes()
                if func is _LAYER_NORM and i > 0:  # mean and rstd: fp32 from the CPU's and CUDA's kernels,
                    n = t.numel() * 4  # from the meta kernel in the input's dtype on the CPU
                self.live[key] = (ref, n)
                self.total += n
        self.peak = max(self.peak, self.total)
        return out


#: Ops that inductor lowers to loops it can fuse into their consumers, besides those tagged
#: pointwise: constants, its own random numbers, gathers (indirect loads).
_FUSIBLE = ("aten.full.default", "aten.scalar_tensor.default", "aten.zeros.default", "aten.ones.default",
            "aten.iota.default", "aten.index.Tensor", "prims.inductor_random.default",
            "prims.inductor_lookup_seed.default", "prims.iota.default")


def _is_view(node: torch.fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(r.alias_info is not None
                                                               for r in target._schema.returns)


def _kind(node: torch.fx.Node) -> str:
    """"view" (no memory of its own), "fusible" (pointwise: computed inside its consumers'
    kernels unless inductor writes it out), "reduction" (written out; reads its pointwise
    inputs inside its own kernel) or "extern" (a library kernel or fallback: GEMMs, attention,
    concatenation; written out, and so is every input it reads)."""
    if node.op != "call_function":
        return "other"
    target = node.target
    if target is operator.getitem or _is_view(node):
        return "view"
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags or str(target) in _FUSIBLE:
        return "fusible"
    if torch.Tag.reduction in tags:
        return "reduction"
    return "extern"


def materialised(graph: torch.fx.Graph, reads_threshold: int = 4) -> set:
    """The nodes of a partitioned ATen graph whose outputs inductor writes to memory, by its
    rules, simplified: every non-pointwise result (reductions, GEMMs, attention, fallbacks);
    the graph's outputs (what the forward saves for the backward, and the results); pointwise
    results that an extern kernel reads (through views too: it reads memory); and a pointwise
    result with more than one user whose computation reads more than ``reads_threshold``
    written-out tensors (inductor's ``realize_reads_threshold``: it writes such a result once
    instead of recomputing it in each user). Every other pointwise result is fused into the
    kernels of its users and never allocated."""
    nodes = list(graph.nodes)
    kind = {n: _kind(n) for n in nodes}
    out: set = set()

    def force(n):
        while isinstance(n, torch.fx.Node) and kind[n] == "view":  # a view is its base's memory
            n = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        if isinstance(n, torch.fx.Node) and kind[n] == "fusible":
            out.add(n)
    for n in nodes:
        if kind[n] in ("reduction", "extern"):
            out.add(n)
        if kind[n] == "extern":
            for a in n.all_input_nodes:
                force(a)
        if n.op == "output":
            for a in n.all_input_nodes:
                force(a)
    reads: dict = {}  # for each fused result, the written-out tensors its computation reads
    for n in nodes:
        if kind[n] in ("fusible", "view") and n not in out:
            r = set()
            for a in n.all_input_nodes:
                r |= reads.get(a, {a}) if (kind[a] in ("fusible", "view") and a not in out) else {a}
            reads[n] = r
            if kind[n] == "fusible" and len(n.users) > 1 and len(r) > reads_threshold:
                out.add(n)
                reads[n] = {n}
    return out


class FusedGraph(torch.fx.Interpreter):
    """Runs a partitioned ATen graph op by op, freeing each value after its last use, with
    the results inductor would fuse away (not in ``materialised``) left out of the active
    ``LiveBytes``: what the compiled kernels would allocate, without compiling them."""

    def __init__(self, module: torch.fx.GraphModule, keep: set | None = None):
        super().__init__(module, garbage_collect_values=True)
        self.keep = materialised(module.graph) if keep is None else keep

    def run_node(self, n):
        live = LiveBytes.active
        if live is None or n.op != "call_function" or n in self.keep:
            return super().run_node(n)
        with live.uncounted():
            return super().run_node(n)


def _fused_graph(graph: torch.fx.GraphModule, example_inputs, **kwargs):
    """An ``inner_compile`` for inductor's ``compile_fx``: the graph, run by ``FusedGraph``
    (boxed: the argument list is cleared, so the inputs can be freed as the graph goes). What
    is written out is decided once per graph, not at every run."""
    keep = materialised(graph.graph)

    def run(args):
        return FusedGraph(graph, keep).boxed_run(args)
    run._boxed_call = True
    return run


def storage_keys(modules) -> set:
    return {StorageWeakRef(t.untyped_storage()).cdata
            for m in modules if m is not None for t in (*m.parameters(), *m.buffers())}


@contextlib.contextmanager
def swapped_weights(modules, convert):
    """Every parameter and buffer of ``modules`` replaced by ``convert(tensor)`` for the
    duration (a fake copy: the weights must be fake tensors too, or every view of a real
    weight taken under the fake mode becomes a new fake storage); yields their storage keys."""
    saved, memo = [], {}
    for root in modules:
        for m in root.modules():
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is not None:
                        saved.append((table, name, t))
                        if id(t) not in memo:  # tied weights stay tied
                            memo[id(t)] = convert(t)
                        table[name] = memo[id(t)]
    try:
        yield {StorageWeakRef(t.untyped_storage()).cdata for t in memo.values()}
    finally:
        for table, name, t in saved:
            table[name] = t


@dataclass
class Step:
    """A simulated step's bytes: the dynamic peak (activations, gradients, transients),
    what the student's forward leaves alive for the backward, the gradients at the end, the
    autocast correction (what a fake CUDA forward under CUDA's autocast saves beyond the
    simulated one, which already follows CUDA's policy for LayerNorm and softmax; 0 without
    autocast) and the static bytes (weights, optimizer state, engine buffers) by item."""
    batch: int
    dynamic_peak: int
    forward_live: int
    grads: int
    correction: int
    static: dict
    #: compiled blocks: the GEMMs and attention forwards their backward graphs recompute in
    #: one step, by op (a low activation memory budget makes them)
    recomputed: collections.Counter = field(default_factory=collections.Counter)

    @property
    def peak(self) -> int:
        return sum(self.static.values()) + self.dynamic_peak + self.correction


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def static_bytes(engine: str, student: torch.nn.Module, teacher: torch.nn.Module | None, world: int = 1) -> dict:
    """Weights, optimizer state and engine buffers on one GPU (see the module docstring);
    ``student``'s parameters as the engine holds them (fp32 for ``plain``, bf16 otherwise);
    ``teacher``: the frozen CLIP tower (``CLIPTeacher.tower``) or None."""
    params = [p for p in student.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    items = {"teacher weights": _nbytes(teacher.parameters()) if teacher is not None else 0}
    if engine == "plain":
        items.update({"weights": _nbytes(params), "AdamW moments": 8 * n})
    elif engine == "zero1":
        items.update({"weights": _nbytes(params), "flat gradients": _nbytes(params),
                      "gradient partition": 2 * math.ceil(n / world),
                      "fp32 master + AdamW moments": 12 * math.ceil(n / world),
                      "fp32 gradient partition (step)": 4 * math.ceil(n / world)})
    elif engine == "zero3_offload":
        z = zero3_settings()
        threshold = z["stage3_param_persistence_threshold"]
        persistent = [p for p in params if p.numel() < threshold]
        gathered = min(z["stage3_max_live_parameters"], sum(p.numel() for p in params if p.numel() >= threshold))
        items.update({"persistent parameters": _nbytes(persistent),
                      "gathered parameters": gathered * params[0].element_size(),
                      "reduction bucket": z["reduce_bucket_size"] * params[0].element_size()})
    else:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return items


def _autocast(device: str, dtype, enabled: bool):
    """torch.autocast, also for fake CUDA tensors where CUDA is absent (torch.autocast then
    disables itself with a warning)."""
    if not enabled:
        return contextlib.nullcontext()
    if device != "cuda" or torch.cuda.is_available():
        return torch.autocast(device, dtype=dtype)

    @contextlib.contextmanager
    def forced():
        was, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
        try:
            yield
        finally:
            torch.set_autocast_enabled("cuda", was)
            torch.set_autocast_dtype("cuda", was_dtype)
            torch.clear_autocast_cache()
    return forced()


_layer_norm = torch.nn.functional.layer_norm


def _layer_norm_as_cuda(input, *args, **kwargs):
    # CUDA's autocast runs LayerNorm in fp32 (its "fp32" list); the CPU's in lower precision.
    if not torch.is_autocast_enabled("cpu"):
        return _layer_norm(input, *args, **kwargs)

    def fp32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    with torch.autocast("cpu", enabled=False):
        return _layer_norm(fp32(input), *[fp32(a) for a in args], **{k: fp32(v) for k, v in kwargs.items()})


_softmax = torch.Tensor.softmax


def _softmax_as_cuda(input, dim, dtype=None):
    # CUDA's autocast runs a half-precision softmax without a dtype in fp32 ("fp32_set_opt_dtype").
    if dtype is None and torch.is_autocast_enabled("cpu") and input.dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return _softmax(input, dim, dtype=dtype)


@contextlib.contextmanager
def cuda_autocast_policy():
    """For the duration, the CPU's autocast runs what CUDA's runs in fp32 but the CPU's in
    lower precision as CUDA does: LayerNorm (``F.layer_norm``, which ``nn.LayerNorm`` and
    open_clip call) and ``Tensor.softmax`` (the naive attention's), an fp32 result. Patches of
    the functions rather than a torch-function mode, so that a checkpointed block's
    recomputation in the backward follows them too. ``simulate`` checks what is left of the two
    policies' difference by running the student's forward on fake CUDA tensors as well."""
    if torch.Tensor.__dict__.get("softmax") is _softmax_as_cuda:  # already in force (nested)
        yield
        return
    assert "softmax" not in torch.Tensor.__dict__  # TensorBase's: shadowed here, the shadow removed after
    with patched([(torch.nn.functional, "layer_norm", _layer_norm_as_cuda)]):
        torch.Tensor.softmax = _softmax_as_cuda
        try:
            yield
        finally:
            del torch.Tensor.softmax


def _attention(attention: str):
    """Attention as CUDA runs it: "sdpa" on the memory-efficient kernel (an additive bias
    rules out flash), anything else the named ``attention_impl``."""
    return efficient_attention() if attention == "sdpa" else attention_impl(attention)


def build(recipe: str, engine: str, precision: str, ckpt_every: int = 0, fold: bool = True,
          initialise: bool = False) -> tuple:
    """(config, student objective, teacher) on the CPU, held as ``engine`` holds them; weights
    and buffers uninitialised (fast; all a simulation needs) unless ``initialise``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {precision!r}")
    if engine != "plain" and precision != "bf16":
        raise ValueError(f"--engine {engine} runs DeepSpeed's bf16 weights: use --precision bf16, not {precision!r}")
    cfg = load_recipe(recipe)
    dtype = DTYPES[precision]
    device = "cpu" if initialise else "meta"
    teacher = build_teacher(cfg, dtype, device)
    if teacher is not None and not initialise:
        teacher.tower.to_empty(device="cpu")  # the frozen tower is not a registered submodule
    with torch.device(device):
        student = build_objective(cfg, teacher)
    student = (student if initialise else student.to_empty(device="cpu")).train()
    apply_block_options(student, ckpt_every, ckpt_every > 0, False, fold_layer_scale=fold)
    if engine != "plain":
        student = student.to(dtype)
    return cfg, student, teacher


def simulate(recipe: str, batch: int, engine: str = "plain", precision: str = "autocast", ckpt_every: int = 0,
             attention: str = "sdpa", fold: bool = True, world: int = 1, cuda_policy: bool = True,
             built: tuple | None = None, fake: bool = True, compiled: bool = False, graphs: dict | None = None) -> Step:
    """One step of ``recipe`` at ``batch``, simulated (see the module docstring). ``built``:
    what ``build`` returned for the same arguments, to simulate several batches from one build.
    ``cuda_policy``: add the autocast correction (skipped with a warning where torch cannot
    make fake CUDA tensors: a CPU-only build). ``fake=False`` runs the same step with real
    tensors (``attention="naive"``, which runs on the CPU): the tests check the simulation
    against it, on a ``build(..., initialise=True)``. ``compiled``: every block runs as the
    trainer's compiled blocks run, saving for the backward what inductor's partitioner saves
    (``compiled_block_forwards``; ``graphs``: its cache, to share the compiled graphs between
    calls at one batch)."""
    cfg, student, teacher = built or build(recipe, engine, precision, ckpt_every, fold)
    dtype, autocast = DTYPES[precision], engine == "plain" and precision != "fp32"
    tower = teacher.tower if teacher is not None else None
    run = functools.partial(_run, cfg, student, teacher, batch, engine, dtype, autocast, attention, fake)
    forwards, eager_forward_live = [], None
    if compiled:
        calls = {}
        _, eager_forward_live, _, _ = run(backward=False, record=calls)
        forwards = compiled_block_forwards(calls, dtype, autocast, attention, graphs)
    recomputed = sum((forward.recomputed for _, _, forward in forwards), collections.Counter())
    live, forward_live, grads, targets = run(forwards=forwards)
    correction = 0
    if autocast and cuda_policy:
        try:  # the check forward runs eager blocks: compared with the eager forward
            correction = cuda_forward_live(cfg, student, batch, dtype, targets, attention) \
                - (forward_live if eager_forward_live is None else eager_forward_live)
        except (RuntimeError, AssertionError) as e:
            warnings.warn(f"itpn-memory: no fake CUDA tensors here ({e}); the peak is the CPU autocast "
                          "policy's, without the correction for CUDA's", stacklevel=2)
    return Step(batch, live.peak, forward_live, grads, correction, static_bytes(engine, student, tower, world),
                recomputed)


def _run(cfg, student, teacher, batch: int, engine: str, dtype, autocast: bool, attention: str, fake: bool,
         backward: bool = True, forwards: list = (), record: dict | None = None) -> tuple:
    """``simulate``'s step: ``(LiveBytes, bytes the student's forward leaves alive, gradient
    bytes, the targets' dtype or None)``. ``forwards``: ``(block, "_compiled_forward",
    function)`` patches for the duration; ``record``: filled with each block's inputs
    (``_record_block_inputs``); ``backward=False``: the forward only."""
    tower = teacher.tower if teacher is not None else None
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    # Pixel MIM checks a CPU mask's counts on the host, which a fake mask cannot answer.
    unchecked = patched([(PixelMIM, "_check_keep_counts", lambda self, mask: None)]) if fake \
        else contextlib.nullcontext()
    handles = []
    with mode, unchecked, cuda_autocast_policy(), patched(list(forwards)):
        weights = swapped_weights([m for m in (student, tower) if m is not None], mode.from_tensor) if fake \
            else contextlib.nullcontext(storage_keys([student, tower]))
        with weights as keys:
            params = [p for p in student.parameters() if p.requires_grad]
            if engine == "zero3_offload" and backward:  # each gradient is reduced into the bucket and moved to the host
                handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
            if record is not None:
                handles += _record_block_inputs(student, record)
            live = LiveBytes(keys)
            try:
                with _attention(attention), live:
                    # itpn-bench's synthetic batch, alive for the whole step (the engines get a cast copy)
                    x, mask, tview = fixed = make_batch(cfg, batch, torch.device("cpu"))
                    if engine != "plain":
                        x = x.to(dtype)
                    kwargs = {}
                    if teacher is not None:
                        with torch.no_grad(), _autocast("cpu", dtype, autocast):
                            kwargs["targets"] = teacher(tview if engine == "plain" else tview.to(dtype))
                    before = live.poll()
                    with _autocast("cpu", dtype, autocast):
                        loss = student(x, mask, **kwargs)["loss"]
                    gc.collect()
                    forward_live = live.poll() - before
                    if backward:
                        loss.backward()
                    targets = kwargs["targets"].dtype if teacher is not None else None
                    del loss, x, mask, tview, fixed, kwargs
                    gc.collect()
                    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
            finally:
                for h in handles:
                    h.remove()
                for p in params:
                    p.grad = None
    return live, forward_live, grads, targets


def _meta(t):
    """What a compiled graph specialises on in an input: shape, strides, dtype, requires_grad."""
    return None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype, t.requires_grad)


def _record_block_inputs(module, record: dict) -> list:
    """Forward pre-hooks that fill ``record``: for each distinct compiled-graph signature of
    a block call (the block's parameters, buffers and settings, its inputs' metadata), the
    first block with it, the blocks that share it, and the inputs' metadata. Returns the
    hooks' handles."""
    def hook(block, args, kwargs):
        names = ("x", "rel_index", "rel_grid")
        bound = {**dict(zip(names, args)), **kwargs}
        x, rel_index, rel_grid = (bound.get(n) for n in names)
        key = (tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in block.named_parameters()),
               tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers()),
               block.has_attn, block.layer_scale, block.fold_layer_scale, block.drop_path.enabled,
               block.mlp.fused, _meta(x), _meta(rel_index), rel_grid)
        entry = record.setdefault(key, {"key": key, "block": block, "blocks": [], "x": _meta(x),
                                        "rel_index": _meta(rel_index), "rel_grid": rel_grid})
        if all(b is not block for b in entry["blocks"]):
            entry["blocks"].append(block)
    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, Block)]


def _capture(out: dict):
    """A dynamo backend that keeps, in ``out``, inductor's forward + backward for the graph
    (``compile_fx``: its joint-graph passes and its partitioner, so the tensors saved for the
    backward are the ones the trainer's compiled blocks save), with each partitioned ATen graph
    left unlowered (run by ``FusedGraph``), and the graph's inputs as dynamo names them. To
    dynamo it returns a stand-in that only makes outputs of the right shapes, so the compile at
    a recipe's batch computes nothing."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    def inner(graph, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            out["recomputed"] = recomputed_heavy_ops(graph)
        return _fused_graph(graph, example_inputs, **kwargs)

    def backend(graph, example_inputs):
        sources = [node.meta["grapharg"].source.name for node in graph.graph.nodes if node.op == "placeholder"]
        (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
        with functorch_config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False), \
                inductor_config.patch(fx_graph_cache=False):
            out["fn"] = compile_fx(graph, example_inputs, inner_compile=inner)
        out["sources"], out["outputs"] = sources, len(outputs)
        return _empty_outputs(graph)
    return backend


def _compiled_forward(captured: dict):
    """``Block._compiled_forward`` from ``_capture``'s graph: the block's parameters and
    inputs passed as dynamo's graph takes them (names such as ``L['self']._modules['mlp']...``)."""
    code = [(s, compile(s, "<dynamo source>", "eval")) for s in captured["sources"]]
    fn = captured["fn"]
    if captured["outputs"] != 1:
        raise RuntimeError(f"itpn-memory: a compiled block's graph returns {captured['outputs']} tensors, not 1")

    def forward(block, x, rel_index=None, rel_grid=None):
        scope = {"L": {"self": block, "x": x, "rel_index": rel_index, "rel_grid": rel_grid}}
        args = []
        for source, c in code:
            try:
                args.append(eval(c, {}, scope))  # noqa: S307 (dynamo's own source expressions)
            except (KeyError, NameError, AttributeError) as e:
                raise RuntimeError(f"itpn-memory: a compiled block's graph input {source} is not one of "
                                   f"the block's arguments or attributes ({e})") from None
        return fn(*args)[0]
    forward.recomputed = captured.get("recomputed", collections.Counter())
    return forward


def compiled_block_forwards(calls: dict, dtype, autocast: bool, attention: str, graphs: dict | None = None) -> list:
    """For each signature in ``calls`` (``_record_block_inputs``), the block compiled as the
    trainer compiles it (``Block.compile``: one region per block, static shapes) with a
    backend that keeps inductor's partitioned graphs (``_capture``); returns the patches
    ``(block, "_compiled_forward", function)`` that make every recorded block run them.
    Compiled on the CPU with real, uninitialised inputs under the simulation's autocast,
    CUDA policy and attention (dynamo does not trace under the simulation's dispatch modes).
    ``graphs``: a cache of the compiled graphs by signature, filled here."""
    import torch._functorch.config as functorch_config
    graphs = {} if graphs is None else graphs
    patches = []
    with cuda_autocast_policy(), _attention(attention), _autocast("cpu", dtype, autocast):
        for entry in calls.values():
            key = (entry["key"], dtype, autocast, attention, functorch_config.activation_memory_budget)
            if key not in graphs:
                shape, stride, xdtype, grad = entry["x"]
                x = torch.empty_strided(shape, stride, dtype=xdtype).requires_grad_(grad)
                rel_index = None if entry["rel_index"] is None else torch.zeros(entry["rel_index"][0],
                                                                                 dtype=entry["rel_index"][2])
                captured = {}
                torch._dynamo.reset()
                torch.compile(Block._forward, backend=_capture(captured), dynamic=False)(
                    entry["block"], x, rel_index, entry["rel_grid"])
                if "fn" not in captured:
                    raise RuntimeError("itpn-memory: dynamo compiled no graph for a block (a graph break?)")
                graphs[key] = _compiled_forward(captured)
            patches += [(block, "_compiled_forward", graphs[key]) for block in entry["blocks"]]
    torch._dynamo.reset()
    return patches


def cuda_forward_live(cfg, student, batch: int, dtype, targets: torch.dtype | None, attention: str = "sdpa",
                      autocast: bool = True) -> int:
    """Bytes the student's forward leaves alive under CUDA's autocast to ``dtype`` (or, with
    ``autocast=False``, in its weights' dtype), with fake CUDA tensors (fake copies of the
    weights; the module is restored) and random teacher targets of dtype ``targets`` (None: no
    teacher). Raises where torch cannot make fake CUDA tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        def to_cuda(t):
            return mode.from_tensor(t).to("cuda").detach().requires_grad_(t.requires_grad)
        with swapped_weights([student], to_cuda) as keys, LiveBytes(keys) as live:
            x, mask, _ = make_batch(cfg, batch, torch.device("cuda"))
            if not autocast:
                x = x.to(next(student.parameters()).dtype)
            kwargs = {}
            if targets is not None:
                kwargs["targets"] = torch.randn(batch, mask.shape[1], student.mfm_head.out_features, device="cuda",
                                                dtype=targets)
            before = live.poll()
            with _attention(attention), _autocast("cuda", dtype, autocast):
                loss = student(x, mask, **kwargs)["loss"]
            gc.collect()  # after autocast's cache of weight casts is cleared, as in simulate()
            after = live.poll()
            del loss
    return after - before


def format_step(s: Step) -> str:
    static = sum(s.static.values())
    return (f"{s.batch:6d} {static / GIB:9.2f} {s.forward_live / GIB:10.2f} {s.dynamic_peak / GIB:10.2f} "
            f"{s.correction / GIB:+11.2f} {s.peak / GIB:9.2f}")


HEADER = f"{'batch':>6s} {'static':>9s} {'fwd saved':>10s} {'dyn. peak':>10s} {'CUDA policy':>11s} {'peak GiB':>9s}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="clip_l")
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--engine", choices=ENGINES, default="plain")
    p.add_argument("--precision", choices=tuple(DTYPES), default=None,
                   help="plain: autocast (bf16, the default), fp16 (autocast) or fp32 (none); "
                        "the DeepSpeed engines: bf16 weights")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N-th block (0: none)")
    p.add_argument("--attention", choices=("sdpa", "naive"), default="sdpa")
    p.add_argument("--no-fold", action="store_true", help="layer scale as a separate multiply (the reference's form)")
    p.add_argument("--compiled", action="store_true",
                   help="blocks as the trainer compiles them (inductor's saved tensors and fused intermediates)")
    p.add_argument("--activation-memory-budget", type=float, default=None, metavar="B",
                   help="with --compiled: inductor's partitioner keeps at most B (in [0, 1]) of the activation "
                        "bytes it keeps by default and recomputes the rest (the trainer's "
                        "deepspeed.activation_memory_budget; default: torch's, 1.0)")
    p.add_argument("--world", type=int, default=1, help="ranks the ZeRO partitions are split over")
    p.add_argument("--budget-gib", type=float, help="also search the largest batch whose peak fits in this many GiB")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of the budget kept free for what is not modelled (workspaces, fragmentation)")
    p.add_argument("--max-batch", type=int, default=2048, help="upper end of the --budget-gib search")
    p.add_argument("--granularity", type=int, default=8, help="the --budget-gib search's step")
    args = p.parse_args(argv)
    if min(args.batch) < 1:
        p.error(f"--batch must be positive, got {args.batch}")
    if args.budget_gib is not None and args.budget_gib <= 0:
        p.error(f"--budget-gib must be positive, got {args.budget_gib}")
    if not 0 <= args.headroom < 1:
        p.error(f"--headroom is a fraction in [0, 1), got {args.headroom}")
    for flag, value, least in (("--world", args.world, 1), ("--granularity", args.granularity, 1),
                               ("--max-batch", args.max_batch, 1), ("--ckpt-every", args.ckpt_every, 0)):
        if value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    if args.activation_memory_budget is not None:
        if not args.compiled:
            p.error("--activation-memory-budget needs --compiled (it decides what compiled blocks save)")
        try:
            set_activation_memory_budget(args.activation_memory_budget, "--activation-memory-budget")
        except ValueError as e:
            p.error(str(e))
    precision = args.precision or ("autocast" if args.engine == "plain" else "bf16")
    try:
        built = build(args.recipe, args.engine, precision, args.ckpt_every, not args.no_fold)
    except ValueError as e:
        p.error(str(e))

    def run(b: int) -> Step:
        return simulate(args.recipe, b, args.engine, precision, args.ckpt_every, args.attention, not args.no_fold,
                        args.world, built=built, compiled=args.compiled)
    print(f"# itpn-memory: {args.recipe}, engine {args.engine}, {precision}, attention {args.attention}, "
          f"checkpointing every {args.ckpt_every or '-'} block(s), layer scale {'unfolded' if args.no_fold else 'folded'}, "
          f"world {args.world}; {'compiled' if args.compiled else 'eager'} blocks, simulated on the CPU")
    print(HEADER)
    seen = {}
    for b in args.batch:
        seen[b] = run(b)
        print(format_step(seen[b]), flush=True)
    first = seen[args.batch[0]]
    for name, n in first.static.items():
        print(f"#   static: {name} {n / GIB:.2f} GiB")
    if args.compiled:
        import torch._functorch.config as functorch_config
        print(f"#   activation memory budget {functorch_config.activation_memory_budget:g}; "
              f"GEMMs and attention forwards recomputed in the backward per step: {format_op_counts(first.recomputed)}")
    if args.budget_gib:
        budget = args.budget_gib * (1 - args.headroom) * GIB

        def fits(b):
            if b not in seen:
                seen[b] = run(b)
                print(format_step(seen[b]), flush=True)
            return seen[b].peak <= budget
        best = largest_batch(fits, args.batch[0], args.max_batch, args.granularity)
        print(f"largest batch in {args.budget_gib:g} GiB ({1 - args.headroom:.0%} of it): {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
