"""Shared command-line handling of the training commands: a recipe, key=value overrides,
and the arguments launchers add (``--local_rank``)."""

from __future__ import annotations

import argparse
import os
import sys

from ..engine.config import ConfigError, load_config
from ..engine.preflight import preflight


def parse(task: str, argv: list[str] | None, default_recipe: str) -> dict:
    p = argparse.ArgumentParser(prog=f"itpn-{task}", description=f"iTPN {task} under DeepSpeed. Runs as a console "
                                f"command, as `deepspeed [launcher args] --module itpn.cli.{task} ...` or under "
                                f"torchrun.")
    p.add_argument("--config", default=default_recipe, help="recipe name in configs/ or a YAML path")
    p.add_argument("--run-dir", help="shorthand for run_dir=...")
    p.add_argument("--resume", help="auto | none | a checkpoint folder (shorthand for checkpoint.resume=...)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        cfg["task"] = task  # the command decides what runs
        preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except (ConfigError, FileNotFoundError) as e:
        print(f"itpn-{task}: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.check:
        print(f"itpn-{task}: configuration OK")
        raise SystemExit(0)
    return cfg


#: task -> the recipe used when --config is not given.
DEFAULT_RECIPES = {"pretrain": "clip_b16_300e", "finetune": "finetune_b", "linprobe": "linprobe",
                   "eval": "finetune_b"}


def run_task(task: str, argv: list[str] | None = None) -> int:
    """Parse, check, and run one of the training commands."""
    cfg = parse(task, argv, DEFAULT_RECIPES[task])
    from ..engine import runner
    if task == "pretrain":
        runner.run_pretrain(cfg)
    elif task in ("finetune", "linprobe"):
        runner.run_finetune(cfg, linprobe=task == "linprobe")
    else:
        runner.run_eval(cfg)
    return 0
