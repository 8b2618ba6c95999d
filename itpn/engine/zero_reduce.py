"""ZeRO-1's gradient reduction from one flat buffer per parameter group (issue #6).

DeepSpeed's ZeRO-1 (0.19.8, ``DeepSpeedZeroOptimizer`` with ``partition_gradients=False``)
reduces the gradients once, after the backward, parameter by parameter: each gradient is
copied into a reduction bucket (``reduce_independent_p_g_buckets_and_remove_grads``, 5 host
operations per parameter), the bucket is reduced, and each gradient of this rank's partition
is copied again into a partition buffer (``copy_grads_in_partition``, 6 more). For iTPN-L's
730 parameters that is about 8,000 operations issued after autograd has queued the whole
backward, while the GPU has nothing else to do. The bucket is allocated at
``reduce_bucket_size`` elements (5e8 in ``ds_configs/zero1.json``: 1 GB in bf16) at the first
gradient hook of every backward, whatever the model's size.

:func:`flat_zero1_reduction` replaces that, on one optimizer instance, by

1. one multi-tensor copy of all gradients into a flat buffer laid out exactly as the group's
   flat bf16 (or fp32) weights, ``bit16_groups_flat`` (alignment padding included, kept zero);
2. one collective over it with DeepSpeed's scaling (``gradient_average``,
   ``gradient_predivide_factor``, ``postscale_gradients``, sequence parallel size): a
   ``reduce_scatter_tensor`` into this rank's partition when the ZeRO config's
   ``reduce_scatter`` is on (the default; DeepSpeed issues one ``reduce`` per destination
   rank), an in-place ``all_reduce`` otherwise (DeepSpeed's arithmetic there);
3. the partition handed to the optimizer step as DeepSpeed's own pre-flattened gradient
   partition (``GradPartitionBufferGroup``), so the step neither flattens nor copies it.

The weights' partition of each rank is a contiguous slice of the flat weights, so the
gradient partition is the same slice of the flat gradients: the step sees exactly the values
DeepSpeed's path would give it (``tests/integration/test_host_sync.py`` compares the two bit
for bit on 2 ranks, fp32 and bf16, with and without reduce-scatter, with gradient
accumulation, a parameter without gradient, and DeepSpeed's prescale and predivide
averaging). The buffers are allocated once and reused.

Everything else stays DeepSpeed's: ZeRO-2 (gradients partitioned during the backward), CPU
offload, ``overlap_comm``, a separate gradient accumulation dtype, pipeline parallelism, MoE,
Muon, ZenFlow, and parameters whose communication dtype is not the group's (DeepSpeed's
``torch_autocast`` sends some fp32 gradients in bf16): for those the instance calls the
class's methods.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch


@dataclass
class _Layout:
    """Where one parameter group's gradients go: ``key`` identifies the flat weights it was
    built for (their storage and this rank's partition of them)."""
    key: tuple
    grads: torch.Tensor  # flat, laid out as bit16_groups_flat[i]
    views: list  # one per parameter of bit16_groups[i], shaped as the parameter
    partition: torch.Tensor  # this rank's gradient partition, handed to the step
    handed: list  # the GradPartitionBufferGroup given to the step (built once)


def _comm_dtypes(opt) -> set:
    return {opt.get_param_comm_dtype(p) for group in opt.bit16_groups for p in group}


def applies(opt) -> bool:
    """Whether this optimizer's reduction is the one :func:`flat_zero1_reduction` replaces
    (ZeRO-1 without offload, overlap, separate accumulation dtype, MoE, Muon or ZenFlow; one
    communication dtype, the weights'). Fixed at initialisation: checked once, at install."""
    return (not opt.partition_gradients and not opt.overlap_comm and not opt.cpu_offload
            and not opt.use_grad_accum_attribute and not getattr(opt, "zenflow", False)
            and not getattr(opt, "has_moe_layers", False) and getattr(opt, "autoep_folding_tp_group", None) is None
            and not any(group and opt._is_muon_group(group) for group in opt.params_in_partition)
            and all(g is opt.dp_process_group for g in opt.real_dp_process_group)
            and _comm_dtypes(opt) == {opt.dtype})


def _layout(opt, i: int) -> _Layout:
    """The flat gradient buffer of group ``i``, its views and the step's partition, rebuilt
    only when the flat weights or this rank's partition of them moved (DeepSpeed's offload
    and reload of states)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import GradPartitionBufferGroup

    flat, params = opt.bit16_groups_flat[i], opt.bit16_groups[i]
    rank = dist.get_rank(group=opt.real_dp_process_group[i])
    world = dist.get_world_size(group=opt.real_dp_process_group[i])
    weights_partition = opt.parallel_partitioned_bit16_groups[i][rank]
    key = (flat.data_ptr(), flat.numel(), weights_partition.data_ptr(), weights_partition.numel())
    cache = opt.__dict__.setdefault("_itpn_flat_grads", {})
    if i in cache and cache[i].key == key:
        return cache[i]
    # Each parameter's place in the flat weights, as DeepSpeed laid them out (and points the
    # parameters at them after a step): not where a parameter's data happens to be now.
    where = {id(p): off for p, off in zip(opt.round_robin_bit16_groups[i], opt.round_robin_bit16_offsets[i])}

    def offset(p: torch.Tensor) -> int:
        if id(p) not in where or where[id(p)] + p.numel() > flat.numel():
            raise RuntimeError(f"flat ZeRO-1 reduction: a parameter of group {i} ({tuple(p.shape)}) has no place in "
                               f"the group's flat weights ({flat.numel()} elements)")
        return where[id(p)]

    old = cache.get(i)
    grads = (old.grads if old is not None and old.grads.numel() == flat.numel() and old.grads.dtype == flat.dtype
             and old.grads.device == flat.device else torch.zeros_like(flat))
    grads.zero_()  # alignment padding stays zero from here on
    views = [grads.narrow(0, offset(p), p.numel()).view_as(p) for p in params]
    size = flat.element_size()
    start, numel = (weights_partition.data_ptr() - flat.data_ptr()) // size, weights_partition.numel()
    if not (0 <= start and start + numel <= flat.numel()):
        raise RuntimeError(f"flat ZeRO-1 reduction: rank {rank}'s weight partition of group {i} is not a slice of the "
                           "group's flat weights")
    if opt.reduce_scatter:
        if flat.numel() != world * numel or start != rank * numel:
            raise RuntimeError(f"flat ZeRO-1 reduction: parameter group {i}'s flat weights ({flat.numel()} elements) "
                               f"are not {world} partitions of {numel}")
        reuse = (old is not None and old.partition._base is None and old.partition.numel() == numel
                 and old.partition.dtype == flat.dtype and old.partition.device == flat.device)
        partition = old.partition if reuse else torch.zeros(numel, dtype=flat.dtype, device=flat.device)
    else:
        partition = grads.narrow(0, start, numel)
    # The step's gradient list: this rank's share of each of its parameters, and the
    # alignment padding between them, marked as DeepSpeed marks it (the norm skips it).
    pieces, at = [], 0
    for p in opt.params_in_partition[i]:
        lo = max(offset(p), start) - start
        hi = min(offset(p) + p.numel(), start + numel) - start
        if lo > at:
            pad = partition.narrow(0, at, lo - at)
            pad._zero_padding = True
            pieces.append(pad)
        piece = partition.narrow(0, lo, hi - lo)
        pieces.append(piece.view_as(p) if hi - lo == p.numel() else piece)
        at = hi
    if at < numel:
        pad = partition.narrow(0, at, numel - at)
        pad._zero_padding = True
        pieces.append(pad)
    cache[i] = _Layout(key, grads, views, partition, GradPartitionBufferGroup(pieces, partition))
    return cache[i]


#: torch 2.14 renamed reduce_scatter_tensor (deprecated there); torch 2.11 has only the old name
_reduce_scatter = getattr(torch.distributed, "reduce_scatter_single", None) or torch.distributed.reduce_scatter_tensor


def _reduce(opt, layout: _Layout, group) -> None:
    """DeepSpeed's ``gradient_reduction_w_predivide`` scaling around one collective."""
    from deepspeed import comm as dist

    world = dist.get_world_size(group=group)
    if not opt.reduce_scatter:
        opt.gradient_reduction_w_predivide(layout.grads, opt.dtype)
        return
    grads, out = layout.grads, layout.partition
    divisor = world / float(opt.sequence_parallel_size)
    if opt.gradient_average and not opt.postscale_gradients:
        grads.div_(divisor)
    elif opt.gradient_average and opt.gradient_predivide_factor != 1.0:
        grads.mul_(1.0 / opt.gradient_predivide_factor)
    _reduce_scatter(out, grads, group=group)
    if opt.gradient_average and opt.postscale_gradients and opt.gradient_predivide_factor != world:
        out.mul_(opt.gradient_predivide_factor / divisor)


def _reduce_gradients_flat(self, pipeline_parallel=False):
    """DeepSpeed's ``reduce_gradients`` for ZeRO-1 (called by the engine at the gradient
    accumulation boundary, after the backward) from one flat buffer per group; see the module
    docstring. Leaves what DeepSpeed's epilogue leaves: the partition in
    ``averaged_gradients``, ``.grad`` of every parameter None, the buckets empty."""
    if pipeline_parallel:  # DeepSpeed's pipeline engine runs the backward outside ZeRO
        return type(self).reduce_gradients(self, pipeline_parallel)
    for i, params in enumerate(self.bit16_groups):
        layout = _layout(self, i)
        have = [(v, p.grad) for v, p in zip(layout.views, params) if p.grad is not None]
        missing = [v for v, p in zip(layout.views, params) if p.grad is None]
        if have:
            torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
        if missing:  # a parameter the forward did not use: DeepSpeed reduces zeros for it
            torch._foreach_zero_(missing)
        _reduce(self, layout, self.real_dp_process_group[i])
        self.averaged_gradients[i] = layout.handed
    self._release_ipg_buffers()
    self._clear_param_grad_only()
    self._epilogue_ran_this_backward = True


def _setup_buckets_unless_flat(self):
    """DeepSpeed's ``setup_buckets`` (run at the first gradient hook of each backward), without
    allocating the reduction bucket the flat reduction never uses. It runs at every hook, so
    it does nothing else."""
    if not self.ready_for_gradients:
        self.micro_step_id += 1
        self.ready_for_gradients = True


def flat_zero1_reduction(optimizer) -> bool:
    """Install the flat reduction on a DeepSpeed ZeRO-1 optimizer instance (DeepSpeed's class
    is untouched). Returns whether it applies to this instance's configuration; where it does
    not, nothing is installed."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer or not all(
            hasattr(optimizer, name) for name in ("reduce_gradients", "setup_buckets", "bit16_groups_flat",
                                                  "parallel_partitioned_bit16_groups", "_clear_param_grad_only")):
        return False
    if not applies(optimizer):
        return False
    optimizer.reduce_gradients = types.MethodType(_reduce_gradients_flat, optimizer)
    optimizer.setup_buckets = types.MethodType(_setup_buckets_unless_flat, optimizer)
    return True
