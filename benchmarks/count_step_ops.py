"""How many ATen operations one training step issues from Python (each one at least a kernel
launch on a GPU), and how long the host takes to issue them, split into the student's
forward + backward and the optimizer step, for the benchmark's plain step and the same step
inside DeepSpeed (issue #6: the H200 profile of 2026-12-04 found 3,422 copy / cast / fill
kernels per ZeRO-1 step against 911 in the plain step, and its optimizer step took 45 ms
against 13). Runs anywhere (CPU by default); counts top-level operations (those no other ATen
operation called; the optimizer's own update, torch's fused AdamW in every engine, runs under
its ``Optimizer.step`` annotation and is not counted), after two warm-up steps, with the
``fused`` setting of itpn-bench. The times are medians over ``--steps`` steps on one thread;
on a CPU they include the arithmetic as well as the host's per-operation cost and vary by 1-3
ms between runs, so ``--time-loops`` times the per-parameter loops we replace alone.

    python benchmarks/count_step_ops.py --recipe tiny --batch 4
    python benchmarks/count_step_ops.py --recipe tiny --batch 4 --deepspeed-loops   # DeepSpeed's own loops
    python benchmarks/count_step_ops.py --recipe tiny --batch 4 --steps 0 --time-loops 200   # those loops alone
"""

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from itpn.cli import bench
from itpn.engine.runner import deepspeed_own_methods
from itpn.layers import attention_impl

#: (label, ZeRO fragment or None for the plain step, precision fragment or None for the setting's)
ENGINES = (("plain (torch fused AdamW, autocast)", None, None), ("DeepSpeed zero1 + bf16", "zero1", None),
           ("DeepSpeed zero0 + bf16_autocast", "zero0", "bf16_autocast"),
           ("DeepSpeed zero1 + bf16_autocast", "zero1", "bf16_autocast"))


def top_level_ops(prof) -> collections.Counter:
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def host_ms(step, steps: int) -> tuple[float, float]:
    """Median milliseconds of the student's forward + backward and of the optimizer step."""
    fwd_bwd, opt = [], []
    for _ in range(steps):
        targets = step.teacher_fwd()
        t0 = time.perf_counter()
        step.student_fwd_bwd(targets)
        t1 = time.perf_counter()
        step.optimizer_step()
        fwd_bwd.append(t1 - t0)
        opt.append(time.perf_counter() - t1)
    return 1e3 * statistics.median(fwd_bwd), 1e3 * statistics.median(opt)


def _us_per_call(fn, n: int) -> float:
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return 1e6 * statistics.median(rounds)


def time_loops(step, optimizer, n: int) -> str:
    """The per-parameter loops foreach_grad_norm, keep_bit16_views and (ZeRO-1)
    flat_zero1_reduction replace, timed alone on the gradients of one backward: ours (the
    instance's methods) against DeepSpeed's (its class's), in microseconds per call over every
    parameter group. The reduction consumes the gradients, so each call gets fresh copies
    first; the time of making them alone is subtracted."""
    step.student_fwd_bwd(step.teacher_fwd())
    groups = range(len(optimizer.bit16_groups))
    cls, row = type(optimizer), {}
    for name, ours, theirs in (
            ("gradient norm", optimizer.scaled_global_norm,
             lambda: cls.scaled_global_norm(_Theirs(optimizer, "get_grad_norm_direct"))),
            ("bf16 re-pointing", lambda: [optimizer._update_model_bit16_weights(i) for i in groups],
             lambda: [cls._update_model_bit16_weights(optimizer, i) for i in groups])):
        row[name] = f"DeepSpeed {_us_per_call(theirs, n):.0f} us -> ours {_us_per_call(ours, n):.0f} us"
    if "reduce_gradients" in optimizer.__dict__:  # flat_zero1_reduction installed
        params = [p for group in optimizer.bit16_groups for p in group]
        saved = [torch.ones_like(p) for p in params]  # the values do not change the work

        def fresh_grads():  # each reduction consumes .grad (DeepSpeed's also re-points it at its bucket)
            for p, g in zip(params, saved):
                p.grad = g.clone()

        def reduction(setup, reduce):
            fresh_grads()
            setup()
            reduce()
        base = _us_per_call(fresh_grads, n)
        theirs = _us_per_call(lambda: reduction(lambda: cls.setup_buckets(optimizer),
                                                lambda: cls.reduce_gradients(optimizer)), n) - base
        ours = _us_per_call(lambda: reduction(optimizer.setup_buckets, optimizer.reduce_gradients), n) - base
        row["ZeRO-1 gradient reduction"] = f"DeepSpeed {theirs:.0f} us -> ours {ours:.0f} us"
        fresh_grads()
        optimizer.reduce_gradients()
    step.optimizer_step()
    return ", ".join(f"{k}: {v}" for k, v in row.items())


class _Theirs:
    """The optimizer with DeepSpeed's class method in place of one of ours."""

    def __init__(self, optimizer, name):
        self._optimizer, self._name = optimizer, name

    def __getattr__(self, attr):
        if attr == self._name:
            return getattr(type(self._optimizer), attr).__get__(self._optimizer)
        return getattr(self._optimizer, attr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per engine (0: count only)")
    p.add_argument("--deepspeed-loops", action="store_true",
                   help="ZeRO-1/2 with DeepSpeed's own methods in place of those the engine installs (the clip, "
                        "the gradient norm, the bf16 views, the ZeRO-1 reduction: runner.deepspeed_own_methods)")
    p.add_argument("--time-loops", type=int, default=0, metavar="N",
                   help="ZeRO-1/2: also time the gradient norm, the bf16 re-pointing and (ZeRO-1 with the flat "
                        "reduction installed) the gradient reduction alone, DeepSpeed's against ours, N calls each "
                        "(microseconds per call, median of 5 rounds)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg, device = bench.load_recipe(args.recipe), torch.device(args.device)
    fixed = bench.make_batch(cfg, args.batch, device)
    setting = bench.LADDER["fused"]
    print(f"{'step':40s} {'fwd+bwd ops':>11s} {'optimizer ops':>13s} {'fwd+bwd ms':>10s} {'optimizer ms':>12s}"
          "  most frequent in the optimizer step")
    for label, zero, precision in ENGINES:
        with attention_impl(setting["attn"]):
            step = bench.TrainStep(cfg, setting, args.batch, device, iter(lambda: fixed, None), 0, zero, precision)
            optimizer = getattr(step.engine, "optimizer", None)
            if args.deepspeed_loops:
                deepspeed_own_methods(optimizer)
            for _ in range(2):
                step()
            targets = step.teacher_fwd()
            with profile(activities=[ProfilerActivity.CPU]) as fwd_bwd:
                step.student_fwd_bwd(targets)
            with profile(activities=[ProfilerActivity.CPU]) as opt:
                step.optimizer_step()
            times = host_ms(step, args.steps) if args.steps else (float("nan"), float("nan"))
            if args.time_loops and "get_grad_norm_direct" in getattr(optimizer, "__dict__", {}):
                print(f"  {label}: {time_loops(step, optimizer, args.time_loops)}", flush=True)
        a, b = top_level_ops(fwd_bwd), top_level_ops(opt)
        common = ", ".join(f"{name} {n}" for name, n in b.most_common(3))
        print(f"{label:40s} {sum(a.values()):11d} {sum(b.values()):13d} {times[0]:10.2f} {times[1]:12.2f}  {common}",
              flush=True)
        del step


if __name__ == "__main__":
    main()
