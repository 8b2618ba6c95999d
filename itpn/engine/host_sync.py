"""Host-device synchronisation in the training step (issue #6: no per-step ``.item()``).

A read of a device tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``,
a data-dependent shape such as ``nonzero``) makes the CPU wait until the GPU has drained its
queue; the next step's kernels are then launched into an idle GPU. Our loop reads values
only at log and checkpoint steps; this module holds

* :class:`HostSyncWatch`, a ``TorchFunctionMode`` that records every such read with its
  call stack. It sees the operations themselves, so it works on the CPU as well (the CUDA
  sync debug mode needs a GPU): the tests run the real trainer, DeepSpeed included, under it.
* :func:`sync_free_clipping`, which removes the one read DeepSpeed's ZeRO-1/2 optimizer makes
  per step when it clips gradients, and :func:`sync_free_norm_masking`, which removes the
  host-to-device copy its gradient-norm code makes per parameter group.
* :func:`foreach_grad_norm`, which computes that optimizer's gradient norm with one
  multi-tensor norm instead of a Python loop over the parameters, and
  :func:`keep_bit16_views`, which skips its re-pointing of every parameter at the flat buffer
  after each step when nothing moved (host time, not syncs).
"""

from __future__ import annotations

import sys
import traceback
import types

import torch
from torch.overrides import TorchFunctionMode

#: Operations that read a tensor's value (or a data-dependent size) on the host.
SYNC_OPS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.is_nonzero, torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.masked_select,
    torch.Tensor.masked_select, torch.unique, torch.Tensor.unique, torch.unique_consecutive,
}


def _bool_index(args) -> bool:
    """``t[mask]`` with a boolean mask: the result's size depends on the mask's values."""
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def call_site(stack: list, frames: int = 4) -> str:
    """The innermost ``frames`` of a stack, innermost first: "file.py:12 fn <- ..."."""
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(stack[-frames:]))


def _host_data_device(func, args, kwargs) -> str | None:
    """``torch.tensor(0.5, device=d)``: Python data copied to device ``d``. From pageable
    memory, CUDA's copy waits for the stream (the sync debug mode flags it), so the step
    makes none; on the CPU an explicit ``device=`` marks the same call. Returns d's type."""
    if func not in (torch.tensor, torch.as_tensor) or kwargs.get("device") is None:
        return None
    if args and isinstance(args[0], torch.Tensor):
        return None
    return torch.device(kwargs["device"]).type


class HostSyncWatch(TorchFunctionMode):
    """Records host reads of tensor values while active: ``calls`` is a list of
    (operation name, stack as a list of ``FrameSummary``, the tensor's device type). Only
    reads of device tensors synchronise on a GPU; on the CPU every read is recorded, as the
    stand-in for what would be a device tensor there.

    ``ignore``: function names; a call with any of them on its stack is not recorded (the
    places where reading values is intended, e.g. the logging of the training loop).
    Operations inside a compiled region are not seen (they are not Python calls there).
    """

    def __init__(self, ignore: tuple[str, ...] = ()):
        super().__init__()
        self.ignore = set(ignore)
        self.calls: list[tuple[str, list, str]] = []

    def __enter__(self):
        # DeepSpeed synchronises the whole device through its accelerator (its throughput
        # timer; with overlap_comm, before every gradient bucket on CUDA): no tensor is read,
        # so the mode alone would not see it. Recorded as "accelerator.synchronize", device
        # "accelerator". (On the CPU accelerator the overlap_comm syncs are skipped: it
        # "resolves data dependencies"; the GPU's sync debug mode sees those.)
        self._accelerator = None
        if "deepspeed.accelerator" in sys.modules:
            from deepspeed.accelerator import get_accelerator
            acc, real = get_accelerator(), get_accelerator().synchronize

            def synchronize(*args, **kwargs):
                self._record("accelerator.synchronize", "accelerator")
                return real(*args, **kwargs)
            acc.synchronize = synchronize
            self._accelerator = acc
        return super().__enter__()

    def __exit__(self, *exc):
        if self._accelerator is not None:
            del self._accelerator.synchronize  # the class's method again
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        copied_to = _host_data_device(func, args, kwargs)
        if copied_to is not None:
            self._record(f"{func.__name__}(host data, device=...)", copied_to)
        elif func in SYNC_OPS or (func is torch.Tensor.__getitem__ and _bool_index(args)):
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self._record(getattr(func, "__name__", str(func)), tensor.device.type if tensor is not None else "cpu")
        return func(*args, **kwargs)

    def _record(self, name: str, where: str) -> None:
        """One call, with the stack of its caller, unless an ignored function is on it."""
        stack = traceback.extract_stack()[:-2]
        if not any(f.name in self.ignore for f in stack):
            self.calls.append((name, stack, where))

    def report(self, frames: int = 4) -> str:
        """One line per distinct call site, most frequent first."""
        counts: dict[str, int] = {}
        for name, stack, _ in self.calls:
            key = f"{name} at {call_site(stack, frames)}"
            counts[key] = counts.get(key, 0) + 1
        return "\n".join(f"{n:5d} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _clip_on_device(self, grad_groups_flat, total_norm):
    """DeepSpeed ZeRO-1/2's ``unscale_and_clip_grads`` with the same arithmetic, but the
    check for an invalid norm (inf, NaN or DeepSpeed's -1 sentinel) is a device-side select
    instead of a Python ``if`` on the tensor. As in DeepSpeed, an invalid norm scales the
    gradients by 1/inf, so non-finite gradients stay non-finite and the loop's finite-loss
    check stops the run."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        norm = torch.as_tensor(total_norm, dtype=torch.float, device=self.device)
        valid = torch.isfinite(norm) & (norm >= 0)
        clip_norm = torch.where(valid, norm, torch.full_like(norm, float("inf")))
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def sync_free_clipping(optimizer) -> bool:
    """Install :func:`_clip_on_device` on a DeepSpeed ZeRO-1/2 optimizer instance (only on
    that instance; DeepSpeed's class is untouched). Returns whether it applied: other
    optimizers (ZeRO-3, whose step checks the norm on the host anyway; no ZeRO) are left as
    they are. ``tests/integration/test_host_sync.py`` checks both the arithmetic (same
    trajectory as torch's AdamW + ``clip_grad_norm_``) and that the step then reads nothing."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer or not hasattr(optimizer, "unscale_and_clip_grads"):
        return False
    optimizer.unscale_and_clip_grads = types.MethodType(_clip_on_device, optimizer)
    return True


def _grad_norm_foreach(self, gradients, params, norm_type=2):
    """DeepSpeed ZeRO-1/2's ``get_grad_norm_direct`` (0.19.8) for the L2 norm, with the same
    gradients counted and the same result up to summation order, but one ``_foreach_norm``
    over them in place of a Python loop that casts each gradient to fp64 and takes its norm.

    That loop issued three operations per parameter (730 parameters in iTPN-L: 5,902
    operations per optimizer step with it, 2,986 without, ``benchmarks/count_step_ops.py``).
    Timed alone on the CPU for the tiny recipe's 176 parameters: 2,757 us per step with it,
    1,570 with ours (``count_step_ops.py --time-loops``). On a GPU the host time matters because the GPU has nothing else
    queued then: the H200's ZeRO-1 optimizer step took 45 ms against the plain step's 13 ms
    (docs/performance.md).
    Per-gradient norms accumulate in fp32 (DeepSpeed: in fp64, from an fp64 copy of each
    gradient); their squares are summed in fp64 as DeepSpeed does. The infinity norm, pipeline-
    replicated parameters and model parallelism other than rank 0's share go to DeepSpeed's."""
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.utils import get_norm_dtype

    original = type(self).get_grad_norm_direct
    if float(norm_type) != 2.0 or any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return original(self, gradients, params, norm_type)
    grads = [g for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)
             if self.model_parallel_rank == 0 or is_model_parallel_parameter(p)]
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total_norm = torch.stack(norms).to(get_norm_dtype()).square().sum().float()
    else:
        total_norm = torch.zeros((), dtype=torch.float32, device=self.device)
    ds_dist.all_reduce(total_norm, op=ds_dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=ds_dist.ReduceOp.SUM)
    total_norm = total_norm.sqrt()
    _mask_invalid_norm(total_norm)
    return total_norm


def foreach_grad_norm(optimizer) -> bool:
    """Install :func:`_grad_norm_foreach` on a DeepSpeed ZeRO-1/2 optimizer instance (only on
    that instance). Returns whether it applied. ``tests/unit/test_bench.py`` compares it with
    DeepSpeed's own on one engine's gradients; ``tests/integration/test_host_sync.py`` checks the
    norm against torch's ``clip_grad_norm_`` on 2 ranks."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer or not hasattr(optimizer, "get_grad_norm_direct"):
        return False
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_foreach, optimizer)
    return True


def _update_bit16_views_if_moved(self, group_index):
    """DeepSpeed ZeRO-1/2's ``_update_model_bit16_weights`` (0.19.8), which it calls after
    every step ("TODO: we probably don't need this? just to be safe"): it points each bf16
    parameter at its slice of the group's flat buffer again, a narrow, a view and two ``.data``
    assignments per parameter (4 of the 6 host operations per parameter left in the
    optimizer step). Here it runs only when the flat buffer or a parameter's storage moved
    since it last ran (its first call, DeepSpeed's offload and reload of states, anything that
    replaced a parameter's ``.data``); otherwise every view already is what it would make."""
    flat, params = self.bit16_groups_flat[group_index], self.bit16_groups[group_index]
    where = (flat.data_ptr(), *(p.data_ptr() for p in params))
    seen = self.__dict__.setdefault("_itpn_bit16_views", {})
    if seen.get(group_index) == where:
        return
    type(self)._update_model_bit16_weights(self, group_index)
    seen[group_index] = (flat.data_ptr(), *(p.data_ptr() for p in params))


def keep_bit16_views(optimizer) -> bool:
    """Install :func:`_update_bit16_views_if_moved` on a DeepSpeed ZeRO-1/2 optimizer instance.
    Returns whether it applied. The weights after each step are DeepSpeed's: the step tests
    against torch's AdamW (``tests/integration/test_host_sync.py``) and against one process
    (``test_deepspeed.py``) run with it; ``tests/unit/test_bench.py`` checks that the
    operations are gone."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer or not hasattr(optimizer, "_update_model_bit16_weights"):
        return False
    optimizer._update_model_bit16_weights = types.MethodType(_update_bit16_views_if_moved, optimizer)
    return True


def _mask_invalid_norm(input, device=None, val=-1.0):
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` (0.19.8: a NaN or inf gradient norm
    becomes the -1 sentinel, whatever ``val`` says) without its ``torch.tensor(-1.0,
    device=...)``: a Python scalar fill needs no host-to-device copy, which on CUDA waits
    for the stream (one per parameter group and step under ZeRO-1/2)."""
    input.masked_fill_(input.isnan().logical_or(input.isinf()), -1.0)


def sync_free_norm_masking() -> None:
    """Use :func:`_mask_invalid_norm` in DeepSpeed's gradient-norm code (ZeRO-1/2, ZeRO-3 and
    the unpartitioned ``get_global_norm`` path); the same values, no copy. Idempotent."""
    import deepspeed.runtime.utils as ds_utils
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage12

    if ds_utils.mask_nan_or_inf_with_val_inplace is not _mask_invalid_norm:
        _mask_invalid_norm.replaces = ds_utils.mask_nan_or_inf_with_val_inplace  # for the test
    for module in (ds_utils, stage12, stage3):
        if hasattr(module, "mask_nan_or_inf_with_val_inplace"):
            module.mask_nan_or_inf_with_val_inplace = _mask_invalid_norm


def foreach_clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch's ``clip_grad_norm_(params, max_norm, foreach=True)`` (2.11-2.14), the same
    operations on the same values, without the ``norm.to(device)`` it issues for every
    parameter's norm before stacking them (731 no-op dispatches per step for iTPN-L, all of
    the plain optimizer step's per-parameter host work but the optimizer's own). Gradients on
    one device, grouped by dtype as torch groups them; returns the total norm (a device
    tensor, never read here)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    if any(g.device != device for g in grads):
        raise ValueError(f"foreach_clip_grad_norm_: gradients on {sorted({str(g.device) for g in grads})}; "
                         "one device expected")
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [n for group in by_dtype.values() for n in torch._foreach_norm(group, 2.0)]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in by_dtype.values():
        torch._foreach_mul_(group, coef)
    return total


def sync_free_fp32_clip(engine) -> bool:
    """An engine without ZeRO and without DeepSpeed's bf16/fp16 optimizers (``zero0`` with
    ``bf16_autocast`` or ``fp32``) clips with DeepSpeed's ``clip_grad_norm_``, which copies two
    Python scalars to the device and scales the gradients one by one. In its place, on this
    instance: torch's ``clip_grad_norm_`` as :func:`foreach_clip_grad_norm_` (foreach, no host
    read; the same coefficient ``min(1, max_norm / (norm + 1e-6))``), whose norm is kept as the engine's global gradient
    norm for the loop's finiteness check and its log (DeepSpeed leaves it None there).
    Model parallelism, which DeepSpeed's version accounts for, is not used here. Returns
    whether it applied."""
    if (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()
            or engine.gradient_clipping() <= 0.0):
        return False

    def clip():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        engine._global_grad_norm = foreach_clip_grad_norm_(params, engine.gradient_clipping())
        return engine._global_grad_norm
    engine.clip_fp32_gradients = clip
    return True
