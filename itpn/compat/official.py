"""``from_official``: build our module from a released iTPN checkpoint and the reference
constructor's arguments, reproducing the released code's outputs (reference doc, sections 4-5).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..models import ITPN, HiViTConfig
from ..objectives.clip_mfm import ClipMFM
from ..objectives.pixel_mim import PixelMIM
from .convert import KINDS, load_checkpoint_file, official_depths, official_to_ours, unwrap_state_dict

log = logging.getLogger(__name__)

# Reference arguments that do not change an eval-mode forward pass (dropout, drop path,
# checkpointing, initialisation) or that only restate what the checkpoint already fixes.
_IGNORED = {"drop_rate", "attn_drop_rate", "drop_path_rate", "use_checkpoint", "init_cfg",
            "frozen_stages", "num_outs", "init_scale", "use_mean_pooling", "norm_layer",
            "layer_norm_eps", "patch_norm", "qk_scale", "inner_patches", "in_chans", "pretrained",
            "teacher", "norm_pix_loss"}


def _backbone_config(kw: dict, sd: Mapping[str, torch.Tensor], kind: str) -> HiViTConfig:
    d1, d2, d3 = official_depths(sd)
    if "mlp_depth" in kw:
        kw.setdefault("mlp_depth1", kw["mlp_depth"])
        kw.setdefault("mlp_depth2", kw.pop("mlp_depth"))
    given = (kw.pop("mlp_depth1", d1), kw.pop("mlp_depth2", d2), kw.pop("depth", d3))
    if given != (d1, d2, d3):
        raise ValueError(f"arguments say depths {given} but the checkpoint holds {(d1, d2, d3)}")
    embed_dim = sd["patch_embed.proj.weight"].shape[0] * 4
    if kw.setdefault("embed_dim", embed_dim) != embed_dim:
        raise ValueError(f"embed_dim={kw['embed_dim']} but the checkpoint's stage-3 width is {embed_dim}")
    if kw.get("qk_scale") not in (None, (kw["embed_dim"] // kw.get("num_heads", 1)) ** -0.5):
        raise ValueError(f"qk_scale={kw['qk_scale']} is not supported (attention scale is head_dim^-0.5)")
    has_rpe = f"blocks.{d1 + d2 + 2}.attn.relative_position_bias_table" in sd
    has_ape = "absolute_pos_embed" in sd
    if kw.get("rpe", has_rpe) != has_rpe or kw.get("ape", has_ape) != has_ape:
        raise ValueError(f"arguments rpe={kw.get('rpe')}, ape={kw.get('ape')} disagree with the checkpoint "
                         f"(relative bias present: {has_rpe}, absolute embedding present: {has_ape})")
    has_ls = f"blocks.{d1 + d2 + 2}.gamma_1" in sd
    init_values = kw.pop("init_values", None)
    if "num_heads" not in kw:
        raise ValueError("num_heads is required (a checkpoint cannot tell it)")
    cfg = HiViTConfig(
        img_size=kw.pop("img_size", 224), patch_size=kw.pop("patch_size", 16), embed_dim=kw.pop("embed_dim"),
        depths=(d1, d2, d3), num_heads=kw.pop("num_heads"), stem_mlp_ratio=kw.pop("bridge_mlp_ratio", 3.0),
        mlp_ratio=kw.pop("mlp_ratio", 4.0), qkv_bias=kw.pop("qkv_bias", True), ape=has_ape, rpe=has_rpe,
        layer_scale=(init_values or 0.1) if has_ls else None)
    kw.pop("rpe", None), kw.pop("ape", None)
    return cfg


def from_official(checkpoint, kind: str, **official_kwargs) -> nn.Module:
    """Our eval-mode module with the released weights loaded.

    checkpoint: a path, or a dict such as {"model": state_dict}; kind: "classifier",
    "clip_distill" or "pixel_mim"; official_kwargs: the reference constructor's arguments
    (img_size, embed_dim, mlp_depth1/mlp_depth2 or mlp_depth, depth, num_heads, fpn_dim,
    fpn_depth, teacher_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, num_classes,
    init_values, rpe, ...).

    Forward contracts: classifier ``m(x)`` -> logits, ``m.forward_features(x)`` -> (B, N, C);
    clip_distill ``m(x, mask)`` -> {"pyramid", "mfm", "aux", ...} with the released stage-1/2
    masking; pixel_mim ``m(x, mask)`` -> {"pred", "loss", ...} with the released position
    embedding resize.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if isinstance(checkpoint, (str, os.PathLike)):
        sd = load_checkpoint_file(checkpoint)
    else:
        sd = unwrap_state_dict(checkpoint)
    kw = dict(official_kwargs)
    cfg = _backbone_config(kw, sd, kind)
    if kind == "classifier":
        num_classes = kw.pop("num_classes", sd["head.weight"].shape[0] if "head.weight" in sd else 1000)
        model = ITPN(cfg, num_classes=num_classes)
    elif kind == "clip_distill":
        model = ClipMFM(cfg, teacher_dim=kw.pop("teacher_dim", sd["lm_head.weight"].shape[0]),
                        fpn_dim=kw.pop("fpn_dim", 256), fpn_depth=kw.pop("fpn_depth", 1),
                        stem_masking="released")
    else:
        model = PixelMIM(cfg, fpn_dim=kw.pop("fpn_dim", 256), fpn_depth=kw.pop("fpn_depth", 2),
                         decoder_dim=kw.pop("decoder_embed_dim", 512), decoder_depth=kw.pop("decoder_depth", 8),
                         decoder_heads=kw.pop("decoder_num_heads", 16),
                         norm_pix_loss=kw.pop("norm_pix_loss", True), pos_embed_quirk=True)
    unused = set(kw) - _IGNORED
    if unused:
        raise TypeError(f"from_official({kind!r}): unsupported reference argument(s) {sorted(unused)}")
    ours = official_to_ours(sd, kind)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise KeyError(f"{kind} checkpoint does not fit the model built from the arguments: "
                       f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    return model.eval()
