"""``itpn-pretrain``: a thin entry point; the work is in itpn.engine.runner."""

from __future__ import annotations

import sys

from .common import parse


def main(argv: list[str] | None = None) -> int:
    cfg = parse("pretrain", argv, "clip_b16_300e")
    from ..engine.runner import run_pretrain
    run_pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
