"""``itpn-demo``: the README's main command. On a machine with no GPU and no network it
builds the demo shards, pre-trains a tiny iTPN with a tiny CLIP teacher (CLIP-MFM) under the
DeepSpeed launcher (2 ranks, ZeRO-2; CPU ranks with gloo when there is no GPU), fine-tunes
it the same way, and prints top-1 on the demo validation split as its last line:
``demo top-1: <percent>``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..engine.config import ConfigError, load_config
from ..engine.preflight import preflight
from ..engine.runner import free_port


def _launch(module: str, recipe: str, overrides: list[str], ranks: int) -> None:
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module,
           "--config", recipe, *overrides]
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"itpn-demo: {module} failed with exit code {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the data, runs and weights (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs if there are enough, else CPU ranks)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to both stages")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    import torch
    ranks = args.ranks
    if torch.cuda.is_available():
        ranks = min(ranks, torch.cuda.device_count())

    data = out / "data"
    common = [*args.overrides]
    pre = [f"run_dir={out / 'pretrain'}", f"data.train={data / 'train'}", *common]
    fine = [f"run_dir={out / 'finetune'}", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
            f"model.init={out / 'pretrain' / 'weights' / 'model.pt'}", *common]

    from data_prep.demo import build_demo
    build_demo(str(data), progress=False)
    # Both stages are checked before any process starts.
    try:
        cfg = load_config("demo", pre)
        preflight(cfg, ranks)
        # The pre-trained weights do not exist yet; everything else about stage 2 is checked.
        fcfg = load_config("demo_finetune", [o for o in fine if not o.startswith("model.init=")] + ["model.init=null"])
        preflight(fcfg, ranks)
    except ConfigError as e:
        print(f"itpn-demo: configuration error: {e}", file=sys.stderr)
        return 2

    _launch("itpn.cli.pretrain", "demo", pre, ranks)
    _launch("itpn.cli.finetune", "demo_finetune", fine, ranks)
    rows = [json.loads(line) for line in open(out / "finetune" / "metrics.jsonl")]
    top1 = [r["val_top1"] for r in rows if "val_top1" in r]
    if not top1:
        print("itpn-demo: the fine-tuning run logged no evaluation", file=sys.stderr)
        return 1
    print(f"demo top-1: {top1[-1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
