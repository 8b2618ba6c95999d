"""``itpn-linprobe`` (also ``deepspeed --module itpn.cli.linprobe``): a thin entry point."""

from __future__ import annotations

import sys

from .common import run_task


def main(argv: list[str] | None = None) -> int:
    return run_task("linprobe", argv)


if __name__ == "__main__":
    sys.exit(main())
