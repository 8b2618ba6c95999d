"""Activation memory of the student's training step, per image (issue #6, memory): the bytes
autograd saves for the backward during one forward of a recipe's objective (eager, bf16
autocast), counted by a saved-tensors hook, each storage once, parameters excluded.

The per-image figure is the slope between batch b and 2b, so what does not grow with the
batch (the bf16 copies autocast makes of the weights, the relative-bias tensors) drops out
and is reported separately. Rows: layer scale in the reference's form (gamma times the
branch output) and folded into the output Linears (the default, ``Block.fold_layer_scale``).

On the CPU, attention with an additive bias under autocast takes SDPA's math path in fp32 and
saves fp32 q, k, v and two (B, H, N, N) fp32 score tensors (about 5 MB per iTPN-L block and
image); on CUDA the memory-efficient kernel saves bf16 q, k, v, its output and log-sum-exp.
The CPU's per-image figure is therefore higher than the GPU's; the difference between the
rows does not depend on it.

    python benchmarks/bench_activations.py [--recipe clip_l] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from itpn.cli.bench import RECIPES, load_recipe, make_batch
from itpn.engine.build import apply_block_options, build_objective
from itpn.models.flops import saved_activation_bytes
from itpn.objectives.clip_teacher import target_width


def saved_bytes(model, x, mask, targets, device) -> int:
    kwargs = {} if targets is None else {"targets": targets}

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(x, mask, **kwargs)
    return saved_activation_bytes(forward, model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="clip_l")
    p.add_argument("--batch", type=int, default=2, help="b: the slope is taken between b and 2b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_recipe(args.recipe)
    clip = cfg["objective"]["kind"] == "clip"
    width = target_width(cfg["teacher"]["arch"]) if clip else 0  # random targets; no teacher is built
    cfg["objective"]["teacher_dim"] = width
    torch.manual_seed(0)
    model = build_objective(cfg).to(device).train()
    print(f"recipe {args.recipe}, {device.type}, bf16 autocast, batch {args.batch} and {2 * args.batch}")
    print(f"{'layer scale':16s} {'MiB per image':>14s} {'MiB fixed':>10s}")
    for fold in (False, True):
        apply_block_options(model, 0, False, False, fold_layer_scale=fold)
        sizes = []
        for b in (args.batch, 2 * args.batch):
            x, mask, _ = make_batch(cfg, b, device)
            targets = torch.randn(b, mask.shape[1], width, device=device) if clip else None
            sizes.append(saved_bytes(model, x, mask, targets, device))
        per_image = (sizes[1] - sizes[0]) / args.batch
        fixed = sizes[0] - per_image * args.batch
        print(f"{'folded' if fold else 'reference form':16s} {per_image / 2**20:14.1f} {fixed / 2**20:10.1f}")


if __name__ == "__main__":
    main()
