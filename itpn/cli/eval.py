"""``itpn-eval``: a thin entry point; the work is in itpn.engine.runner."""

from __future__ import annotations

import sys

from .common import parse


def main(argv: list[str] | None = None) -> int:
    cfg = parse("eval", argv, "finetune_b")
    from ..engine.runner import run_eval
    run_eval(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
