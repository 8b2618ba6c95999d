"""``itpn-models``: list the registered variants with their parameter counts and MACs, and
run one forward pass of a small model as a smoke test (no GPU, no network needed)."""

from __future__ import annotations

import argparse
import sys

import timm
import torch

from ..models import model_names
from ..models.flops import count_macs, count_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--forward", default="itpn_base_patch16_224",
                        help="variant to run one forward pass with (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    print(f"{'model':34s} {'input':>6s} {'params (M)':>11s} {'GMACs':>8s}")
    for name in model_names():
        with torch.device("meta"):
            model = timm.create_model(name)
        size = model.pretrained_cfg["input_size"][-1]
        macs = count_macs(lambda: timm.create_model(name), img_size=size)
        print(f"{name:34s} {size:6d} {count_params(model) / 1e6:11.1f} {macs / 1e9:8.1f}")

    model = timm.create_model(args.forward).eval()
    size = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        out = model(torch.randn(args.batch, 3, size, size))
    shapes = [tuple(o.shape) for o in out] if isinstance(out, list) else tuple(out.shape)
    print(f"forward {args.forward} on ({args.batch}, 3, {size}, {size}) -> {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
