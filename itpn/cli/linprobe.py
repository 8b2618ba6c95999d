"""``itpn-linprobe``: a thin entry point; the work is in itpn.engine.runner."""

from __future__ import annotations

import sys

from .common import parse


def main(argv: list[str] | None = None) -> int:
    cfg = parse("linprobe", argv, "linprobe")
    from ..engine.runner import run_finetune
    run_finetune(cfg, linprobe=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
