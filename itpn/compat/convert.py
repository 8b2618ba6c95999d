"""Conversion between the released iTPN checkpoints and this package (reference doc,
section 4).

The released code keeps stages 1-2, both patch merges and stage 3 in one flat ``blocks``
list and names the pyramid after its wiring (``align_dim_16to8``, ``split_8to4``, ...). Our
modules use per-stage names. The mapping is derived from the stage depths, which are read
from the checkpoint itself (a merge is the block that has a ``reduction``), so any size
converts, in both directions, from the same rule table.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch

from ..layers import relative_position_index, resize_rel_pos_table
from ..models.hivit import resize_pos_embed

log = logging.getLogger(__name__)

# (official prefix, our prefix) for everything outside the flat block list.
_NECK = [
    ("align_dim_16tofpn", "pyramid.proj16"),
    ("split_16to8", "pyramid.split16"),
    ("block_16to8", "pyramid.blocks8"),
    ("align_dim_16to8", "pyramid.lateral8"),
    ("split_8to4", "pyramid.split8"),
    ("block_8to4", "pyramid.blocks4"),
    ("align_dim_8to4", "pyramid.lateral4"),
    ("fpn_modules", "pyramid.out_blocks"),
    ("decoder_embed", "level_proj.levels"),
    ("mask_token", "mask_token"),
]
_HEADS = {
    "clip_distill": [("norm_cls", "aux_norm"), ("norm", "head_norm"), ("lm_cls_head", "aux_head"),
                     ("lm_head", "mfm_head"), ("cls_pt_layers", "aux_blocks")],
    "pixel_mim": [("decoder_blocks", "decoder.blocks"), ("decoder_pos_embed", "decoder.pos_embed"),
                  ("decoder_norm", "decoder.norm"), ("decoder_pred", "decoder.pred")],
    "classifier": [("fc_norm", "fc_norm"), ("head", "head")],
}
#: Where the backbone lives in each of our modules.
BACKBONE_PREFIX = {"classifier": "", "backbone": "", "dense": "backbone.",
                   "clip_distill": "encoder.", "pixel_mim": "encoder."}
KINDS = ("classifier", "clip_distill", "pixel_mim")
# Keys of the released files that we rebuild instead of loading.
_DERIVED = ("relative_position_index",)


def unwrap_state_dict(checkpoint, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a file's content: {"model": sd}, {"module": sd}, {"state_dict": sd} or sd."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    for key in ("model", "module", "state_dict", "model_ema"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or not sd:
        raise ValueError(f"{source}: not a state dict (non-tensor entries: {bad[:5]})")
    return sd


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its state dict. Released checkpoints also pickle
    their argparse arguments, which safe loading refuses; then the file is read in full
    pickle mode, which runs code from the file: only do that with files you trust."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:  # noqa: BLE001 - any unpickling refusal
        log.warning("%s: safe loading failed (%s); loading with weights_only=False",
                    path, str(safe_err).splitlines()[0][:120])
        obj = torch.load(path, map_location="cpu", weights_only=False)
    return unwrap_state_dict(obj, path)


def is_official(sd: Mapping[str, torch.Tensor]) -> bool:
    return "absolute_pos_embed" in sd or any(re.match(r"blocks\.\d+\.reduction\.", k) for k in sd)


def official_depths(sd: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(d1, d2, d3) from a released state dict: merges are the blocks with a ``reduction``."""
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    merges = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.reduction\.", k))})
    if len(merges) != 2 or not indices:
        raise ValueError(f"not a HiViT/iTPN state dict: expected 2 patch merges in 'blocks', found {merges}")
    m1, m2 = merges
    return m1, m2 - m1 - 1, indices[-1] - m2


def _block_pairs(depths: tuple[int, int, int], prefix: str) -> list[tuple[str, str]]:
    d1, d2, d3 = depths
    pairs = [(f"blocks.{i}", f"{prefix}stage1.{i}") for i in range(d1)]
    pairs.append((f"blocks.{d1}", f"{prefix}merge1"))
    pairs += [(f"blocks.{d1 + 1 + i}", f"{prefix}stage2.{i}") for i in range(d2)]
    pairs.append((f"blocks.{d1 + d2 + 1}", f"{prefix}merge2"))
    pairs += [(f"blocks.{d1 + d2 + 2 + i}", f"{prefix}blocks.{i}") for i in range(d3)]
    return pairs


def key_pairs(kind: str, depths: tuple[int, int, int], target: str | None = None) -> list[tuple[str, str]]:
    """(official prefix, our prefix) pairs for ``kind``; ``target`` picks where our backbone
    lives (defaults to ``kind``'s own module)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    prefix = BACKBONE_PREFIX[target or kind]
    pairs = [("patch_embed", f"{prefix}patch_embed"), ("absolute_pos_embed", f"{prefix}pos_embed")]
    pairs += _block_pairs(depths, prefix)
    if kind != "classifier":
        pairs += _NECK
    return pairs + _HEADS[kind]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def official_to_ours(sd: Mapping[str, torch.Tensor], kind: str, target: str | None = None,
                     strict: bool = True) -> dict[str, torch.Tensor]:
    """Rename a released state dict to our layout. Keys the mapping does not know are an
    error (``strict``) or dropped with a warning; derived buffers are dropped."""
    sd = unwrap_state_dict(sd)
    pairs = key_pairs(kind, official_depths(sd), target)
    out, unknown = {}, []
    for key, value in sd.items():
        if key.endswith(_DERIVED):
            continue
        new = _rename(key, pairs)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        if strict:
            raise KeyError(f"keys of the official {kind} checkpoint with no counterpart: {unknown[:10]}"
                           f"{' ...' if len(unknown) > 10 else ''}")
        log.warning("dropping %d official keys with no counterpart in %s: %s", len(unknown), kind, unknown[:10])
    return out


def ours_to_official(sd: Mapping[str, torch.Tensor], kind: str, depths: tuple[int, int, int],
                     target: str | None = None) -> dict[str, torch.Tensor]:
    """Rename our state dict to the released layout, adding the derived relative-position
    index the released code expects."""
    pairs = [(ours, official) for official, ours in key_pairs(kind, depths, target)]
    out, unknown = {}, []
    for key, value in sd.items():
        new = _rename(key, pairs)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"keys of our {target or kind} state dict with no official counterpart: {unknown[:10]}")
    tables = [k for k in out if k.endswith("attn.relative_position_bias_table") and k.startswith("blocks.")]
    if tables:
        side = int(round(out[tables[0]].shape[0] ** 0.5))
        out["relative_position_index"] = relative_position_index((side + 1) // 2)
    return out


def checkpoint_filter_fn(state_dict, model) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: accept our layout or the official one (pre-trained or
    fine-tuned) for any of our registered models, resizing position tables to the model."""
    from ..models import ITPN, HiViT, ITPNDense
    sd = unwrap_state_dict(state_dict)
    if is_official(sd):
        target = "dense" if isinstance(model, ITPNDense) else "classifier"
        sd = official_to_ours(sd, "clip_distill" if "lm_head.weight" in sd else
                              "pixel_mim" if "decoder_pred.weight" in sd else "classifier",
                              target=target, strict=False)
    own = model.state_dict()
    # Drop what this model does not have (pre-training heads, a classifier head on a backbone).
    sd = {k: v for k, v in sd.items() if k in own}
    if isinstance(model, (ITPN, HiViT, ITPNDense)):
        sd = resize_position_tables(sd, own)
    return sd


def resize_position_tables(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict:
    """Interpolate absolute position embeddings and relative-bias tables whose size differs
    from the target model's (fine-tuning at another resolution)."""
    out = dict(sd)
    for key, value in sd.items():
        want = own[key].shape
        if value.shape == want:
            continue
        if key.endswith("pos_embed") and value.ndim == 3:
            g_new = int(round(want[1] ** 0.5))
            out[key] = resize_pos_embed(value, (g_new, g_new))
        elif key.endswith("relative_position_bias_table"):
            out[key] = resize_rel_pos_table(value, (int(round(want[0] ** 0.5)) + 1) // 2)
        log.info("resized %s from %s to %s", key, tuple(value.shape), tuple(out[key].shape))
    return out
