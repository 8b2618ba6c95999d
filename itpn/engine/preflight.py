"""Checks that run before any process group exists: a bad config fails every rank at once,
in seconds, with a message that names the problem (instead of a hang or a stack trace
from inside a collective)."""

from __future__ import annotations

import os

import torch

from .build import backbone_config
from .config import ConfigError, deepspeed_config


def _check_shards(path: str | None, key: str) -> None:
    if not path:
        raise ConfigError(f"{key} is not set (a folder of shards written by itpn-prep)")
    if not os.path.exists(path):
        raise ConfigError(f"{key}={path}: no such folder")
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                       for f in ("manifest.json", "sizes.json", "_info.json")):
        raise ConfigError(f"{key}={path}: no manifest.json (or sizes.json / _info.json) in it")


def _check_teacher_weights(weights: str | None) -> None:
    if weights is None:
        return
    looks_like_path = os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not os.path.isfile(weights):
        raise ConfigError(f"teacher.weights={weights}: file not found")


def _check_fp8_device() -> None:
    """FP8 GEMMs (``torch._scaled_mm``) need FP8 tensor cores; on an older GPU they fail
    inside the first forward on every rank. The CPU path computes the dequantised product
    and needs nothing."""
    if not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"deepspeed.fp8=true needs FP8 tensor cores (compute capability 8.9+, e.g. H100, "
                          f"L40, RTX 4090); this GPU, {torch.cuda.get_device_name()}, is sm{major}{minor}: "
                          "set deepspeed.fp8=false")


def _check_attention(impl) -> None:
    from ..layers import triton_support
    from ..layers.attention import TRAINING_IMPLS
    if impl not in TRAINING_IMPLS:
        names = ", ".join(TRAINING_IMPLS[:-1]) + f" or {TRAINING_IMPLS[-1]}"
        raise ConfigError(f"deepspeed.attention must be {names}, got {impl!r}")
    if impl == "triton" and not triton_support.available():
        raise ConfigError("deepspeed.attention=triton needs Triton, which this torch build lacks "
                          "(it ships with torch's CUDA builds): set deepspeed.attention=sdpa")


def _check_fused_mlp(value) -> None:
    from ..layers import triton_support
    if not isinstance(value, bool):
        raise ConfigError(f"deepspeed.fused_mlp must be true or false, got {value!r}")
    if value and not triton_support.available():
        raise ConfigError("deepspeed.fused_mlp=true needs Triton, which this torch build lacks "
                          "(it ships with torch's CUDA builds): set deepspeed.fused_mlp=false")


def _check_compile_regions(value) -> None:
    from ..layers.block import COMPILE_REGIONS
    if value not in COMPILE_REGIONS:
        raise ConfigError(f"deepspeed.compile_regions must be {' or '.join(COMPILE_REGIONS)}, got {value!r}")


def _check_activation_memory_budget(ds: dict) -> None:
    from ..layers.block import check_activation_memory_budget
    try:
        budget = check_activation_memory_budget(ds["activation_memory_budget"], "deepspeed.activation_memory_budget")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if budget < 1 and not ds["compile"]:
        raise ConfigError(f"deepspeed.activation_memory_budget={budget:g} decides what compiled blocks save: "
                          "it needs deepspeed.compile=true (or use deepspeed.activation_checkpointing)")


def _check_zero3_linear(cfg: dict, ds: dict) -> None:
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3 and cfg["deepspeed"]["compile"] and zero.get("memory_efficient_linear", True):
        raise ConfigError(
            f"deepspeed.fragments {cfg['deepspeed']['fragments']}: ZeRO-3 with deepspeed.compile=true needs "
            "zero_optimization.memory_efficient_linear=false (ds_configs/zero3*.json set it). DeepSpeed's "
            "replacement of F.linear gets wrong gradients under torch.compile on torch 2.11 (docs/training.md)")


def preflight(cfg: dict, world_size: int) -> dict:
    """Validate a merged config for ``world_size`` ranks; returns the DeepSpeed config."""
    if cfg["task"] not in ("pretrain", "finetune", "linprobe", "eval"):
        raise ConfigError(f"task must be pretrain, finetune, linprobe or eval, got {cfg['task']!r}")
    backbone_config(cfg)
    ds = deepspeed_config(cfg, world_size)
    if cfg["deepspeed"].get("fp8"):
        _check_fp8_device()
    _check_attention(cfg["deepspeed"]["attention"])
    _check_fused_mlp(cfg["deepspeed"]["fused_mlp"])
    _check_compile_regions(cfg["deepspeed"]["compile_regions"])
    _check_activation_memory_budget(cfg["deepspeed"])
    _check_zero3_linear(cfg, ds)
    if cfg["task"] != "eval":
        _check_shards(cfg["data"]["train"], "data.train")
    if cfg["task"] in ("finetune", "linprobe", "eval") and cfg["data"]["val"]:
        _check_shards(cfg["data"]["val"], "data.val")
    if cfg["data"]["normalize"] not in ("device", "worker"):
        raise ConfigError(f"data.normalize must be 'device' or 'worker', got {cfg['data']['normalize']!r}")
    if cfg["task"] == "eval" and not cfg["data"]["val"]:
        raise ConfigError("evaluation needs data.val")
    if cfg["task"] == "pretrain" and cfg["objective"]["kind"] == "clip":
        _check_teacher_weights(cfg["teacher"]["weights"])
    init = cfg["model"]["init"]
    if init and not os.path.isfile(init):
        raise ConfigError(f"model.init={init}: file not found")
    if cfg["task"] == "finetune" and cfg["data"]["batch_size"] % 2 and (cfg["data"]["mixup"] or cfg["data"]["cutmix"]):
        raise ConfigError(f"mixup/cutmix need an even data.batch_size, got {cfg['data']['batch_size']}")
    return ds
