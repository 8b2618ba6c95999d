"""``itpn-finetune``: a thin entry point; the work is in itpn.engine.runner."""

from __future__ import annotations

import sys

from .common import parse


def main(argv: list[str] | None = None) -> int:
    cfg = parse("finetune", argv, "finetune_b")
    from ..engine.runner import run_finetune
    run_finetune(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
