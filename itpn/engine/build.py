"""Everything a run is built from, from the merged config: the student model or
pre-training objective, the frozen teacher, the loaders. No distributed code here."""

from __future__ import annotations

import torch
from torch import nn

from ..models import ITPN, HiViTConfig
from ..models.registry import VARIANTS
from ..objectives.clip_mfm import ClipMFM
from ..objectives.pixel_mim import PixelMIM
from .config import ConfigError


def backbone_config(cfg: dict) -> HiViTConfig:
    m = cfg["model"]
    if m["variant"] == "custom":
        base = HiViTConfig()
    elif m["variant"] in VARIANTS:
        base = VARIANTS[m["variant"]]
    else:
        raise ConfigError(f"model.variant {m['variant']!r} is not one of {sorted(VARIANTS)} or 'custom'")
    try:
        return base.replace(drop_path_rate=m["drop_path_rate"], rpe=m["rpe"], layer_scale=m["layer_scale"],
                            **m["arch"])
    except TypeError as e:
        raise ConfigError(f"model.arch: {e}") from None


def build_objective(cfg: dict, teacher: nn.Module | None = None) -> nn.Module:
    o = cfg["objective"]
    bcfg = backbone_config(cfg)
    if o["kind"] == "clip":
        if teacher is not None and teacher.embed_dim is not None:
            teacher_dim = teacher.embed_dim
        else:
            teacher_dim = o.get("teacher_dim") or 512
        return ClipMFM(bcfg, teacher_dim=teacher_dim, fpn_dim=o["fpn_dim"], fpn_depth=o["fpn_depth"],
                       stem_masking=o["stem_masking"], teacher=teacher)
    if o["kind"] == "pixel":
        return PixelMIM(bcfg, fpn_dim=o["fpn_dim"], fpn_depth=o["fpn_depth"], decoder_dim=o["decoder_dim"],
                        decoder_depth=o["decoder_depth"], decoder_heads=o["decoder_heads"],
                        norm_pix_loss=o["norm_pix_loss"], mfm_weight=o["mfm_weight"],
                        mask_ratio=cfg["data"]["mask_ratio"])
    raise ConfigError(f"objective.kind must be 'clip' or 'pixel', got {o['kind']!r}")


def build_teacher(cfg: dict, dtype: torch.dtype, device) -> nn.Module | None:
    if cfg["objective"]["kind"] != "clip":
        return None
    from ..objectives.clip_teacher import CLIPTeacher
    t = cfg["teacher"]
    teacher = CLIPTeacher(t["arch"], t["weights"], image_size=t["image_size"], dtype=dtype, device=device)
    bcfg = backbone_config(cfg)
    teacher.check_grid(bcfg.grid, bcfg.img_size, bcfg.patch_size)
    if t.get("compile"):
        teacher.compile_blocks(dynamic=False)
    return teacher


def build_classifier(cfg: dict) -> ITPN:
    return ITPN(backbone_config(cfg), num_classes=cfg["model"]["num_classes"])


def pretrain_augment(cfg: dict):
    from ..data import PretrainAugment
    d, bcfg = cfg["data"], backbone_config(cfg)
    return PretrainAugment(input_size=bcfg.img_size, patch_size=bcfg.patch_size,
                           teacher_size=cfg["teacher"]["image_size"] if cfg["objective"]["kind"] == "clip" else None,
                           scale=tuple(d["scale"]), color_jitter=d["color_jitter"], mask=d["mask_kind"],
                           mask_ratio=d["mask_ratio"], normalize=d["normalize"])


def finetune_augment(cfg: dict):
    from ..data import FinetuneAugment
    d, bcfg = cfg["data"], backbone_config(cfg)
    return FinetuneAugment(input_size=bcfg.img_size, auto_augment=d["rand_aug"], re_prob=d["reprob"],
                           normalize=d["normalize"])


def pretrain_loader(cfg: dict, rank: int, world: int, device: torch.device):
    """The recipe's pre-training loader for this rank (pinned memory on CUDA)."""
    from ..data import build_pretrain_loader
    d = cfg["data"]
    return build_pretrain_loader(d["train"], d["batch_size"], pretrain_augment(cfg), rank=rank, world_size=world,
                                 num_workers=d["num_workers"], seed=cfg["seed"], epoch_length=d["epoch_samples"],
                                 pin_memory=device.type == "cuda")


def build_val_loader(cfg: dict, rank: int, world: int, device: torch.device):
    from ..data import build_eval_loader
    d = cfg["data"]
    return build_eval_loader(d["val"], d["batch_size"], input_size=backbone_config(cfg).img_size,
                             crop_pct=d["crop_pct"], normalize=d["normalize"], rank=rank, world_size=world,
                             num_workers=d["num_workers"], pin_memory=device.type == "cuda")


def apply_block_options(module: torch.nn.Module, every: int, enable_ckpt: bool, compile_blocks: bool,
                        compile_options: dict | None = None, fold_layer_scale: bool = True,
                        fp8: bool = False, fused_mlp: bool = False, compile_regions: str = "block",
                        activation_memory_budget: float | None = None) -> int:
    """Activation checkpointing on every ``every``-th block and/or torch.compile per block
    (``Block.compile``: the checkpoint wrapper stays outside the compiled region); layer scale
    folded into the branches' output Linears or not (``Block.fold_layer_scale``); FP8 matmuls
    in the four Linears of every transformer block (``ScaledLinear.fp8``; the C-MLP blocks of
    stages 1-2 and the pyramid, narrow and memory-bound, stay bf16); GELU fused into the GEMMs
    of every MLP (``Mlp.fused``, fused_mlp.py); ``compile_regions``: one compiled region per
    block or per residual branch (``Block.compile``); ``activation_memory_budget``: with
    ``compile_blocks``, what the compiled blocks save for the backward
    (``set_activation_memory_budget``, process-wide; None leaves torch's setting). Returns how
    many blocks are checkpointed."""
    from ..layers import Block, Mlp, ScaledLinear
    from ..layers.block import set_activation_memory_budget
    if compile_blocks and activation_memory_budget is not None:
        set_activation_memory_budget(activation_memory_budget)
    for m in module.modules():
        if isinstance(m, Mlp):
            m.fused = fused_mlp
    blocks = [(name, m) for name, m in module.named_modules() if isinstance(m, Block)]
    n = 0
    for i, (name, blk) in enumerate(blocks):
        blk.fold_layer_scale = fold_layer_scale
        for lname, lin in blk.named_modules():
            if isinstance(lin, ScaledLinear):
                try:
                    lin.fp8 = fp8 and blk.has_attn
                except ValueError as e:
                    raise ValueError(f"{name}.{lname}: {e}") from None
        if enable_ckpt and i % max(every, 1) == 0:
            blk.grad_checkpointing = True
            n += 1
        if compile_blocks:
            blk.compile(compile_regions, **(compile_options or {}))
    return n


def zero3_gather_per_block(module: nn.Module) -> int:
    """Make every block a ZeRO-3 "leaf" (``deepspeed.utils.set_z3_leaf_modules``): DeepSpeed
    then gathers a block's parameters in one hook around the block's forward and backward,
    instead of a hook around each of its submodules (norms, Linears, attention, MLP, drop
    path). A compiled block's region contains those submodules' calls, so without this dynamo
    traces DeepSpeed's hooks: on 2 CPU ranks the demo's ZeRO-3 run made 40 graphs with 270
    graph breaks where ZeRO-2 makes 7 with none, and took 58 s instead of 10 for 4 steps
    (``test_deepspeed.py``, stage ``3compile``). Eager blocks run fewer hooks too: iTPN-L's
    CLIP-MFM objective has 94 hooked modules instead of 568. Call before
    ``deepspeed.initialize``, which installs the hooks. Returns how many blocks were marked."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..layers import Block
    if not any(isinstance(m, Block) for m in module.modules()):
        return 0
    return len(set_z3_leaf_modules(module, [Block]))


def compile_whole(objective: nn.Module, teacher: nn.Module | None = None, options: dict | None = None) -> None:
    """torch.compile of the whole objective (each objective traces as one graph, no breaks,
    tested on CPU) and of the frozen teacher, static shapes. Larger fusion scope than
    ``apply_block_options``' per-block regions (patch merges, pyramid, losses), longer
    compile; the benchmark's ``compile_model`` setting measures it."""
    opts = {"dynamic": False, **(options or {})}
    objective.compile(**opts)
    if teacher is not None:
        teacher.compile(**opts)
