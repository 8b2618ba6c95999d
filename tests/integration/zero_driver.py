"""Driver for test_deepspeed.py: trains the demo CLIP-MFM objective for a few steps on a
fixed global batch, split across the ranks, through the engine's own builders and
``deepspeed.initialize``, once per ZeRO stage; writes the global mean loss of each step.
First it records, per rank, whether DeepSpeed's CPU shared-memory buffer is still in /dev/shm
after ``init_distributed`` and what DeepSpeed's shared-memory all-reduce sums after that."""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from itpn.engine.build import apply_block_options, build_objective
from itpn.engine.config import deepspeed_config, load_config
from itpn.engine.param_groups import param_groups
from itpn.engine.runner import _engine, _optimizer, init_distributed, shm_buffer_path
from itpn.layers.block import dynamo_counts

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--stages", nargs="+", default=["1", "2", "3", "3ckpt", "3offload", "2compile", "3compile", "3ema", "1fp8", "3fp8"],
               help="ZeRO stages; '3ckpt': ZeRO-3 with activation checkpointing on every block; "
                    "'3offload': ZeRO-3 with parameters and optimizer offloaded to the host (CPU AdamW); "
                    "'Ncompile': compiled blocks (dynamo + AOTAutograd, no inductor); "
                    "'Nema': pixel MIM + EMA-teacher MFM, the EMA updated through ZeRO gathers; "
                    "'Nfp8': bf16 weights (DeepSpeed's bf16) and FP8 matmuls in the transformer blocks")
p.add_argument("--steps", type=int, default=4)
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

rank, world, _, device = init_distributed()
from deepspeed.comm import comm as ds_comm  # noqa: E402  (its backend, cdb, is set by init_distributed)

summed = torch.full((8,), float(rank + 1))
ds_comm.inference_all_reduce(summed)  # through the shm buffers of every rank, when the CPU has the kernel
shm = {"left": os.path.exists(shm_buffer_path(rank)), "sum": summed.tolist(),
       "shm_kernel": getattr(ds_comm.cdb, "shm_vector_kernel_level", 0) >= 1
       and hasattr(getattr(torch.ops, "deepspeed", None), "inference_all_reduce_")}
shm_by_rank = [None] * world
dist.all_gather_object(shm_by_rank, shm)
GLOBAL = 4
results, dynamo = {}, {}
for stage in args.stages:
    torch._dynamo.reset()  # each compiled stage traces and compiles its blocks afresh
    counters.clear()
    pixel = ["objective.kind=pixel", "objective.mfm_weight=0.3", "objective.decoder_dim=64",
             "objective.decoder_depth=1", "objective.decoder_heads=4"] if stage.endswith("ema") else []
    zero = "zero3_offload" if stage.endswith("offload") else f"zero{stage[0]}"
    fp8 = stage.endswith("fp8")
    cfg = load_config("demo", [f"deepspeed.fragments=[{zero}, {'bf16' if fp8 else 'fp32'}]", f"data.batch_size={GLOBAL // world}",
                               "optim.clip_grad=null", *pixel])
    torch.manual_seed(0)
    objective = build_objective(cfg)  # no teacher: fixed targets below
    if stage.endswith("ckpt"):
        assert apply_block_options(objective, 1, True, False) > 0
    if stage.endswith("compile"):  # dynamo + AOTAutograd without inductor's (slow on CPU) code generation
        apply_block_options(objective, 1, False, True, {"backend": "aot_eager"})
    if fp8:
        apply_block_options(objective, 1, False, False, fp8=True)
    ds_cfg = deepspeed_config(cfg, world)
    opt = _optimizer(param_groups(objective, 0.05), cfg, device, ds_cfg)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    engine = _engine(objective, cfg, ds_cfg, opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL, 3, 64, 64, generator=g)
    mask = torch.rand(GLOBAL, 16, generator=g) < 0.4
    targets = torch.randn(GLOBAL, 16, 512, generator=g)
    if pixel:  # exactly 12 of 16 patches masked per sample
        mask = torch.rand(GLOBAL, 16, generator=g).argsort(1) < 12
    part = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    if fp8:
        x, targets = x.bfloat16(), targets.bfloat16()
    gather = None
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        gather = lambda ps: deepspeed.zero.GatheredParameters(ps)  # noqa: E731
    losses = []
    for _ in range(args.steps):
        out = engine(x[part], mask[part]) if pixel else engine(x[part], mask[part], targets=targets[part])
        engine.backward(out["loss"])
        engine.step()
        if pixel:
            objective.ema.update(engine.module.encoder, 0.5, gather)
        loss = out["loss"].detach().float()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    if pixel:  # a fingerprint of the EMA weights after the last update
        losses.append(sum(p.double().square().sum().item() for p in objective.ema.module.parameters()))
    results[stage] = losses
    if stage.endswith("compile"):  # what dynamo made of the compiled blocks in this stage
        dynamo[stage] = dynamo_counts()
    del engine
if rank == 0:
    with open(args.out, "w") as f:
        json.dump({"world": world, "losses": results, "dynamo": dynamo, "shm": shm_by_rank}, f)
