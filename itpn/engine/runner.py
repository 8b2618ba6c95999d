"""Run setup under DeepSpeed and the training loops (issue #5).

``run(cfg)`` is the whole life of a process: distributed init, building the objective (or
classifier) and the frozen teacher, ``deepspeed.initialize`` on the trained module only,
resume, the loop, checkpoints, export. The loop itself (``train_loop``) is short and linear.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import time
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..data import build_finetune_loader
from ..data.mixup import build_criterion, build_mixup
from ..layers import set_attention_impl
from ..layers.attention import triton_fallbacks
from ..layers.block import compiled_blocks, misaligned_compiled_parameters, misaligned_parameters
from ..models.flops import count_train_flops, vit_forward_flops
from ..objectives.ema import momentum_schedule
from .build import (apply_block_options, backbone_config, build_classifier, build_objective, build_teacher,
                    build_val_loader, finetune_augment, pretrain_loader, zero3_gather_per_block)
from .checkpoint import CheckpointManager, atomic_torch_save
from .config import DTYPES, ConfigError, autocast_weights, deepspeed_config, precision, write_run_config
from .faults import maybe_die, maybe_inf_grad
from .host_sync import (foreach_grad_norm, keep_bit16_views, sync_free_clipping, sync_free_fp32_clip,
                        sync_free_norm_masking)
from .metrics import MetricLogger, Throughput, device_peak_tflops, setup_logging
from .param_groups import param_groups
from .schedules import Schedule, scaled_lr
from .zero_reduce import flat_zero1_reduction

log = logging.getLogger("itpn.engine")


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- setup

def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Join the process group the launcher (deepspeed, torchrun, srun wrapper) set up, or a
    one-process group when started directly."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    accel = get_accelerator()
    backend = "nccl" if accel.device_name() == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if backend == "gloo":
        release_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


SHM_DIR = "/dev/shm"


def shm_buffer_path(rank: int) -> str:
    """The file DeepSpeed's CPU shared-memory all-reduce (``shm.cpp``, 0.19.8) creates for a
    rank: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU backend creates one ~66 MB file in /dev/shm per rank when the process group
    starts, maps the other ranks' files, and never unlinks them: each CPU run (the demo, the
    tests) left its files behind, 15 GB of the development VM's 24 GB after a day. Every rank
    has mapped every file when ``init_distributed`` returns (its initialisation waits for the
    other ranks' files); after a barrier that guarantees it for all, each rank unlinks its
    own. The mappings stay valid until the processes exit, so the all-reduce is unaffected.
    Called by every rank of a CPU (gloo) group; no file exists with NCCL, or when the ranks span
    several hosts (the barrier is then all this costs, once)."""
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(dist.get_rank()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    step: int = 0            # optimizer steps taken
    samples: int = 0         # samples seen by all ranks
    epoch: int = 0
    best_top1: float = -1.0
    extra: dict = field(default_factory=dict)


def _client_state(state: TrainState, loader, world: int, ema=None) -> dict:
    out = {"step": state.step, "samples": state.samples, "epoch": state.epoch, "best_top1": state.best_top1,
           "loader": loader.state_dict(), "rng": rng_state(), "world_size": world}
    if ema is not None:
        out["ema"] = ema.state_dict()
    return out


# ----------------------------------------------------------------------------- the loop

def _check_finite(bad: torch.Tensor, step: int, ckpt: CheckpointManager) -> None:
    """All ranks agree whether any rank saw a non-finite loss or gradient since the last check."""
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        last = ckpt.resolve("auto")
        raise NonFiniteLoss(f"non-finite loss or gradient at or before step {step}; stopping without saving. "
                            f"Last good checkpoint: {os.path.join(*last) if last else 'none'}")


def _applies_bad_steps(engine) -> bool:
    """Whether DeepSpeed applies a step whose gradient norm is not finite: fp16, ZeRO-3,
    BF16_Optimizer and ZeRO-1/2 with an overflow check skip it (the weights stay good); bf16
    ZeRO-1/2 without the check (ds_configs/bf16.json) and fp32 apply it, and the weights stop
    being finite."""
    return not engine.fp16_enabled() and not getattr(engine.optimizer, "check_grad_overflow", True)


def _invalid_norm(norm) -> torch.Tensor | float:
    """1 when a gradient norm is not finite (DeepSpeed masks inf/NaN norms to -1), on the
    norm's device: no host read for a tensor."""
    if norm is None:
        return 0.0
    if torch.is_tensor(norm):
        return ((norm < 0) | ~torch.isfinite(norm)).float()
    return float(not math.isfinite(norm) or norm < 0)


def train_loop(engine, loader, step_fn, state: TrainState, schedule: Schedule, optimizer, *, total_steps: int,
               global_batch: int, ckpt: CheckpointManager, cfg: dict, metrics: MetricLogger, world: int,
               device, flops_per_sample: float | None, after_step=None, on_epoch_end=None, ema=None) -> TrainState:
    """One linear loop over optimizer steps: fetch, forward/backward (``step_fn``), schedule,
    step, log, checkpoint. Loss terms stay on the device between log steps (no per-step
    host sync); a non-finite loss, or a non-finite gradient that DeepSpeed applied, on any
    rank stops the run at the next log or save step, before any checkpoint could store it."""
    accum = engine.gradient_accumulation_steps()
    log_every, save_every = cfg["log"]["every_steps"], cfg["checkpoint"]["every_steps"]
    peak = device_peak_tflops(device)
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), device=device)
    guard_grads = _applies_bad_steps(engine)
    meter = Throughput(total_steps, state.step)
    micro = 0
    t_fetch = time.perf_counter()
    it = iter(loader)
    while state.step < total_steps:
        try:
            batch = next(it)
        except StopIteration:
            if on_epoch_end is not None:
                on_epoch_end(state)
            state.epoch = loader.epoch
            it = iter(loader)
            continue
        wait = time.perf_counter() - t_fetch
        terms = step_fn(batch)
        loss = maybe_inf_grad(terms["loss"], state.step + 1)
        engine.backward(loss)
        micro += 1
        if engine.is_gradient_accumulation_boundary():
            lr, wd = schedule.apply(optimizer, state.samples)
        engine.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        bad += (~torch.isfinite(loss.detach())).float()
        if guard_grads:  # this step's update may have made the weights non-finite: never save them
            bad += _invalid_norm(engine.get_global_grad_norm())
        meter.add(batch["image"].shape[0] * world, wait)
        if micro % accum:
            t_fetch = time.perf_counter()
            continue
        state.step += 1
        state.samples += global_batch
        state.epoch = loader.epoch
        if after_step is not None:
            after_step(state)
        should_save = state.step % save_every == 0 and state.step < total_steps
        if state.step % log_every == 0 or state.step == total_steps or should_save:
            _check_finite(bad, state.step, ckpt)
        if state.step % log_every == 0 or state.step == total_steps:
            n = max(state.step - meter.step0, 1) * accum * world
            _log_step(engine, state, sums, n, dict(lr=lr, wd=wd, **meter.window(state.step)), metrics, device,
                      world, flops_per_sample, peak, total_steps)
            sums = {}
        if should_save:
            ckpt.save(engine, state.step, _client_state(state, loader, world, ema))
        maybe_die("after_step", state.step)
        t_fetch = time.perf_counter()
    return state


def _log_step(engine, state: TrainState, sums: dict, n: int, values: dict, metrics: MetricLogger, device,
              world: int, flops_per_sample: float | None, peak: float | None, total_steps: int) -> None:
    """The log step: the only place of the loop, with _check_finite, that reads device
    values on the host (tests/integration/test_host_sync.py holds the rest to none)."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k] for k in keys])
    dist.all_reduce(stacked)  # one collective: the logged losses are means over all ranks
    values = {**dict(zip(keys, (stacked / n).tolist())), **values, "epoch": state.epoch, "samples": state.samples}
    gn = engine.get_global_grad_norm()
    if gn is not None:
        values["grad_norm"] = float(gn)
    if engine.fp16_enabled():
        values["loss_scale"] = float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else float("nan")
        values["skipped_steps"] = engine.skipped_steps
    if device.type == "cuda":
        values["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if flops_per_sample:
        values["tflops_per_gpu"] = values["img_s"] / world * flops_per_sample / 1e12
        if peak:
            values["mfu"] = values["tflops_per_gpu"] / peak
    metrics.scalars(state.step, values)
    terms_txt = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k.startswith("loss"))
    log.info("step %d/%d epoch %d %s lr=%.3g %.1f img/s data-wait %.0f%% eta %.1f min", state.step, total_steps,
             state.epoch, terms_txt, values["lr"], values["img_s"], 100 * values["data_wait_frac"], values["eta_min"])


# ----------------------------------------------------------------------------- tasks

def _engine(module, cfg, ds_cfg, optimizer):
    import deepspeed
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        zero3_gather_per_block(module)  # one gathering hook per block, outside its compiled region
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    sync_free_clipping(engine.optimizer)  # no host read of the gradient norm in the step
    sync_free_norm_masking()  # and no host-to-device copy in computing it
    foreach_grad_norm(engine.optimizer)  # ZeRO-1/2: one multi-tensor norm, not a Python loop per parameter
    keep_bit16_views(engine.optimizer)  # and no re-pointing of every parameter after each step
    flat_zero1_reduction(engine.optimizer)  # ZeRO-1: gradients reduced from one flat buffer, not copied one by one
    sync_free_fp32_clip(engine)  # fp32 weights without ZeRO (zero0 + bf16_autocast or fp32): torch's clip
    stage3 = engine.zero_optimization_stage() == 3
    misaligned = (zero3_misaligned_compiled_parameters(engine.module) if stage3
                  else misaligned_compiled_parameters(engine.module))
    if misaligned:
        fix = ("run ZeRO-3 on more than one rank per parameter partition, or offload its parameters "
               "(offload_param; on one rank ZeRO-3 gains nothing over ZeRO-1/2 without it)" if stage3 else
               "set zero_optimization.parameter_alignment: true in the ZeRO fragment (ds_configs/zero1.json and "
               "zero2.json do)")
        raise ConfigError(
            f"{len(misaligned)} parameters of compiled blocks are not 16-byte aligned "
            f"{'as ZeRO-3 gathers them for the forward' if stage3 else 'after DeepSpeed initialisation'} "
            f"(first: {', '.join(misaligned[:3])}); the compiled kernels would fail on the GPU with "
            f"'misaligned address'. Fix: {fix}; or set deepspeed.compile=false")
    return engine


#: The methods ``_engine`` replaces on DeepSpeed's ZeRO-1/2 optimizer instance (host_sync.py,
#: zero_reduce.py); DeepSpeed's class keeps its own.
OUR_ZERO_METHODS = ("unscale_and_clip_grads", "get_grad_norm_direct", "_update_model_bit16_weights",
                    "reduce_gradients", "setup_buckets")


def deepspeed_own_methods(optimizer) -> list[str]:
    """Give a ZeRO optimizer instance DeepSpeed's own methods back in place of ours (the
    baseline that ``itpn-bench --deepspeed-loops`` and ``count_step_ops.py --deepspeed-loops``
    measure ours against). Returns the names removed. ``sync_free_norm_masking`` (module-wide,
    the same values) and the config's choices (no throughput timer, no ``overlap_comm``) stay."""
    removed = [name for name in OUR_ZERO_METHODS if name in getattr(optimizer, "__dict__", {})]
    for name in removed:
        delattr(optimizer, name)
    return removed


def zero3_misaligned_compiled_parameters(module) -> list[str]:
    """Parameters of compiled blocks that ZeRO-3 would hand the compiled kernels at an address
    that is not 16-byte aligned (see ``misaligned_compiled_parameters`` for why that fails).

    Each compiled block's parameters are gathered with the call DeepSpeed's parameter
    coordinator makes before a forward (``all_gather_coalesced``), checked, and partitioned
    again, so the answer is DeepSpeed's own on this device and group. DeepSpeed 0.19.8 gathers
    each parameter into a buffer of its own on a partition group of several ranks (aligned);
    on one rank it does not gather, and a parameter becomes a view of its partition in one flat
    buffer packed without gaps (33 parameters of the demo model's compiled blocks at 8-byte
    offsets, in bf16), unless the partitions live on the host (``offload_param``) and are copied to the GPU.
    Collective: every rank calls it, in the same order (it runs in ``_engine``)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    names = []
    for name, blk in compiled_blocks(module):
        gathered = [p for p in blk.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if gathered:
            gathered[0].all_gather_coalesced(gathered).wait()
        names += misaligned_parameters(name, blk)
        for p in gathered:
            p.partition()
    return names


def _optimizer(groups, cfg, device, ds_cfg: dict, lars: bool = False):
    o = cfg["optim"]
    if lars:
        from timm.optim import Lars
        return Lars(groups, lr=0.0, momentum=0.9, weight_decay=o["weight_decay"])
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        # ZeRO-Offload steps the optimizer on the host: DeepSpeed's vectorised CPU AdamW
        # (torch's AdamW there would be several times slower, and DeepSpeed refuses it).
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=0.0, betas=tuple(o["betas"]), eps=o["eps"],
                                weight_decay=o["weight_decay"], adamw_mode=True)
    # Fused AdamW (one kernel for all parameters, no host read of the step count; torch has it
    # on the CPU too since 2.4, so the CPU tests run the GPU's optimizer path).
    fused = bool(o["fused"]) and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"],
                             fused=fused or None, foreach=None if fused else True)


def _schedule(cfg, total_batch: int, samples_per_epoch: int) -> tuple[Schedule, int]:
    o = cfg["optim"]
    lr = o["lr"] if o["lr"] is not None else scaled_lr(o["base_lr"], total_batch)
    total = int(o["epochs"] * samples_per_epoch)
    total_steps = max(math.ceil(total / total_batch), 1)
    return Schedule(lr=lr, min_lr=o["min_lr"], warmup_samples=int(o["warmup_epochs"] * samples_per_epoch),
                    total_samples=total_steps * total_batch, weight_decay=o["weight_decay"],
                    weight_decay_end=o["weight_decay_end"]), total_steps


def _resume(engine, ckpt: CheckpointManager, cfg, world: int, loader, state: TrainState, ema=None,
            global_batch: int | None = None) -> TrainState:
    found = ckpt.resolve(cfg["checkpoint"]["resume"])
    if found is None:
        return state
    load_dir, tag = found
    meta_world = _saved_world_size(os.path.join(load_dir, tag))
    if meta_world is not None and meta_world != world:
        return _resume_other_world(engine, load_dir, tag, meta_world, world, loader, ema, global_batch)
    _, client = engine.load_checkpoint(load_dir, tag=tag)
    state = TrainState(step=client["step"], samples=client["samples"], epoch=client["epoch"],
                       best_top1=client.get("best_top1", -1.0))
    loader.load_state_dict(client["loader"])
    set_rng_state(client["rng"])
    if ema is not None and "ema" in client:
        ema.load_state_dict(client["ema"])
    log.info("resumed from %s/%s at step %d (epoch %d, %d samples)", load_dir, tag, state.step, state.epoch,
             state.samples)
    return state


def _resume_other_world(engine, load_dir: str, tag: str, saved_world: int, world: int, loader, ema,
                        global_batch: int | None) -> TrainState:
    """Resume on a different number of ranks from the checkpoint's consolidated fp32 weights
    (DeepSpeed's zero_to_fp32 reads the master weights out of the optimizer shards). The
    optimizer moments restart from zero; step, samples, schedules and the EMA teacher carry
    over; the loader resumes at the same epoch, at the batch covering the same fraction."""
    import glob

    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.warning("checkpoint %s was written by %d ranks, this run has %d: loading its consolidated fp32 weights; "
                "optimizer moments restart", tag, saved_world, world)
    sd = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag)
    module = engine.module
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if engine.zero_optimization_stage() == 3 \
        else contextlib.nullcontext()
    with ctx:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed") or k in sd]
    if unexpected:
        raise RuntimeError(f"consolidated weights of {tag} do not fit the model: unexpected {unexpected[:5]}")
    # Our client state sits in every model-states file; any one of them will do.
    states = sorted(glob.glob(os.path.join(load_dir, tag, "*model_states.pt")))
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    state = TrainState(step=client["step"], samples=client["samples"], epoch=client["epoch"],
                       best_top1=client.get("best_top1", -1.0))
    if global_batch and client["samples"] % global_batch == 0:
        # The schedule is in samples; with another global batch the step counter follows them.
        state.step = client["samples"] // global_batch
    elif global_batch:
        raise ConfigError(f"cannot resume {tag} ({client['samples']} samples seen) with a global batch of "
                          f"{global_batch}: set optim.total_batch to the original run's global batch")
    loader_state = dict(client["loader"])
    loader_state["step"] = int(loader_state["step"] * saved_world / world)
    loader.load_state_dict(loader_state)
    if ema is not None and "ema" in client:
        ema.load_state_dict(client["ema"])
    return state


def _saved_world_size(path: str) -> int | None:
    import glob
    files = glob.glob(os.path.join(path, "*optim_states.pt"))
    return len(files) or None


def _log_fallbacks(fallbacks: list[str], warning: str, info: str) -> None:
    """Warn ``warning`` (with %d for their count) naming the first three modules that fall back
    from one of our kernels, each with its reason; or log ``info`` if none does."""
    if fallbacks:
        more = f" (+{len(fallbacks) - 3} more)" if len(fallbacks) > 3 else ""
        log.warning(f"{warning}: %s%s", len(fallbacks), "; ".join(fallbacks[:3]), more)
    else:
        log.info(info)


def _report_attention(model: torch.nn.Module, cfg: dict, device, dtype: torch.dtype) -> None:
    """With deepspeed.attention=triton, say whether every attention module runs our kernel,
    and name those that fall back to SDPA and why (e.g. CPU tensors, fp32, head dim 24)."""
    if cfg["deepspeed"]["attention"] == "triton":
        _log_fallbacks(triton_fallbacks(model, device, dtype), "deepspeed.attention=triton: %d attention modules "
                       "fall back to SDPA", "deepspeed.attention=triton: every attention module runs bias_attention")


def _block_options(model: torch.nn.Module, cfg: dict, device, dtype: torch.dtype) -> int:
    """apply_block_options with the run's settings. With deepspeed.fused_mlp, names the MLPs
    that run the separate kernels instead and why (under ZeRO-3 a fused MLP's parameters are
    gathered with its block's, ``zero3_gather_per_block``). Returns the checkpointed blocks."""
    from ..layers import Mlp
    ds = cfg["deepspeed"]
    n_ckpt = apply_block_options(model, ds["checkpoint_every"], ds["activation_checkpointing"], ds["compile"],
                                 fp8=ds["fp8"], fused_mlp=ds["fused_mlp"], compile_regions=ds["compile_regions"],
                                 activation_memory_budget=ds["activation_memory_budget"])
    if not ds["fused_mlp"]:
        return n_ckpt
    mlps = [(name, m) for name, m in model.named_modules() if isinstance(m, Mlp)]
    fallbacks = [f"{name}: {reason}" for name, m in mlps if (reason := m.fused_reason(device, dtype)) is not None]
    _log_fallbacks(fallbacks, f"deepspeed.fused_mlp: %d of {len(mlps)} MLPs run the separate kernels",
                   f"deepspeed.fused_mlp: all {len(mlps)} MLPs run fused_mlp")
    return n_ckpt


def run_pretrain(cfg: dict) -> TrainState:
    rank, world, local_rank, device = init_distributed()
    run_dir = cfg["run_dir"]
    setup_logging(rank, run_dir)
    ds_cfg = deepspeed_config(cfg, world)
    set_attention_impl(cfg["deepspeed"]["attention"])
    prec = precision(ds_cfg)
    dtype = DTYPES[prec]
    if rank == 0:
        write_run_config(cfg, ds_cfg, run_dir)
    seed_everything(cfg["seed"] + rank)
    teacher = build_teacher(cfg, dtype, device)
    torch.manual_seed(cfg["seed"])  # identical student initialisation on every rank
    objective = build_objective(cfg, teacher)
    _report_attention(objective, cfg, device, dtype)
    seed_everything(cfg["seed"] + rank)
    n_ckpt = _block_options(objective, cfg, device, dtype)
    n_params = sum(p.numel() for p in objective.parameters())
    optimizer = _optimizer(param_groups(objective, cfg["optim"]["weight_decay"]), cfg, device, ds_cfg)
    engine = _engine(objective, cfg, ds_cfg, optimizer)
    ema = getattr(objective, "ema", None)
    if ema is not None:
        ema.to(device)
    gather = None
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        gather = lambda params: deepspeed.zero.GatheredParameters(params)  # noqa: E731

    d = cfg["data"]
    loader = pretrain_loader(cfg, rank, world, device)
    total_batch = ds_cfg["train_batch_size"]
    samples_per_epoch = len(loader) * d["batch_size"] * world
    schedule, total_steps = _schedule(cfg, total_batch, samples_per_epoch)
    ckpt = CheckpointManager(run_dir, cfg["checkpoint"]["keep"], rank, barrier=dist.barrier)
    state = _resume(engine, ckpt, cfg, world, loader, TrainState(), ema, total_batch)
    metrics = MetricLogger(run_dir, rank, cfg["log"]["tensorboard"])
    flops = _pretrain_flops(cfg, teacher)
    ds = cfg["deepspeed"]
    compiled = ""
    if ds["compile"]:
        compiled = f", compiled blocks (activation memory budget {ds['activation_memory_budget']:g})"
    log.info("pre-training %s (%s, %d params) on %d ranks, %s, ZeRO-%d, %d checkpointed blocks%s; %d steps of %d "
             "samples (%d per epoch)", cfg["objective"]["kind"], cfg["model"]["variant"],
             n_params, world, prec, engine.zero_optimization_stage(), n_ckpt, compiled,
             total_steps, total_batch, samples_per_epoch)

    last: dict = {}

    def step_fn(batch):
        batch = loader.to_device(batch, device)  # pinned, non-blocking; normalises uint8 batches
        x, mask = batch["image"].to(dtype), batch["mask"]
        if cfg["objective"]["kind"] == "clip":
            with torch.no_grad():
                targets = teacher(batch["teacher_image"])
            out = engine(x, mask, targets=targets)
        else:
            out = engine(x, mask)
            last.update(x=x, pred=out["pred"], mask=mask)
        return {k: v for k, v in out.items() if k.startswith("loss")}

    def after_step(st: TrainState):
        every = cfg["log"]["image_every_steps"]
        if rank == 0 and last and every and st.step % every == 0:
            from ..data import IMAGENET_MEAN, IMAGENET_STD
            from .visual import mim_grid
            grid = mim_grid(last["x"], last["pred"].detach(), last["mask"], backbone_config(cfg).patch_size,
                            IMAGENET_MEAN, IMAGENET_STD, cfg["objective"]["norm_pix_loss"])
            metrics.image(st.step, "pixel_mim/masked_reconstruction_original", grid)
        last.clear()
        if ema is not None:
            m = momentum_schedule(st.step, total_steps, cfg["objective"]["ema_momentum"],
                                  cfg["objective"]["ema_momentum_final"])
            ema.update(engine.module.encoder, m, gather)

    try:
        state = train_loop(engine, loader, step_fn, state, schedule, optimizer, total_steps=total_steps,
                           global_batch=total_batch, ckpt=ckpt, cfg=cfg, metrics=metrics, world=world, device=device,
                           flops_per_sample=flops, after_step=after_step, ema=ema)
        ckpt.save(engine, state.step, _client_state(state, loader, world, ema))
        export_weights(engine, cfg, run_dir, rank)
    finally:
        metrics.close()
    return state


def _pretrain_flops(cfg, teacher) -> float | None:
    bcfg = backbone_config(cfg)
    n = bcfg.grid ** 2
    kind = cfg["objective"]["kind"]

    def inputs():
        x = torch.zeros(2, 3, bcfg.img_size, bcfg.img_size)
        mask = torch.zeros(2, n, dtype=torch.bool)
        mask[:, : n - int(n * (1 - cfg["data"]["mask_ratio"]))] = True
        if kind == "clip":
            return dict(x=x, mask=mask, targets=torch.zeros(2, n, teacher.embed_dim))
        return dict(x=x, mask=mask)
    try:
        flops = count_train_flops(lambda: build_objective(cfg, None) if kind == "pixel" else
                                  build_objective(cfg, teacher), inputs, 2)
    except Exception as e:  # noqa: BLE001 - MFU is a report, never a reason to stop training
        log.warning("could not count FLOPs (%s); MFU will not be logged", e)
        return None
    if teacher is not None:
        flops += vit_forward_flops(teacher.width, teacher.layers, teacher.patch_size, teacher.image_size,
                                   teacher.embed_dim)
    return flops


def export_weights(engine, cfg, run_dir: str, rank: int) -> None:
    """Consolidated fp32 weights of the trained module, in our layout and the official one."""
    import deepspeed
    from ..compat.convert import ours_to_official

    module = engine.module
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 \
        else contextlib.nullcontext()
    with ctx:
        if rank == 0:
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if rank != 0:
        dist.barrier()
        return
    out = os.path.join(run_dir, "weights")
    os.makedirs(out, exist_ok=True)
    atomic_torch_save({"model": sd, "config": cfg}, os.path.join(out, "model.pt"))
    if cfg["checkpoint"]["export_official"]:
        kind = "classifier"
        if cfg["task"] == "pretrain":
            kind = {"clip": "clip_distill", "pixel": "pixel_mim"}[cfg["objective"]["kind"]]
        depths = backbone_config(cfg).depths
        try:
            off = ours_to_official({k: v for k, v in sd.items() if not k.startswith("mfm_heads")}, kind, depths)
            atomic_torch_save({"model": off}, os.path.join(out, "model_official.pt"))
        except KeyError as e:
            log.warning("official export skipped: %s", e)
    log.info("exported consolidated fp32 weights to %s", out)
    dist.barrier()




def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Initialise a classifier from a pre-training export (ours: encoder.* keys; or a
    released checkpoint, pre-trained or fine-tuned). Position tables are resized."""
    from ..compat.convert import (checkpoint_filter_fn, is_official, load_checkpoint_file)
    sd = load_checkpoint_file(path)
    if not is_official(sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")} or sd
    sd = checkpoint_filter_fn(sd, model)
    missing, _ = model.load_state_dict(sd, strict=False)
    log.info("initialised from %s: %d tensors loaded, not in the file: %s", path, len(sd), missing[:8])


def evaluate(model, loader, device, dtype, autocast: bool = False) -> dict:
    """top-1 / top-5 over the whole validation set, every sample counted once across ranks.
    ``autocast``: fp32 weights computing in ``dtype`` (``bf16_autocast``), as in training."""
    model.eval()
    stats = torch.zeros(3, device=device)  # correct@1, correct@5, count
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        for batch in loader:
            batch = loader.to_device(batch, device)
            y, valid = batch["label"], batch["valid"]
            logits = model(batch["image"].to(dtype)).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == y[:, None]
            stats[0] += (hit[:, 0] & valid).sum()
            stats[1] += (hit.any(dim=1) & valid).sum()
            stats[2] += valid.sum()
    dist.all_reduce(stats)
    model.train()
    n = max(stats[2].item(), 1)
    return {"top1": 100 * stats[0].item() / n, "top5": 100 * stats[1].item() / n, "count": int(stats[2].item())}


def run_finetune(cfg: dict, linprobe: bool = False) -> TrainState:
    """Fine-tuning (mixup/cutmix, soft-target CE with smoothing, layer decay, optional EMA of
    weights) or linear probing (frozen backbone, BatchNorm without affine, LARS); top-1 /
    top-5 on the validation shards after every epoch; the best weights kept."""
    from ..objectives.ema import EMATeacher

    rank, world, local_rank, device = init_distributed()
    run_dir = cfg["run_dir"]
    setup_logging(rank, run_dir)
    ds_cfg = deepspeed_config(cfg, world)
    set_attention_impl(cfg["deepspeed"]["attention"])
    if linprobe:
        # timm's LARS is not on DeepSpeed's list of ZeRO-tested optimizers. Under ZeRO-1/2 it
        # would see flat partitions and compute its per-tensor trust ratio over a partition;
        # the linprobe recipe therefore uses zero0 (the trained head is tiny anyway).
        if ds_cfg.get("zero_optimization", {}).get("stage", 0) > 0:
            log.warning("linear probing with ZeRO stage > 0: LARS trust ratios span flat partitions")
        ds_cfg["zero_allow_untested_optimizer"] = True
    dtype = DTYPES[precision(ds_cfg)]
    amp = autocast_weights(ds_cfg)
    if rank == 0:
        write_run_config(cfg, ds_cfg, run_dir)
    torch.manual_seed(cfg["seed"])
    model = build_classifier(cfg)
    _report_attention(model, cfg, device, dtype)
    if cfg["model"]["init"]:
        load_init_weights(model, cfg["model"]["init"])
    seed_everything(cfg["seed"] + rank)
    if linprobe:
        model.requires_grad_(False)
        head = torch.nn.Linear(model.embed_dim, cfg["model"]["num_classes"])
        torch.nn.init.trunc_normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.embed_dim, affine=False), head)
        groups = param_groups(model, 0.0)
    else:
        _block_options(model, cfg, device, dtype)
        groups = param_groups(model, cfg["optim"]["weight_decay"], cfg["optim"]["layer_decay"])
    optimizer = _optimizer(groups, cfg, device, ds_cfg, lars=linprobe)
    engine = _engine(model, cfg, ds_cfg, optimizer)
    model_ema = None
    if cfg["optim"]["model_ema"] and not linprobe:
        model_ema = EMATeacher(engine.module)

    d = cfg["data"]
    aug = finetune_augment(cfg)
    loader = build_finetune_loader(d["train"], d["batch_size"], aug, rank=rank, world_size=world,
                                   num_workers=d["num_workers"], seed=cfg["seed"], epoch_length=d["epoch_samples"],
                                   pin_memory=device.type == "cuda")
    val = build_val_loader(cfg, rank, world, device) if d["val"] else None
    mixup = None if linprobe else build_mixup(cfg["model"]["num_classes"], d["mixup"], d["cutmix"],
                                              label_smoothing=d["smoothing"])
    criterion = build_criterion(mixup, 0.0 if linprobe else d["smoothing"])
    total_batch = ds_cfg["train_batch_size"]
    schedule, total_steps = _schedule(cfg, total_batch, len(loader) * d["batch_size"] * world)
    ckpt = CheckpointManager(run_dir, cfg["checkpoint"]["keep"], rank, barrier=dist.barrier)
    state = _resume(engine, ckpt, cfg, world, loader, TrainState(), model_ema, total_batch)
    metrics = MetricLogger(run_dir, rank, cfg["log"]["tensorboard"])
    log.info("%s %s on %d ranks: %d steps of %d samples", "linear probing" if linprobe else "fine-tuning",
             cfg["model"]["variant"], world, total_steps, total_batch)

    def step_fn(batch):
        batch = loader.to_device(batch, device)
        x, y = batch["image"], batch["label"]
        if mixup is not None:
            x, y = mixup(x, y)
        logits = engine(x.to(dtype))
        return {"loss": criterion(logits.float(), y)}

    def after_step(st):
        if model_ema is not None:
            model_ema.update(engine.module, cfg["optim"]["model_ema"])

    def on_epoch_end(st: TrainState):
        if val is None:
            return
        result = evaluate(engine.module, val, device, dtype, amp)
        values = {f"val_{k}": v for k, v in result.items()}
        if model_ema is not None:  # evaluated like the trained weights: cast to their dtype, or autocast
            ema_result = evaluate(model_ema.module if amp else model_ema.module.to(dtype), val, device, dtype, amp)
            model_ema.module.float()
            values.update({f"val_ema_{k}": v for k, v in ema_result.items()})
        metrics.scalars(st.step, values)
        log.info("epoch %d: top-1 %.2f top-5 %.2f (%d images)", st.epoch, result["top1"], result["top5"],
                 result["count"])
        if result["top1"] > st.best_top1:
            st.best_top1 = result["top1"]
            export_weights(engine, {**cfg, "checkpoint": {**cfg["checkpoint"], "export_official": False}},
                           os.path.join(run_dir, "best"), rank)
        st.extra["last_eval"] = result

    try:
        state = train_loop(engine, loader, step_fn, state, schedule, optimizer, total_steps=total_steps,
                           global_batch=total_batch, ckpt=ckpt, cfg=cfg, metrics=metrics, world=world, device=device,
                           flops_per_sample=None, after_step=after_step, on_epoch_end=on_epoch_end, ema=model_ema)
        on_epoch_end(state)
        ckpt.save(engine, state.step, _client_state(state, loader, world, model_ema))
        export_weights(engine, cfg, run_dir, rank)
    finally:
        metrics.close()
    return state


def run_eval(cfg: dict) -> dict:
    rank, world, local_rank, device = init_distributed()
    setup_logging(rank)
    if not cfg["model"]["init"]:
        raise ConfigError("evaluation needs model.init (the weights to evaluate)")
    model = build_classifier(cfg)
    load_init_weights(model, cfg["model"]["init"])
    model.to(device)
    val = build_val_loader(cfg, rank, world, device)
    result = evaluate(model, val, device, torch.float32)
    log.info("top-1 %.2f top-5 %.2f (%d images)", result["top1"], result["top5"], result["count"])
    return result
