"""``itpn-convert``: convert checkpoints between the released iTPN key layout and ours.

    itpn-convert to-ours  OFFICIAL.pth OUT.pth --kind clip_distill
    itpn-convert to-official OURS.pth OUT.pth --kind classifier

The output is written to a temporary file and renamed into place, so an interrupted run
never leaves a truncated OUT behind.
"""

from __future__ import annotations

import argparse
import sys

from ..compat.convert import (KINDS, is_official, load_checkpoint_file, official_depths, official_to_ours,
                              ours_to_official)
from ..engine.checkpoint import atomic_torch_save


def _our_depths(sd: dict, kind: str) -> tuple[int, int, int]:
    prefix = "" if kind == "classifier" else "encoder."
    # keys look like "<prefix>stage1.<i>.<...>": the index is the segment after the stage name
    count = {s: len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(f"{prefix}{s}.")})
             for s in ("stage1", "stage2", "blocks")}
    if not all(count.values()):
        raise ValueError(f"not our {kind} layout: stage block counts {count}")
    return count["stage1"], count["stage2"], count["blocks"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to-ours", "to-official"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--kind", choices=KINDS, required=True,
                        help="what the checkpoint holds: a classifier, a CLIP-MFM or a pixel-MIM model")
    args = parser.parse_args(argv)

    sd = load_checkpoint_file(args.src)
    if args.direction == "to-ours":
        if not is_official(sd):
            parser.error(f"{args.src} is not in the official layout")
        out = official_to_ours(sd, args.kind)
        depths = official_depths(sd)
    else:
        if is_official(sd):
            parser.error(f"{args.src} is already in the official layout")
        depths = _our_depths(sd, args.kind)
        out = ours_to_official(sd, args.kind, depths)
    atomic_torch_save({"model": out}, args.dst)
    print(f"wrote {len(out)} tensors ({args.kind}, depths {depths}) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
