"""Layered run configuration: defaults, then a recipe file, then command-line overrides
(style habit 7). The merged result and the git revision are written into the run folder.

Every key of a recipe or an override must exist in ``configs/defaults.yaml``: a typo is an
error that names the key and the file, not a silently ignored setting. DeepSpeed settings
come from the JSON fragments in ``ds_configs/``; batch sizes are computed here, in one place,
and asserted: ``train_batch_size == micro_batch * grad_accum * world_size``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("ITPN_CONFIG_DIR", REPO / "configs"))
DS_CONFIG_DIR = Path(os.environ.get("ITPN_DS_CONFIG_DIR", REPO / "ds_configs"))


class ConfigError(ValueError):
    """A configuration problem, raised before any worker starts."""


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe by path, or by name in configs/ (``clip_b16_300e`` -> configs/clip_b16_300e.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml") if q.stem != "defaults")
    raise ConfigError(f"unknown recipe {name_or_path!r}: not a file, and not one of {known}")


def merge(base: dict, update: dict, source: str, path: str = "") -> dict:
    """Recursive merge; every key of ``update`` must exist in ``base`` (except under keys
    whose default is an empty mapping, which are free-form)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = f"{path}{key}"
        if key not in out:
            raise ConfigError(f"{source}: unknown key '{full}'")
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, source, full + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node: Any = value
    for part in reversed(key.strip().split(".")):
        node = {part: node}
    return node


def load_config(recipe: str | None, overrides: list[str] = ()) -> dict:
    """defaults.yaml <- recipe (which may name a ``base`` recipe of its own) <- overrides."""
    if not (CONFIG_DIR / "defaults.yaml").is_file():
        raise ConfigError(f"no configs/defaults.yaml at {CONFIG_DIR}: install from a checkout (pip install -e .) "
                          f"or point ITPN_CONFIG_DIR / ITPN_DS_CONFIG_DIR at the repository's configs/ and ds_configs/")
    cfg = _load_yaml(CONFIG_DIR / "defaults.yaml")
    layers: list[tuple[dict, str]] = []
    seen = set()
    while recipe:
        path = resolve_recipe(recipe)
        if path in seen:
            raise ConfigError(f"recipe inheritance loops at {path}")
        seen.add(path)
        data = _load_yaml(path)
        layers.append((data, str(path)))
        recipe = data.pop("base", None)
    for data, source in reversed(layers):
        cfg = merge(cfg, data, source)
    for text in overrides:
        cfg = merge(cfg, parse_override(text), f"command-line override {text!r}")
    return cfg


def load_ds_fragments(names: list[str]) -> dict:
    out: dict = {}
    for name in names:
        path = DS_CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
            raise ConfigError(f"unknown DeepSpeed fragment {name!r} ({path}); known: {known}")
        with open(path) as f:
            out = _deep_update(out, json.load(f))
    return out


def _deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def batch_sizes(cfg: dict, world_size: int) -> dict:
    """micro batch per GPU, accumulation and global batch, checked against each other.

    A recipe gives ``data.batch_size`` (micro batch per GPU) and either
    ``deepspeed.grad_accum`` or ``optim.total_batch`` (then accumulation is derived)."""
    micro = int(cfg["data"]["batch_size"])
    accum = cfg["deepspeed"]["grad_accum"]
    total = cfg["optim"]["total_batch"]
    if micro <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {micro}")
    if accum is None and total is None:
        accum = 1
    if accum is None:
        if total % (micro * world_size):
            raise ConfigError(f"optim.total_batch={total} is not a multiple of data.batch_size={micro} x "
                              f"world size {world_size}")
        accum = total // (micro * world_size)
    if total is None:
        total = micro * accum * world_size
    if total != micro * accum * world_size:
        raise ConfigError(f"inconsistent batch arithmetic: optim.total_batch={total} but data.batch_size={micro} x "
                          f"deepspeed.grad_accum={accum} x world size {world_size} = {micro * accum * world_size}")
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": int(accum),
            "train_batch_size": int(total)}


def deepspeed_config(cfg: dict, world_size: int) -> dict:
    ds = load_ds_fragments(cfg["deepspeed"]["fragments"])
    ds.update(batch_sizes(cfg, world_size))
    # Always explicit: DeepSpeed's own default (0.19: GRADIENT_CLIPPING_DEFAULT = 1.0) would
    # silently clip the recipes that ask for none (pixel MIM, fine-tuning, linear probing).
    ds["gradient_clipping"] = float(cfg["optim"]["clip_grad"] or 0.0)
    ds["steps_per_print"] = 10 ** 9  # our logger speaks; DeepSpeed's would interleave
    ds["wall_clock_breakdown"] = False
    # DeepSpeed's throughput timer (on by default) synchronises the device at every forward
    # and every step; our loop measures throughput over its logging interval instead.
    ds["timers"] = {"throughput": {"enabled": False}}
    enabled = [k for k in ("bf16", "fp16", "torch_autocast") if ds.get(k, {}).get("enabled")]
    if len(enabled) > 1:
        raise ConfigError(f"deepspeed.fragments {cfg['deepspeed']['fragments']} enable {' and '.join(enabled)}: "
                          f"choose one precision fragment ({', '.join(PRECISION_FRAGMENTS)})")
    if "torch_autocast" in enabled and ds["torch_autocast"].get("dtype", "bfloat16") != "bfloat16":
        raise ConfigError(f"deepspeed.fragments {cfg['deepspeed']['fragments']}: torch_autocast.dtype "
                          f"{ds['torch_autocast']['dtype']!r} is not supported (bfloat16 only: fp16 would need a "
                          "loss scaler)")
    return ds


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The fragments of ds_configs/ that set the precision; a config takes one of them.
PRECISION_FRAGMENTS = (*DTYPES, "bf16_autocast")


def autocast_weights(ds: dict) -> bool:
    """fp32 weights under bf16 autocast (``bf16_autocast``), rather than DeepSpeed's bf16 weights
    with fp32 master copies: code that calls the module outside the engine's forward (evaluation,
    EMA) must open the autocast itself."""
    return bool(ds.get("torch_autocast", {}).get("enabled"))


def precision(ds: dict) -> str:
    """The dtype the model computes in (its inputs are cast to it; the teacher runs in it)."""
    if ds.get("bf16", {}).get("enabled") or autocast_weights(ds):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_config(cfg: dict, ds: dict, run_dir: str | os.PathLike) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"git_revision": git_revision(), "config": cfg, "deepspeed": ds}
    tmp = run_dir / "config.yaml.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(record, f, sort_keys=False)
    os.replace(tmp, run_dir / "config.yaml")
