"""``itpn-bench``: throughput, MFU and memory of the pre-training step (issue #6).

Times the full training step (teacher forward, student forward + backward, optimizer) on
synthetic batches already on the device, for a recipe and batch size, under a ladder of
settings so that every speed-up is a ratio measured in the same run:

    naive    eager attention with an explicit fp32 softmax, fp16 autocast + GradScaler,
             unfused AdamW, no compilation (our code at the reference's settings)
    sdpa     + attention through SDPA (relative bias as an 8-aligned additive mask)
    bf16     + bf16 autocast, no grad scaler, teacher weights in bf16
    fused    + fused AdamW
    compile  + torch.compile of every block (regional compilation)
    fold     + layer scale folded into each branch's output Linear (scale W and b, not the
             branch output: a cheaper gamma gradient, one saved activation less per branch);
             the settings below include it
    compile_model  torch.compile of the whole objective and the teacher instead of the
             blocks; not in the default ladder
    compile_autotune  compiled blocks with mode="max-autotune-no-cudagraphs" (Triton GEMM
             templates with fused epilogues, autotuned; minutes of compilation); not default
    flex     + attention through FlexAttention (the (1, H, N, N) fp32 bias read in the
             kernel's score modifier, its gradient accumulated in the kernel); not default
    triton   + attention through our Triton kernel (bias_attention.py: q, k, v read inside
             qkv, their gradients written in its layout, the bias gradient summed over the
             batch without atomics); not default until measured on a GPU
    mlp      triton + the MLPs fused into Triton GEMM epilogues (fused_mlp.py: GELU, and fc1's
             bias gradient); not default until measured on a GPU
    mlp_model  mlp with the whole objective and the teacher compiled instead of the blocks
             (the roofline's --whole counts what that fusion scope saves); not default
    branch, mlp_branch  fold, mlp with each transformer block compiled as two regions, one
             per residual branch (Block.compile; the roofline's --regions branch); not default
    flex_autotune  flex with both FlexAttention kernels (forward and backward block sizes)
             and the GEMMs autotuned (max-autotune-no-cudagraphs); not default
    teacher  fold + the CLIP teacher's residual blocks compiled too (LayerNorms, residual adds
             and QuickGELU fused; the trainer's teacher.compile); not default until measured
    fp8      fold + FP8 matmuls (tensorwise scales) in the transformer blocks' linears;
             other numerics, hence not in the default ladder; MFU still against bf16 peak

It reports img/s, achieved TFLOP/s, MFU against a bf16 matmul peak measured in the same
run, peak memory, and the split between teacher, student forward/backward and optimizer.
``--data SHARDS`` adds, for each setting, the same step fed by the real loader (the
recipe's augmentation and masking, worker processes, pinned non-blocking copies, uint8
batches normalised on the device) and the loader's own rate without a model, so the cost
of input is a ratio measured in the same run.
``--infer`` times classifier inference at 224 px (the paper's throughput table) for iTPN
and a plain timm ViT of the same size.

FLOPs per image: the student's forward + backward is counted with torch's FlopCounterMode on
the meta device (naive attention, so attention's matmuls are counted); the teacher's forward
is counted the same way when it can be built on the meta device, else analytically.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

from ..layers import attention_impl
from ..layers.block import dynamo_counts, set_activation_memory_budget
from ..engine.build import (apply_block_options, backbone_config, build_objective, build_teacher, compile_whole,
                            pretrain_loader)
from ..engine.config import DTYPES, PRECISION_FRAGMENTS, load_config
from ..engine.host_sync import foreach_clip_grad_norm_
from ..models.flops import count_train_flops, vit_forward_flops


#: Benchmark names -> (recipe in configs/, overrides). The student, teacher and masking are
#: built by the engine's own builders from the recipe, so the benchmark times what trains.
RECIPES = {
    "clip_l": ("clip_l14_224_300e", []),
    "clip_l256": ("clip_l14_256_300e", []),
    "clip_b": ("clip_b16_300e", []),
    # Pixel MIM alone, the workload the reference numbers measure (EMA-MFM terms off).
    "pixel_l": ("pixel_l16_400e", ["objective.mfm_weight=0.0", "model.drop_path_rate=0.1"]),
    "pixel_b": ("pixel_b16_400e", ["objective.mfm_weight=0.0", "model.drop_path_rate=0.1"]),
    # CPU-sized, for the tests of this script.
    "tiny": ("demo", []),
}


def load_recipe(name: str) -> dict:
    """The recipe with a randomly initialised teacher (speed only) that has the activation the
    recipe's weights would give it: OpenAI's tags mean QuickGELU, which open_clip runs as
    three eager kernels where GELU is one (docs/clip_teacher.md, "Compiled teacher")."""
    recipe, overrides = RECIPES[name]
    cfg = load_config(recipe, overrides)
    t = cfg["teacher"]
    if cfg["objective"]["kind"] == "clip" and t["weights"]:
        from ..objectives.clip_teacher import quick_gelu_arch, tag_quick_gelu
        if tag_quick_gelu(t["arch"], str(t["weights"])):
            overrides = [*overrides, f"teacher.arch={quick_gelu_arch(t['arch'])}"]
    return load_config(recipe, [*overrides, "teacher.weights=null"])


LADDER = {
    "naive": dict(attn="naive", dtype="fp16", fused=False, compile=False, fold=False),
    "sdpa": dict(attn="sdpa", dtype="fp16", fused=False, compile=False, fold=False),
    "bf16": dict(attn="sdpa", dtype="bf16", fused=False, compile=False, fold=False),
    "fused": dict(attn="sdpa", dtype="bf16", fused=True, compile=False, fold=False),
    "compile": dict(attn="sdpa", dtype="bf16", fused=True, compile="blocks", fold=False),
    "fold": dict(attn="sdpa", dtype="bf16", fused=True, compile="blocks", fold=True),
    # FP8 matmuls in the transformer blocks' linears: changes the numerics (opt-in in the
    # trainer, deepspeed.fp8), hence not in the default ladder. MFU stays against bf16 peak.
    "fp8": dict(attn="sdpa", dtype="bf16", fused=True, compile="blocks", fold=True, fp8=True),
    "flex": dict(attn="flex", dtype="bf16", fused=True, compile="blocks", fold=True),
    "triton": dict(attn="triton", dtype="bf16", fused=True, compile="blocks", fold=True),
    # ... and GELU + fc1's bias gradient in the MLP GEMMs' epilogues (fused_mlp.py).
    "mlp": dict(attn="triton", dtype="bf16", fused=True, compile="blocks", fold=True, mlp=True),
    "flex_autotune": dict(attn="flex", dtype="bf16", fused=True, compile="blocks", fold=True,
                          compile_options={"mode": "max-autotune-no-cudagraphs"}),
    "compile_model": dict(attn="sdpa", dtype="bf16", fused=True, compile="model", fold=True),
    "mlp_model": dict(attn="triton", dtype="bf16", fused=True, compile="model", fold=True, mlp=True),
    "branch": dict(attn="sdpa", dtype="bf16", fused=True, compile="blocks", fold=True, regions="branch"),
    "mlp_branch": dict(attn="triton", dtype="bf16", fused=True, compile="blocks", fold=True, mlp=True,
                       regions="branch"),
    "compile_autotune": dict(attn="sdpa", dtype="bf16", fused=True, compile="blocks", fold=True,
                             compile_options={"mode": "max-autotune-no-cudagraphs"}),
    # fold + the teacher's residual blocks compiled too (CLIPTeacher.compile_blocks; the
    # trainer's teacher.compile)
    "teacher": dict(attn="sdpa", dtype="bf16", fused=True, compile="blocks", fold=True, teacher_compile=True),
}
DEFAULT_LADDER = ("naive", "sdpa", "bf16", "fused", "compile", "fold")


def make_batch(cfg: dict, batch: int, device):
    bcfg = backbone_config(cfg)
    n = bcfg.grid ** 2
    x = torch.randn(batch, 3, bcfg.img_size, bcfg.img_size, device=device)
    pixel = cfg["objective"]["kind"] == "pixel"
    masked = n - int(n * (1 - cfg["data"]["mask_ratio"])) if pixel else int(round(75 / 196 * n))
    order = torch.rand(batch, n, device=device).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :masked], True)
    tview = None
    if not pixel:
        size = cfg["teacher"]["image_size"]
        tview = torch.randn(batch, 3, size, size, device=device)
    return x, mask, tview


def count_student_flops(cfg: dict, teacher_dim: int, batch: int = 2) -> float:
    """Forward + backward FLOPs per image of the student (meta device, naive attention)."""
    def inputs():
        x, mask, _ = make_batch(cfg, batch, "meta")
        if cfg["objective"]["kind"] == "pixel":
            return dict(x=x, mask=mask)
        return dict(x=x, mask=mask, targets=torch.randn(batch, mask.shape[1], teacher_dim))
    cfg = {**cfg, "objective": {**cfg["objective"], "teacher_dim": teacher_dim}}
    return count_train_flops(lambda: build_objective(cfg), inputs, batch)


def teacher_flops(teacher) -> float:
    if teacher is None:
        return 0.0
    return vit_forward_flops(teacher.width, teacher.layers, teacher.patch_size, teacher.image_size,
                             teacher.embed_dim)


def measure_peak_tflops(device, size: int = 8192, iters: int = 20) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


class Timer:
    """Device-event timer on CUDA, wall clock (after a sync) elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0
        return False


def loader_batches(loader, device):
    """(x, mask, teacher view) from the real loader, forever (epoch after epoch)."""
    while True:
        for raw in loader:
            b = loader.to_device(raw, device)
            yield b["image"], b["mask"], b.get("teacher_image")


def build_bench_loader(cfg: dict, data: str, batch: int, workers: int, device):
    """The trainer's pre-training loader for one rank, on ``data`` at ``batch``."""
    cfg = {**cfg, "data": {**cfg["data"], "train": data, "batch_size": batch, "num_workers": workers}}
    return pretrain_loader(cfg, 0, 1, device)


def time_loader(loader, device, steps: int, warmup: int) -> float:
    """Images/s of the loader alone (decode, augment, copy, normalise on the device)."""
    it = loader_batches(loader, device)
    for _ in range(warmup):
        next(it)
    with Timer(device) as t:
        n = sum(next(it)[0].shape[0] for _ in range(steps))
    return n / t.seconds


class TrainStep:
    """One training step of a recipe under one setting, in three separately timed parts.

    Plain mode: the objective with a torch AdamW, autocast and (fp16) a GradScaler.
    ``zero=FRAGMENT``: the same objective inside a DeepSpeed engine built by the trainer's
    own code, with the recipe's DeepSpeed config whose ZeRO fragment is replaced by
    ``FRAGMENT`` (e.g. ``zero3_offload``: parameters and optimizer state on the host, CPU AdamW)
    and whose precision fragment is the setting's dtype or ``ds_precision`` (``bf16_autocast``).
    """

    def __init__(self, cfg: dict, setting: dict, batch: int, device, batches, ckpt_every: int = 0,
                 zero: str | None = None, ds_precision: str | None = None, deepspeed_loops: bool = False):
        self.dtype = DTYPES[setting["dtype"]]
        cfg = {**cfg, "teacher": {**cfg["teacher"], "compile": bool(setting.get("teacher_compile"))}}
        self.teacher = build_teacher(cfg, self.dtype, device)
        model = build_objective(cfg, self.teacher)
        apply_block_options(model, ckpt_every, ckpt_every > 0, setting["compile"] == "blocks",
                            setting.get("compile_options"), setting["fold"], setting.get("fp8", False),
                            setting.get("mlp", False), setting.get("regions", "block"))
        if setting["compile"] == "model":
            compile_whole(model, self.teacher)
        self.pixel = cfg["objective"]["kind"] == "pixel"
        self.autocast = torch.autocast(device.type, dtype=self.dtype, enabled=setting["dtype"] != "fp32")
        self.batches, self.current = batches, {}
        self.engine = None
        if zero:
            self.engine = deepspeed_engine(cfg, model, zero, ds_precision or setting["dtype"], setting["fused"], batch,
                                           device)
            if deepspeed_loops:  # the baseline: DeepSpeed's own per-parameter loops and reduction
                from ..engine.runner import deepspeed_own_methods
                deepspeed_own_methods(self.engine.optimizer)
            return
        self.model = model.to(device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused rows: torch's clip without its per-parameter norm.to(device) (host_sync.py)
        self.clip = foreach_clip_grad_norm_ if setting["fused"] else torch.nn.utils.clip_grad_norm_
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05,
                                     fused=setting["fused"] or None, foreach=False if not setting["fused"] else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=setting["dtype"] == "fp16")

    def teacher_fwd(self):
        self.current["x"], self.current["mask"], tview = next(self.batches)
        if self.teacher is None:
            return None
        with torch.no_grad(), self.autocast:
            return self.teacher(tview)

    def student_fwd_bwd(self, targets):
        x, mask = self.current["x"], self.current["mask"]
        kwargs = {} if self.pixel else {"targets": targets}
        if self.engine is not None:  # DeepSpeed holds the weights in the training dtype
            out = self.engine(x.to(self.dtype), mask, **kwargs)
            self.engine.backward(out["loss"])
            return
        with self.autocast:
            out = self.model(x, mask, **kwargs)
        self.scaler.scale(out["loss"]).backward()

    def optimizer_step(self):
        if self.engine is not None:  # clipping, master weights, (offloaded) AdamW
            self.engine.step()
            return
        self.scaler.unscale_(self.opt)
        self.clip(self.params, 3.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self):
        self.student_fwd_bwd(self.teacher_fwd())
        self.optimizer_step()


def deepspeed_engine(cfg: dict, model, zero: str, dtype: str, fused: bool, batch: int, device):
    from ..engine.config import deepspeed_config
    from ..engine.param_groups import param_groups
    from ..engine.runner import _engine, _optimizer, init_distributed
    _, world, _, _ = init_distributed()
    fragments = [f for f in cfg["deepspeed"]["fragments"] if not f.startswith("zero") and f not in PRECISION_FRAGMENTS]
    cfg = {**cfg, "deepspeed": {**cfg["deepspeed"], "fragments": [zero, dtype, *fragments], "grad_accum": 1},
           "data": {**cfg["data"], "batch_size": batch}, "optim": {**cfg["optim"], "total_batch": None, "fused": fused}}
    ds_cfg = deepspeed_config(cfg, world)
    opt = _optimizer(param_groups(model, cfg["optim"]["weight_decay"]), cfg, device, ds_cfg)
    for g in opt.param_groups:
        g["lr"] = 1e-4
    return _engine(model, cfg, ds_cfg, opt)


def run_setting(cfg: dict, name: str, setting: dict, batch: int, steps: int, warmup: int, device,
                split: bool = True, profile: str | None = None, ckpt_every: int = 0, loader=None,
                zero: str | None = None, check_syncs: bool = False, ds_precision: str | None = None,
                deepspeed_loops: bool = False) -> dict:
    torch._dynamo.reset()  # fresh graphs: a second batch size would otherwise recompile with dynamic shapes
    counters.clear()  # dynamo's counts, for this setting's row
    if loader is None:
        fixed = make_batch(cfg, batch, device)
        batches = iter(lambda: fixed, None)
    else:
        batches = loader_batches(loader, device)
    with attention_impl(setting["attn"]):
        step = TrainStep(cfg, setting, batch, device, batches, ckpt_every, zero, ds_precision, deepspeed_loops)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        with Timer(device) as t:
            for _ in range(steps):
                step()
        result = dict(setting=name, batch=batch, step_ms=t.seconds / steps * 1e3,
                      img_s=batch * steps / t.seconds)
        if step.engine is not None:
            e = step.engine
            param_offload = e.zero_offload_param()
            result.update(zero_stage=e.zero_optimization_stage(), optimizer=type(e.basic_optimizer).__name__,
                          offload_optimizer=e.zero_cpu_offload(),
                          offload_param=param_offload is not None and str(param_offload.device).endswith("cpu"))
        if split:
            times = {"teacher": 0.0, "student": 0.0, "optimizer": 0.0}
            for _ in range(max(steps // 2, 1)):
                with Timer(device) as t1:
                    targets = step.teacher_fwd()
                with Timer(device) as t2:
                    step.student_fwd_bwd(targets)
                with Timer(device) as t3:
                    step.optimizer_step()
                times["teacher"] += t1.seconds
                times["student"] += t2.seconds
                times["optimizer"] += t3.seconds
            total = sum(times.values())
            result.update({f"{k}_pct": 100 * v / total for k, v in times.items()})
            # Each phase starts on an idle device (the timer synchronises), so its host-side
            # launch work is exposed; the unsplit step overlaps it. split_ms - step_ms says how much.
            result["split_ms"] = total / max(steps // 2, 1) * 1e3
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if check_syncs:
            result.update(count_host_syncs(step, device))
        if profile:
            result["profile"] = write_profile(step, device, profile)
    result["teacher_gflop"] = teacher_flops(step.teacher) / 1e9
    result.update(dynamo_counts())  # what dynamo made of the compiled regions
    if hasattr(batches, "close"):  # a loader generator: closing it stops the workers
        batches.close()
    del step, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def count_host_syncs(step, device) -> dict:
    """Host-device synchronisations in one step: "host_reads", the reads of tensor values
    that HostSyncWatch sees from Python (any device), "accelerator_syncs", DeepSpeed's
    device synchronisations (any device), and on CUDA "cuda_syncs", every synchronising
    CUDA call that the sync debug mode reports (from C++ too); "sync_report" says where,
    with the Python stack of each. The step is run twice under the watch and the second is
    counted: dynamo recompiles compiled blocks for the mode on the stack, and compiling
    synchronises (seen on the H200: inductor's joint-graph pass, in the first watched step)."""
    import warnings

    from ..engine.host_sync import HostSyncWatch, call_site
    cuda = device.type == "cuda"
    for _ in range(2):
        watch, stacks = HostSyncWatch(), []

        def record(message, *args, **kwargs):
            if "synchroniz" in str(message):
                stacks.append(traceback.extract_stack()[:-1])
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(), watch:
                warnings.simplefilter("always")
                warnings.showwarning = record
                step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    if cuda:  # reads of host tensors (e.g. an unfused optimizer's step counts) do not synchronise
        watch.calls = [c for c in watch.calls if c[2] != "cpu"]
    sites = [call_site([f for f in stack if not f.filename.endswith(("warnings.py", "host_sync.py"))], 6)
             for stack in stacks]
    report = "\n".join(filter(None, [watch.report(6)] + [f"    1 x CUDA sync at {site}" for site in sites]))
    accelerator = sum(c[2] == "accelerator" for c in watch.calls)
    return dict(host_reads=len(watch.calls) - accelerator, accelerator_syncs=accelerator,
                cuda_syncs=len(stacks) if cuda else None, sync_report=report)


#: Kernel (or, on the CPU, operator) name -> category of the profile summary; first match wins,
#: so attention comes before GEMM (the memory-efficient kernels are CUTLASS kernels too).
#: Inductor names its kernels after the ATen ops it fused (triton_red_fused__to_copy_div_mul_sum:
#: a reduction over a cast, a division and products), which says where a kernel comes from.
KERNEL_CATEGORIES = (
    ("attention backward", r"fmha_cutlassB|fmha\w*bwd|flash\w*bwd|attention_backward|flex_attention_backward|"
                           r"bias_attn_bwd|bias_attn_delta"),
    ("attention forward", r"fmha_cutlassF|fmha\w*fwd|flash\w*fwd|attention_forward|flex_attention|scaled_dot_product|"
                          r"_attention|bias_attn_fwd"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("GEMM", r"gemm|nvjet|xmma|cublas|cutlass|addmm|\bmm\b|bmm|matmul|linear|triton_tem_fused_(addmm|mm|bmm)"),
    ("reduction (Triton)", r"triton_red|triton_per"),
    ("pointwise (Triton)", r"triton_poi"),
    ("norm / activation (eager)", r"layer_norm|gelu|softmax"),
    ("copy / cast / fill", r"copy|cat\b|CatArray|memcpy|memset|fill|contiguous|elementwise_kernel"),
    ("collective", r"nccl|all_reduce|allreduce|reduce_scatter|all_gather"),
)


def kernel_category(name: str) -> str:
    import re
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return category
    return "other"


def profile_summary(kernels: list[tuple[str, float, int]], steps: int) -> tuple[list[dict], str]:
    """``kernels``: (name, total microseconds, calls) -> one row per category (ms per step,
    share, the three costliest names) and the same as text."""
    total = sum(t for _, t, _ in kernels) or 1.0
    cats: dict[str, list] = {}
    for name, t, n in kernels:
        cats.setdefault(kernel_category(name), []).append((t, n, name))
    rows = []
    for cat, items in sorted(cats.items(), key=lambda kv: -sum(t for t, _, _ in kv[1])):
        items.sort(reverse=True)
        t = sum(i[0] for i in items)
        rows.append(dict(category=cat, ms_per_step=t / 1e3 / steps, pct=100 * t / total,
                         calls_per_step=sum(i[1] for i in items) / steps,
                         top=[f"{name[:80]} ({100 * ti / total:.1f}%)" for ti, _, name in items[:3]]))
    lines = [f"{'category':22s} {'ms/step':>8s} {'%':>5s} {'calls/step':>10s}  costliest"]
    for r in rows:
        lines.append(f"{r['category']:22s} {r['ms_per_step']:8.2f} {r['pct']:5.1f} {r['calls_per_step']:10.0f}  "
                     + "; ".join(r["top"]))
    return rows, "\n".join(lines)


def write_profile(step, device, path: str, steps: int = 3) -> list[dict]:
    """Profiles ``steps`` steps; writes the summary by kernel category, then the kernel table, to
    ``path``, and returns the summary rows. On the GPU the entries are the device kernels; on
    the CPU, operators by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        kernels = [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type == DeviceType.CUDA]
    else:
        kernels = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    rows, text = profile_summary(kernels, steps)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"# {steps} profiled steps, {'GPU kernels' if cuda else 'CPU operators (self time)'}\n{text}\n\n")
        f.write(events.table(sort_by=key, row_limit=60, max_name_column_width=110))
    print(text)
    return rows


def largest_batch(fits, start: int, limit: int, granularity: int = 8) -> int:
    """The largest batch b <= limit (a multiple of ``granularity`` above it) with ``fits(b)``:
    doubling from ``start`` until a batch does not fit, then bisection. 0 if ``start`` does not."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            break
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def run_inference(device, batch: int, steps: int, warmup: int, compile_: bool) -> list[dict]:
    import timm
    rows = []
    for name in ("itpn_base_patch16_224", "vit_base_patch16_224", "itpn_large_patch16_224", "vit_large_patch16_224"):
        model = timm.create_model(name).to(device).eval()
        if compile_:
            model = torch.compile(model)
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            for _ in range(warmup):
                model(x)
            with Timer(device) as t:
                for _ in range(steps):
                    model(x)
        rows.append(dict(model=name, batch=batch, compiled=compile_, img_s=batch * steps / t.seconds))
        del model
        gc.collect()
    return rows


def environment(device) -> dict:
    import timm
    env = dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def cap_memory(device, gib: float) -> None:
    """Emulate a smaller GPU: this process may allocate at most ``gib`` GiB."""
    if device.type != "cuda":
        print(f"# --memory-gib {gib}: no effect on {device.type}")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(gib * 2 ** 30 / total, 1.0), device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="clip_l")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--ladder", nargs="+", default=list(DEFAULT_LADDER), choices=list(LADDER),
                        help=f"settings to run, in order (default: {' '.join(DEFAULT_LADDER)})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--infer", action="store_true", help="classifier inference throughput instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here (JSON lines)")
    parser.add_argument("--profile", help="profile 3 steps of the last setting: kernel time by category (also in the "
                                          "JSON row), then the kernel table, written here")
    parser.add_argument("--ckpt-every", type=int, default=0,
                        help="activation checkpointing on every k-th block of the student (0: off)")
    parser.add_argument("--data", help="a folder of pre-training shards (itpn-prep): also time every setting fed "
                                       "by the real loader, and the loader alone")
    parser.add_argument("--workers", type=int, help="loader worker processes (default: the recipe's data.num_workers)")
    parser.add_argument("--zero", help="run the step inside DeepSpeed with this ZeRO fragment of ds_configs/ "
                                       "(zero1, zero2, zero3, zero3_offload); the recipe's other fragments are kept")
    parser.add_argument("--ds-precision", help="with --zero: the precision fragment in place of the setting's dtype "
                                               "(bf16_autocast: fp32 weights under bf16 autocast, no bf16 copy)")
    parser.add_argument("--deepspeed-loops", action="store_true",
                        help="with --zero: DeepSpeed's own methods in place of those the trainer installs (the "
                             "clip, the gradient norm, the bf16 views, the ZeRO-1 reduction): the baseline for them")
    parser.add_argument("--memory-gib", type=float, help="cap the GPU memory this process may use (emulates a "
                                                         "smaller GPU, e.g. 24)")
    parser.add_argument("--max-batch", action="store_true",
                        help="for each setting, search the largest batch that fits (doubling from --batch, then "
                             "bisecting to a multiple of 8) and time it")
    parser.add_argument("--max-batch-limit", type=int, default=4096)
    parser.add_argument("--activation-memory-budget", type=float, metavar="B",
                        help="settings with compiled blocks: inductor's partitioner keeps at most B (in [0, 1]) of the "
                             "activation bytes it keeps by default and recomputes the rest in the backward (the "
                             "trainer's deepspeed.activation_memory_budget; rows are labelled +budgetB)")
    parser.add_argument("--check-syncs", action="store_true",
                        help="after timing, count the host-device synchronisations of one more step (host reads of "
                             "tensor values; on CUDA also CUDA's sync debug mode) and print where they happen")
    args = parser.parse_args(argv)
    if args.ds_precision and not args.zero:
        parser.error("--ds-precision applies to the DeepSpeed step: give --zero too")
    if args.deepspeed_loops and not args.zero:
        parser.error("--deepspeed-loops applies to the DeepSpeed step: give --zero too")
    if args.activation_memory_budget is not None:
        try:
            set_activation_memory_budget(args.activation_memory_budget, "--activation-memory-budget")
        except ValueError as e:
            parser.error(str(e))
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.memory_gib:
        cap_memory(device, args.memory_gib)

    peak = measure_peak_tflops(device)
    env = environment(device)
    print(f"# {json.dumps(env)}  bf16 matmul peak measured: {peak:.0f} TFLOP/s")
    if args.infer:
        rows = []
        for b in args.batch:
            for c in (False, True):
                rows += run_inference(device, b, args.steps, args.warmup, c)
        print(f"{'model':26s} {'batch':>5s} {'compiled':>8s} {'img/s':>9s}")
        for r in rows:
            print(f"{r['model']:26s} {r['batch']:5d} {str(r['compiled']):>8s} {r['img_s']:9.0f}")
        write_rows(args.json, rows, env, peak)
        return 0
    rows = run_training(args, device, peak, lambda r: write_rows(args.json, [r], env, peak))
    return 1 if any("error" in r for r in rows) else 0


def write_rows(path: str | None, rows: list[dict], env: dict, peak: float) -> None:
    """Append rows to the JSON-lines file, if any, at once: a run stopped later keeps them."""
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **env, "peak_tflops": peak}) + "\n")


def run_training(args, device, peak: float, emit=lambda row: None) -> list[dict]:
    """Time every setting of the ladder. Each row is printed and passed to ``emit`` as soon as
    it is measured, and a setting that fails (other than by running out of memory, which is a
    result) becomes a row with its error, after which the ladder goes on: a run stopped by a
    time limit or a broken setting keeps what it measured. The table at the end repeats them."""
    cfg = load_recipe(args.recipe)
    teacher_dim = 0
    if cfg["objective"]["kind"] == "clip":
        teacher_dim = build_teacher(cfg, torch.float32, "cpu").embed_dim
    student_gflop = count_student_flops(cfg, teacher_dim) / 1e9
    workers = cfg["data"]["num_workers"] if args.workers is None else args.workers
    suffix = ((f"/{args.zero}" if args.zero else "") + (f"+{args.ds_precision}" if args.ds_precision else "")
              + ("+deepspeed-loops" if args.deepspeed_loops else ""))
    print(f"recipe {args.recipe}: {student_gflop:.1f} GFLOP/img student fwd+bwd", flush=True)

    def measure(name, batch, loader=None, steps=args.steps, split=True, profile=None, contain=True):
        warm = args.warmup + (3 if LADDER[name]["compile"] else 0)
        label = name + suffix + ("+data" if loader is not None else "")
        if LADDER[name]["compile"] and args.activation_memory_budget is not None:
            label += f"+budget{args.activation_memory_budget:g}"
        try:
            r = run_setting(cfg, label, LADDER[name], batch, steps, warm, device, split=split, profile=profile,
                            ckpt_every=args.ckpt_every, loader=loader, zero=args.zero, ds_precision=args.ds_precision,
                            deepspeed_loops=args.deepspeed_loops,
                            check_syncs=args.check_syncs and loader is None)
        except torch.OutOfMemoryError:
            release(device)
            return dict(setting=label, batch=batch, oom=True)
        except Exception as e:  # noqa: BLE001 - reported as a row and in the exit status
            if not contain:
                raise
            return failed_row(label, batch, e, device)
        gflop = student_gflop + r["teacher_gflop"]
        r.update(recipe=args.recipe, gflop_per_img=gflop, tflops=r["img_s"] * gflop / 1e3,
                 mfu_pct=100 * r["img_s"] * gflop / 1e3 / peak if math.isfinite(peak) else float("nan"))
        return r

    rows = []
    base = {}

    def add(r):
        if "tflops" in r:
            r["speedup"] = r["img_s"] / base.setdefault(r["batch"], r["img_s"])
        rows.append(r)
        print("+ " + format_row(r), flush=True)
        emit(r)

    if args.max_batch:
        for name in args.ladder:
            # a failure while searching is not "does not fit": it ends the search with its error
            try:
                found = largest_batch(lambda b: not measure(name, b, steps=1, split=False, contain=False).get("oom"),
                                      args.batch[0], args.max_batch_limit)
            except Exception as e:  # noqa: BLE001
                add(failed_row(name + suffix, args.batch[0], e, device))
                continue
            if found:
                add({**measure(name, found), "max_batch": True})
            else:
                add(dict(setting=name + suffix, batch=args.batch[0], oom=True))
    for b in args.batch if not args.max_batch else []:
        loader = build_bench_loader(cfg, args.data, b, workers, device) if args.data else None
        if loader is not None:
            add(dict(setting="loader", batch=b, img_s=time_loader(loader, device, args.steps, args.warmup),
                     workers=workers))
        for name in args.ladder:
            last = name == args.ladder[-1] and b == args.batch[-1]
            add(measure(name, b, profile=args.profile if last else None))
            if loader is not None:
                add(measure(name, b, loader, split=False))
    print(f"recipe {args.recipe}: {student_gflop:.1f} GFLOP/img student fwd+bwd"
          + (f" + {max(r.get('teacher_gflop', 0) for r in rows):.1f} teacher fwd" if teacher_dim else ""))
    print(f"{'setting':22s} {'batch':>5s} {'img/s':>8s} {'x first':>7s} {'TFLOP/s':>8s} {'MFU%':>5s} "
          f"{'peak GiB':>8s} {'teacher%':>8s} {'student%':>8s} {'optim%':>6s}")
    for r in rows:
        print(format_row(r))
    for r in rows:
        if "host_reads" in r:
            cuda = "" if r["cuda_syncs"] is None else f", {r['cuda_syncs']} synchronising CUDA calls"
            print(f"{r['setting']} (batch {r['batch']}): one step made {r['host_reads']} host reads of tensor values, "
                  f"{r.get('accelerator_syncs', 0)} DeepSpeed accelerator synchronisations{cuda}"
                  + (f"\n{r['sync_report']}" if r["sync_report"] else ""))
    return rows


def failed_row(label: str, batch: int, error: Exception, device) -> dict:
    """The row of a setting that raised: its traceback printed, the device freed for the next one."""
    traceback.print_exc()
    release(device)
    return dict(setting=label, batch=batch, error=f"{type(error).__name__}: {error}"[:500])


def release(device) -> None:
    """Free what a failed setting left on the device before the next one."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_row(r: dict) -> str:
    head = f"{r['setting']:22s} {r['batch']:5d}"
    if r.get("oom"):
        return f"{head}  out of memory"
    if "error" in r:
        return f"{head}  FAILED: {r['error'].splitlines()[0][:200]}"
    if r["setting"] == "loader":
        return f"{head} {r['img_s']:8.1f}  (the loader alone, {r['workers']} workers)"
    split = (f"{r['teacher_pct']:8.1f} {r['student_pct']:8.1f} {r['optimizer_pct']:6.1f}"
             if "teacher_pct" in r else f"{'-':>8s} {'-':>8s} {'-':>6s}")
    return (f"{head} {r['img_s']:8.1f} {r['speedup']:7.2f} {r['tflops']:8.1f} {r['mfu_pct']:5.1f} "
            f"{r.get('peak_gib', float('nan')):8.1f} {split}" + ("  largest batch" if r.get("max_batch") else "")
            + (f"  {r['graph_breaks']} graph breaks" if r.get("graph_breaks") else ""))


if __name__ == "__main__":
    sys.exit(main())
