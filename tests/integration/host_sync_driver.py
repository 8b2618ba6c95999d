"""Driver for test_host_sync.py, run by the deepspeed launcher on 2 CPU ranks.

1. The optimizer step of our DeepSpeed engine (built by the trainer's own _optimizer /
   _engine / deepspeed_config) against torch's AdamW on the whole batch in one process:
   without clipping, and with clipping (our device-side clip replaces DeepSpeed's; without
   ZeRO, torch's), over steps whose loss scales differ 1000-fold so that clipping changes the
   trajectory; with clipping, the engine's gradient norm is the reference's.
2. The real pre-training loop (``run_pretrain``, ZeRO-2, bf16, fused AdamW; CLIP-MFM with
   clipping, pixel MIM + EMA without; CLIP-MFM with fp32 weights under bf16 autocast without
   ZeRO) under HostSyncWatch: every host read of a tensor value outside the log step is
   recorded; then the fine-tuning loop (mixup, model EMA) the same way.
"""

import argparse
import copy
import json

import torch
import torch.distributed as dist
from torch import nn

from itpn.engine.config import deepspeed_config, load_config
from itpn.engine.host_sync import HostSyncWatch, foreach_grad_norm
from itpn.engine.param_groups import param_groups
from itpn.engine.runner import _engine, _optimizer, init_distributed, run_finetune, run_pretrain

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--data", required=True)
p.add_argument("--run-dir", required=True)
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

rank, world, _, device = init_distributed()
GLOBAL, LR, SCALES = 8, 1e-2, (1.0, 30.0, 0.03, 1.0)
result = {"arith": {}}

for zero, clip in [(z, c) for c in (None, 0.05) for z in ("zero1", "zero2", "zero0")]:
    cfg = load_config("demo", [f"deepspeed.fragments=[{zero}, fp32, clip_grad]", f"data.batch_size={GLOBAL // world}",
                               f"optim.clip_grad={'null' if clip is None else clip}"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    ds_cfg = deepspeed_config(cfg, world)
    opt = _optimizer(param_groups(model, 0.05), cfg, device, ds_cfg)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.05), lr=LR, betas=tuple(cfg["optim"]["betas"]),
                                eps=cfg["optim"]["eps"], weight_decay=0.05)
    for g in opt.param_groups:
        g["lr"] = LR
    engine = _engine(model, cfg, ds_cfg, opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL, 8, generator=g)
    part = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    norms, engine_norms = [], []
    for scale in SCALES:
        loss = engine(x[part]).square().mean() * scale
        engine.backward(loss)
        engine.step()
        gn = engine.get_global_grad_norm()
        engine_norms.append(None if gn is None else float(gn))
        ref_loss = ref(x).square().mean() * scale
        ref_loss.backward()
        norms.append(float(nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else float("inf"))))
        ref_opt.step()
        ref_opt.zero_grad()
    err = max(((a.detach() - b.detach()).abs().max() / b.detach().abs().max()).item()
              for a, b in zip(engine.module.parameters(), ref.parameters()))
    result["arith"][f"{zero}/clip={clip}"] = {"max_rel_err": err, "ref_grad_norms": norms, "grad_norms": engine_norms}
    del engine

# CLIP-MFM with clipping (the CLIP recipes), and pixel MIM + EMA-teacher MFM without (the
# pixel recipes; the EMA update runs after every step). The reconstruction image written
# every log.image_every_steps reads the batch on purpose; pixel MIM checks the mask's
# per-sample counts only when the mask is on the CPU (never on a GPU: it would be a sync).
PIXEL = ["objective.kind=pixel", "objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=4",
         "objective.mfm_weight=0.3", "data.mask_kind=random", "optim.clip_grad=null", "log.image_every_steps=2"]
COMMON = ["optim.epochs=0.4", "optim.fused=true", "log.every_steps=3", "log.tensorboard=false",
          "checkpoint.every_steps=1000"]


def watched_loop(run, cfg) -> dict:
    watch = HostSyncWatch(ignore=("_log_step", "_check_finite", "mim_grid", "_check_keep_counts", "_norm_constants"))
    with watch:
        state = run(cfg)
    # Reads inside the loop's steps; the loader's own bookkeeping in the main process (torch's
    # DataLoader seeding its workers) reads host tensors only.
    watch.calls = [(n, s, d) for n, s, d in watch.calls
                   if any(f.name == "train_loop" for f in s) and not any("torch/utils/data" in f.filename for f in s)]
    return dict(steps=state.step, syncs=len(watch.calls), report=watch.report(6),
                last_eval=state.extra.get("last_eval"))


# Our gradient norm (one _foreach_norm, foreach_grad_norm) against DeepSpeed's own loop on the
# same reduced gradients of each rank's partition, fp32 and bf16 weights, ZeRO-1 and ZeRO-2.
result["norms"], result["views"] = {}, {}


def views_of_flat(opt) -> bool:
    """Whether every parameter's data lies in its group's flat buffer (keep_bit16_views)."""
    return all(flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
               for flat, params in zip(opt.bit16_groups_flat, opt.bit16_groups) for p in params)


for zero, dtype in [(z, d) for z in ("zero1", "zero2") for d in ("fp32", "bf16")]:
    cfg = load_config("demo", [f"deepspeed.fragments=[{zero}, {dtype}, clip_grad]", f"data.batch_size={GLOBAL // world}"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    ds_cfg = deepspeed_config(cfg, world)
    engine = _engine(model, cfg, ds_cfg, _optimizer(param_groups(model, 0.05), cfg, device, ds_cfg))
    opt, pairs = engine.optimizer, []
    x = torch.randn(GLOBAL, 8, generator=torch.Generator().manual_seed(2)).to(engine.module[0].weight.dtype)
    part = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    for scale in SCALES:
        engine.backward(engine(x[part]).float().square().mean() * scale)
        ours = float(opt.scaled_global_norm())
        del opt.get_grad_norm_direct  # DeepSpeed's method again, then ours back
        theirs = float(opt.scaled_global_norm())
        foreach_grad_norm(opt)
        pairs.append([ours, theirs])
        engine.step()
    result["norms"][f"{zero}/{dtype}"] = pairs
    # keep_bit16_views: a parameter whose .data something replaced is pointed at the flat
    # buffer again by the next step, and sees that step's update
    weight = engine.module[0].weight
    views = [views_of_flat(opt)]
    weight.data = weight.data.clone()
    views.append(views_of_flat(opt))
    for group in opt.param_groups:
        group["lr"] = LR
    before = weight.detach().clone()
    engine.backward(engine(x[part]).float().square().mean())
    engine.step()
    views += [views_of_flat(opt), not torch.equal(before, weight.detach())]
    result["views"][f"{zero}/{dtype}"] = views
    del engine

# flat_zero1_reduction (installed by _engine) against DeepSpeed's own ZeRO-1 reduction (the
# instance's methods removed): the gradient partition each rank's step receives and the weights
# after it, step by step, fp32 and bf16 weights, reduce-scatter on and off, 2 micro-batches per
# step, one parameter the forward never uses; and the reduction bucket DeepSpeed allocates at
# the first gradient hook of a backward, seen from the end of that backward.
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5), nn.LayerNorm(5), nn.Linear(5, 3))
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        return self.body(x)


def step_gradients(opt) -> list:
    """Each group's gradient partition as the step will read it (ours pre-flattened)."""
    parts = [getattr(g, "flat_partition", None) for g in opt.averaged_gradients.values()]
    return [v for p, g in zip(parts, opt.averaged_gradients.values())
            for t in ([p] if p is not None else g) for v in t.float().reshape(-1).tolist()]


result["flat"] = {}
# DeepSpeed's averaging options too: the gradients divided before the collective
# (prescale_gradients) or pre-divided by a factor and scaled after it
SCALING = {"": {}, "/prescale": {"prescale_gradients": True}, "/predivide=4": {"gradient_predivide_factor": 4.0}}
for dtype, scatter, scaling in [*((d, s, "") for d in ("fp32", "bf16") for s in (True, False)),
                                ("bf16", True, "/prescale"), ("bf16", True, "/predivide=4")]:
    runs = {}
    for reduction in ("ours", "deepspeed"):
        cfg = load_config("demo", [f"deepspeed.fragments=[zero1, {dtype}, clip_grad]", "deepspeed.grad_accum=2",
                                   f"data.batch_size={GLOBAL // world // 2}"])
        torch.manual_seed(0)
        model = WithUnused()
        ds_cfg = deepspeed_config(cfg, world)
        ds_cfg["zero_optimization"]["reduce_scatter"] = scatter
        ds_cfg.update(SCALING[scaling])
        engine = _engine(model, cfg, ds_cfg, _optimizer(param_groups(model, 0.05), cfg, device, ds_cfg))
        opt = engine.optimizer
        for group in opt.param_groups:
            group["lr"] = LR
        installed = "reduce_gradients" in opt.__dict__
        if reduction == "deepspeed":
            del opt.reduce_gradients, opt.setup_buckets
        x = torch.randn(2 * GLOBAL, 8, generator=torch.Generator().manual_seed(3)).to(engine.module.body[0].weight.dtype)
        micro = GLOBAL // world // 2
        grads, weights, buckets = [], [], []
        for step, scale in enumerate(SCALES):
            for m in range(2):
                start = step % 2 * GLOBAL + rank * GLOBAL // world + m * micro
                xb = x[start:start + micro].clone().requires_grad_()
                xb.register_hook(lambda g: buckets.append([len(b.buffer) for b in opt.ipg_buckets.values()]))
                engine.backward(engine(xb).float().square().mean() * scale)
                if m == 1:
                    grads.append(step_gradients(opt))
                engine.step()
            weights.append(torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()]).tolist())
        runs[reduction] = dict(installed=installed, grads=grads, weights=weights, buckets=buckets,
                               scaling=[opt.postscale_gradients, opt.gradient_predivide_factor])
        del engine
    result["flat"][f"{dtype}/reduce_scatter={scatter}{scaling}"] = runs

result["loops"] = {}
# CLIP-MFM also with fp32 weights under bf16 autocast without ZeRO (zero0 + bf16_autocast: torch's
# clip in place of DeepSpeed's, which copied two Python scalars to the device per step).
AUTOCAST = ["deepspeed.fragments=[zero0, bf16_autocast, clip_grad]"]
for name, extra in (("clip", []), ("pixel", PIXEL), ("clip_autocast", AUTOCAST)):
    result["loops"][name] = watched_loop(run_pretrain, load_config("demo", [
        f"data.train={args.data}", f"run_dir={args.run_dir}/{name}", "deepspeed.fragments=[zero2, bf16, clip_grad]",
        "deepspeed.compile=false", "data.num_workers=1", *COMMON, *extra]))
# Fine-tuning: mixup/cutmix, layer decay, a model EMA updated after every step; then with fp32
# weights under bf16 autocast (its evaluation of the weights and of the EMA opens the autocast).
for name, fragments in (("finetune", "[zero2, bf16]"), ("finetune_autocast", "[zero0, bf16_autocast]")):
    result["loops"][name] = watched_loop(run_finetune, load_config("demo_finetune", [
        f"data.train={args.data}", f"data.val={args.data.rsplit('/', 1)[0]}/val", f"run_dir={args.run_dir}/{name}",
        "model.init=null", "optim.model_ema=0.99", f"deepspeed.fragments={fragments}", *COMMON]))
dist.barrier()
if rank == 0:
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
