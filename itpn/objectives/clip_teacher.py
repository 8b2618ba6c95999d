"""Frozen CLIP teacher for CLIP-supervised masked feature modeling (iTPN paper, section 3.4
and Table 9: "CLIP-B/16 and CLIP-L/14 ... as the teacher").

The teacher is an open_clip vision tower. Its targets are every patch token (class token
dropped) after the tower's final LayerNorm (``ln_post``), times the projection
(``visual.proj``), then a parameter-free LayerNorm: (B, N, D) with D = 512 for B/16 and 768
for L/14. The student never sees these weights; they only shape the regression targets.

Why the tower is kept out of the module tree
    ``CLIPTeacher`` is an ``nn.Module`` (so it can be called and printed like one), but it
    registers no parameter, buffer or submodule: the open_clip tower sits in a plain Python
    holder. Whatever owns the teacher therefore cannot leak its weights into
    ``.parameters()`` (an optimizer, weight-decay groups, DDP/DeepSpeed broadcasts, ZeRO-3
    partitioning), ``.state_dict()`` (every checkpoint would carry 300M frozen numbers),
    ``.half()``/``.bfloat16()`` (DeepSpeed's casts: the teacher's precision is its own
    ``dtype``) or ``.train()`` (the tower is always in eval mode). Filtering on
    ``requires_grad`` in the engine would cover only the first of these. The tower moves
    with ``teacher.to(...)``, which is overridden for that; a parent's ``.to()``/``.cuda()``
    does not reach it, so ``forward`` also moves it to the input's device on first use.

Weights (``weights=``), and who decides QuickGELU
    OpenAI's CLIP was trained with QuickGELU (x * sigmoid(1.702 x)); the same weights in a
    GELU tower give plausible but wrong targets, silently. So:

    * an open_clip pretrained tag ("openai", "laion2b_s32b_b82k", ...): fetched with
      ``open_clip.download_pretrained`` (the call ``open_clip.create_model`` makes); the
      tag's own ``quick_gelu`` flag decides (and "openai" always means QuickGELU: open_clip
      < 3 does not flag it), whatever the arch name says. ``open_clip.create_model`` itself
      only warns when the arch and the tag disagree.
    * a local OpenAI ``.pt`` file: a TorchScript archive, read with ``torch.jit.load``
      (``torch.load(weights_only=True)`` refuses those). A TorchScript archive, or a state
      dict carrying OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries,
      always gets QuickGELU, also under a plain arch name such as "ViT-B-16".
    * a local open_clip state dict (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=
      True)``, or ``.safetensors``; a training checkpoint's ``{"state_dict": ...}`` and a
      ``module.`` prefix are unwrapped): the key layout is the same as OpenAI's, so nothing
      in the file tells the activation. The arch name decides: "ViT-B-16-quickgelu" for
      QuickGELU-trained weights (OpenAI's, re-saved), "ViT-B-16" for GELU ones.
    * ``None``: random weights, for demos and benchmarks only (logged as a warning).

    Weights that need GELU under an arch configured for QuickGELU are refused.

Sizes
    The teacher image size sets its token grid, which must equal the student's:
    B/16 at 224 px -> 14x14; L/14 at 196 px -> 14x14 (under a 224 px / patch-16 student);
    L/14 at 224 px -> 16x16 (under a 256 px / patch-16 student). When the size differs from
    the tower's native one, the positional embedding is resampled bicubically over the patch
    grid (antialiased, as open_clip's own ``resize_pos_embed`` does), the class token's
    embedding kept as is.

Attention path
    open_clip's ViT blocks use ``nn.MultiheadAttention`` with ``need_weights=False``. In eval
    mode, without autograd and autocast, with batch-first blocks (open_clip 3.x; 2.20-2.24
    still build sequence-first ones) and an even head count (B/16: 12, L/14: 16) it takes
    PyTorch's fused fast path (``_native_multi_head_attention``; on an H100 with torch 2.11
    that runs cuDNN's flash SDPA kernel, about 1.25x the throughput of the non-fast path);
    otherwise it still runs ``F.scaled_dot_product_attention``. The weights are cast to
    ``dtype`` and autocast is switched off inside ``forward``, because autocast alone would
    disable the fast path.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["CLIPTeacher", "build_clip_teacher", "load_clip_state_dict", "register_model_config",
           "register_tiny_config", "resize_pos_embed", "target_width", "TINY_ARCH", "DTYPES"]

# Entries OpenAI's TorchScript archives keep next to the weights (open_clip drops them too).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}

# The tiny tower of the CPU demo and the benchmark's "tiny" recipe: 64 px / patch 16 gives the
# 4x4 grid of a 64 px iTPN student; 2 heads so the attention fast path is exercised.
TINY_ARCH = "itpn-demo-tiny-clip"
_TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

_config_dir: str | None = None


def register_model_config(name: str, model_cfg: Mapping[str, Any]) -> str:
    """Make ``model_cfg`` (an open_clip model config: ``embed_dim``, ``vision_cfg``,
    ``text_cfg``, optionally ``quick_gelu``) known to open_clip as ``name``; returns ``name``.

    open_clip only registers configs from JSON files (``open_clip.add_model_config``), so the
    dict is written to a per-process temporary folder first."""
    global _config_dir
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"open_clip model config {name!r} needs embed_dim, vision_cfg and text_cfg")
    if _config_dir is None:
        _config_dir = tempfile.mkdtemp(prefix="itpn_open_clip_configs_")
        atexit.register(shutil.rmtree, _config_dir, ignore_errors=True)
    path = os.path.join(_config_dir, f"{name}.json")
    text = json.dumps(dict(model_cfg), sort_keys=True)
    if open_clip.get_model_config(name) is not None and os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return name  # already registered: every add_model_config call rescans all paths
    with open(path, "w") as f:
        f.write(text)
    open_clip.add_model_config(path)
    return name


def register_tiny_config(name: str = TINY_ARCH) -> str:
    """Register the tiny CPU tower (64 px, patch 16, width 64, 2 layers, D = 32) as ``name``."""
    return register_model_config(name, _TINY_CFG)


def _is_torchscript(path: str) -> bool:
    # torch.save archives hold data.pkl; TorchScript ones also hold constants.pkl and code/.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def load_clip_state_dict(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a CLIP checkpoint file; returns (state dict on CPU, ``openai``).

    ``openai`` is True for OpenAI's own format (a TorchScript archive, or a state dict with
    OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries): those weights
    were trained with QuickGELU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP teacher weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd, openai = load_file(path, device="cpu"), False
    elif _is_torchscript(path):
        # OpenAI's .pt files are TorchScript archives: torch.load(weights_only=True) refuses
        # them, and TorchScript deserialisation runs no pickled Python (still: trusted files only).
        # torch.jit.load is deprecated but is the only reader of this format; we take the
        # tensors and drop the scripted module at once.
        with warnings.catch_warnings():
            # (FutureWarning in torch 2.14, DeprecationWarning in 2.11)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated")
            sd, openai = dict(torch.jit.load(path, map_location="cpu").state_dict()), True
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the path and the way out
            raise ValueError(f"could not read CLIP teacher weights {path} as a state dict with "
                             f"torch.load(weights_only=True): {e}. Re-save it as a plain state dict "
                             "or .safetensors") from e
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]  # an open_clip training checkpoint
        if not isinstance(obj, Mapping) or not obj:
            raise ValueError(f"CLIP teacher weights {path}: expected a state dict, got {type(obj).__name__}")
        sd, openai = dict(obj), False
    openai = openai or any(k in sd for k in OPENAI_EXTRA_KEYS)
    for k in OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    if all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, openai


@dataclass(frozen=True)
class _Source:
    """Where the weights come from, resolved before any model is built (fail fast)."""
    kind: str                   # "tag" | "file" | "random"
    path: str | None = None
    quick_gelu: bool | None = None      # None: the arch config decides
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _resolve_arch(arch: str) -> tuple[str, dict]:
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"teacher arch must be an open_clip model name, got {arch!r}")
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"teacher arch {arch!r}: schema names are not supported; use a built-in or registered "
                         "open_clip arch name and pass the checkpoint as weights")
    name = arch.replace("/", "-")  # OpenAI spells ViT-L/14, open_clip ViT-L-14
    cfg = open_clip.get_model_config(name)
    if cfg is None and name == TINY_ARCH:
        register_tiny_config()
        cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip arch {arch!r}; see open_clip.list_models() for the names "
                         "(e.g. ViT-B-16, ViT-L-14, ViT-B-16-quickgelu), or register a config with "
                         "itpn.objectives.clip_teacher.register_model_config")
    v = cfg["vision_cfg"]
    if "timm_model_name" in v or isinstance(v.get("layers"), (list, tuple)) or v.get("attentional_pool"):
        raise ValueError(f"teacher arch {name!r} is not a plain open_clip VisionTransformer "
                         "(timm, ResNet and attention-pooled towers are not supported)")
    return name, cfg


def target_width(arch: str) -> int:
    """The width D of an open_clip arch's targets (its projection's output), from its config
    alone: 512 for ViT-B-16, 768 for ViT-L-14, without building the tower."""
    return int(_resolve_arch(arch)[1]["embed_dim"])


def teacher_forward_flops(arch: str, image_size: int) -> float:
    """Forward FLOPs per image of an open_clip arch's vision tower at ``image_size`` (plus its
    projection), from its config alone (``vit_forward_flops``: what ``CLIPTeacher`` runs)."""
    from ..models.flops import vit_forward_flops
    _, cfg = _resolve_arch(arch)
    v = cfg["vision_cfg"]
    return vit_forward_flops(int(v["width"]), int(v["layers"]), int(v["patch_size"]), int(image_size),
                             int(cfg["embed_dim"]))


def quick_gelu_arch(arch: str) -> str:
    """The name under which ``arch`` builds with QuickGELU: itself if its config says so, else
    open_clip's "-quickgelu" variant, registered here (a copy of the config with the flag set)
    where open_clip has none."""
    name, cfg = _resolve_arch(arch)
    if cfg.get("quick_gelu", False):
        return name
    variant = f"{name}-quickgelu"
    if open_clip.get_model_config(variant) is None:
        register_model_config(variant, {**cfg, "quick_gelu": True})
    return variant


def tag_quick_gelu(arch: str, tag: str) -> bool:
    """Whether the weights of open_clip's pretrained ``tag`` of ``arch`` were trained with
    QuickGELU (nothing is downloaded). open_clip < 3 has no quick_gelu flag on its tags (its
    create_model special-cased "openai"), so the OpenAI tag is QuickGELU by name as well."""
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    return bool(cfg.get("quick_gelu", False)) or tag.lower() == "openai"


def _resolve_weights(arch: str, weights: str | None, cache_dir: str | None) -> _Source:
    if weights is None:
        return _Source("random")
    weights = os.path.expanduser(str(weights))
    if os.path.isfile(weights):
        return _Source("file", weights)
    if os.path.isdir(weights):
        raise FileNotFoundError(f"CLIP teacher weights {weights} is a folder; name the weights file in it")
    if os.path.exists(weights) or os.sep in weights or weights.endswith(WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"CLIP teacher weights file not found: {weights}")
    cfg = open_clip.get_pretrained_cfg(arch, weights)
    if not cfg:
        raise ValueError(f"CLIP teacher weights {weights!r} are neither a file nor an open_clip pretrained tag "
                         f"of {arch} (its tags: {open_clip.list_pretrained_tags_by_model(arch) or 'none'})")
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same way out
        raise RuntimeError(
            f"could not fetch open_clip weights {arch}:{weights} ({type(e).__name__}: {e}). Without internet, "
            f"download them on a connected machine (hf_hub={cfg.get('hf_hub') or '-'}, url={cfg.get('url') or '-'}) "
            "and set the teacher weights to the local file, or pre-fill the Hugging Face cache and set "
            "HF_HUB_OFFLINE=1") from e
    if not path:
        raise RuntimeError(f"open_clip returned no file for {arch}:{weights}")
    return _Source("tag", path, quick_gelu=tag_quick_gelu(arch, weights),
                   mean=tuple(cfg["mean"]) if "mean" in cfg else None,
                   std=tuple(cfg["std"]) if "std" in cfg else None)


def _visual_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if not vis and "conv1.weight" in sd:  # a vision-tower-only state dict
        vis = dict(sd)
    return vis


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, W) learned positions -> (1 + grid*grid, W): bicubic over the patch grid,
    antialiased like open_clip's loader; the class token's row is kept unchanged."""
    cls, patches = pos[:1], pos[1:]
    old = int(round(patches.shape[0] ** 0.5))
    if old * old != patches.shape[0]:
        raise ValueError(f"positional embedding of {patches.shape[0]} patches is not a square grid")
    if old == grid:
        return pos
    dtype = pos.dtype
    p = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (g*g, W) -> (1, W, g, g)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    p = p.permute(0, 2, 3, 1).reshape(grid * grid, -1)  # (1, W, grid, grid) -> (grid*grid, W)
    return torch.cat([cls.float(), p]).to(dtype)


QUICK_GELU_SLOPE = 1.702  # QuickGELU(x) = x * sigmoid(1.702 x)


def fold_quick_gelu(tower: nn.Module) -> int:
    """Run a QuickGELU tower's MLPs with SiLU, exactly: x * sigmoid(a x) = silu(a x) / a, so
    c_fc's weight and bias are multiplied by a = 1.702 and c_proj's weight divided by it, and
    the activation becomes ``nn.SiLU``. Eager QuickGELU is three kernels over the (tokens,
    4 x width) hidden activation (a multiply, a sigmoid, a multiply); SiLU is one, like GELU.
    For CLIP-L/14@196 at batch 128 that is ~25 GB of memory traffic per step
    (docs/clip_teacher.md). Only the frozen teacher may be folded: the weights change by a
    constant factor. Works in place on the weights' current dtype (call it in fp32, before
    casting). Returns the number of MLPs folded; an MLP that is not exactly open_clip's
    Linear -> QuickGELU -> Linear is left alone."""
    folded = 0
    for mlp in (m for m in tower.modules() if isinstance(m, nn.Sequential)):
        names = [n for n, _ in mlp.named_children()]
        if names != ["c_fc", "gelu", "c_proj"] or not isinstance(mlp.gelu, QuickGELU):
            continue
        if not (isinstance(mlp.c_fc, nn.Linear) and isinstance(mlp.c_proj, nn.Linear)):
            continue
        with torch.no_grad():
            mlp.c_fc.weight.mul_(QUICK_GELU_SLOPE)
            if mlp.c_fc.bias is not None:
                mlp.c_fc.bias.mul_(QUICK_GELU_SLOPE)
            mlp.c_proj.weight.div_(QUICK_GELU_SLOPE)
        mlp.gelu = nn.SiLU()
        folded += 1
    return folded


class _Unregistered:
    """Holds a module where ``nn.Module.__setattr__`` will not register it (see the module
    docstring: the frozen tower must stay out of every owner's parameters and state)."""
    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module


class CLIPTeacher(nn.Module):
    """Frozen open_clip vision tower producing per-patch CLIP targets (B, N, D), float32.

    Args:
        arch: open_clip model name ("ViT-B-16", "ViT-L-14", "ViT-B-16-quickgelu", or one
            registered with ``register_model_config``).
        weights: a pretrained tag, a local OpenAI TorchScript ``.pt``, a local open_clip state
            dict (``.pt``/``.pth``/``.bin``/``.safetensors``), or None (random; demos only).
        image_size: teacher input size in pixels (default: the tower's native size).
        dtype: precision the tower runs in (weights are cast); targets are returned in float32.
        device: where the tower lives (default CPU; it also follows the input, see forward).
        cache_dir: download cache for pretrained tags.
    """

    def __init__(self, arch: str, weights: str | None, image_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 cache_dir: str | None = None):
        super().__init__()
        name, cfg = _resolve_arch(arch)
        source = _resolve_weights(name, weights, cache_dir)
        sd, openai = (None, False) if source.path is None else load_clip_state_dict(source.path)

        arch_qg = bool(cfg.get("quick_gelu", False))
        need_qg = True if openai else source.quick_gelu
        if need_qg is False and arch_qg:
            raise ValueError(f"CLIP teacher weights {weights!r} were trained with GELU but arch {name!r} is "
                             "configured for QuickGELU; use the arch name without '-quickgelu'")
        quick_gelu = arch_qg or bool(need_qg)
        if quick_gelu and not arch_qg:
            log.info("CLIP teacher: %s weights need QuickGELU; building %s with quick_gelu=True",
                     "OpenAI-format" if openai else f"tag {weights!r}", name)

        v = cfg["vision_cfg"]
        patch, native = v["patch_size"], v["image_size"]
        if isinstance(patch, (list, tuple)) or isinstance(native, (list, tuple)):
            raise ValueError(f"teacher arch {name!r}: only square images and patches are supported")
        image_size = int(image_size or native)
        if image_size % patch:
            raise ValueError(f"teacher image size {image_size} is not a multiple of {name}'s patch size {patch}")

        # open_clip builds both towers; the text tower is dropped right after loading.
        # force_image_size sizes conv grid and positional table; pretrained_hf=False keeps
        # HF text towers from downloading (the name works in open_clip 2.2x and 3.x).
        model = open_clip.create_model(name, pretrained=None, force_image_size=image_size,
                                       force_quick_gelu=quick_gelu, pretrained_hf=False)
        tower = model.visual
        del model
        if not isinstance(tower, VisionTransformer) or tower.proj is None:
            raise ValueError(f"teacher arch {name!r} has no open_clip VisionTransformer tower with a projection")
        grid = image_size // patch

        if sd is not None:
            vsd = _visual_state_dict(sd)
            if "positional_embedding" not in vsd:
                raise ValueError(f"CLIP teacher weights {source.path} hold no vision tower (no 'visual.*' keys)")
            pos = vsd["positional_embedding"]
            vsd["positional_embedding"] = resize_pos_embed(pos, grid)
            if pos.shape[0] != grid * grid + 1:
                log.info("CLIP teacher: positional embedding resized from %dx%d to %dx%d (%d px)",
                         int(round((pos.shape[0] - 1) ** 0.5)), int(round((pos.shape[0] - 1) ** 0.5)),
                         grid, grid, image_size)
            try:
                tower.load_state_dict(vsd, strict=True)
            except RuntimeError as e:
                raise ValueError(f"CLIP teacher weights {source.path} do not fit open_clip arch {name!r}: {e}") from e
        else:
            log.warning("CLIP teacher %s has random weights (weights=None): its targets are random features, "
                        "fine for demos and benchmarks only", name)

        tower.requires_grad_(False)
        tower.eval()
        if quick_gelu:  # in fp32, before the cast: the same function with one activation kernel
            fold_quick_gelu(tower)
        tower.to(device=torch.device(device) if device is not None else "cpu", dtype=dtype)
        self._frozen = _Unregistered(tower)
        self.arch, self.weights, self.quick_gelu = name, weights, quick_gelu
        self.train(False)  # nn.Module.__init__ set training=True; see train()
        self._image_size, self._patch_size, self._grid = image_size, int(patch), grid
        pre = cfg.get("preprocess_cfg", {})
        self._mean = tuple(source.mean or pre.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        self._std = tuple(source.std or pre.get("std") or open_clip.OPENAI_DATASET_STD)
        log.info("CLIP teacher %s (%s%s): %d px, %dx%d tokens, D=%d, %s, %s, %s", name, source.kind,
                 f" {source.path}" if source.path else "", image_size, grid, grid, self.embed_dim,
                 "QuickGELU" if quick_gelu else "GELU", str(dtype).replace("torch.", ""), self.device)

    # -- geometry and constants -------------------------------------------------------------
    @property
    def tower(self) -> nn.Module:
        """The frozen open_clip VisionTransformer (read-only use: probes, tests). A QuickGELU
        tower's MLPs are folded (``fold_quick_gelu``): their hidden activations are 1.702x
        open_clip's, their outputs the same."""
        return self._frozen.module

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def grid(self) -> int:
        """Tokens per side: image_size // patch_size."""
        return self._grid

    @property
    def num_tokens(self) -> int:
        return self._grid * self._grid

    @property
    def embed_dim(self) -> int:
        """Target width D (the projection's output: 512 for B/16, 768 for L/14)."""
        return self.tower.proj.shape[1]

    @property
    def width(self) -> int:
        return self.tower.proj.shape[0]

    @property
    def layers(self) -> int:
        return len(self.tower.transformer.resblocks)

    @property
    def mean(self) -> tuple[float, float, float]:
        """Normalisation the teacher view must be given in (CLIP's, not ImageNet's)."""
        return self._mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self._std

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.proj.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.proj.device

    def check_grid(self, student_grid: int, student_image_size: int | None = None,
                   student_patch_size: int | None = None) -> None:
        """Raise ValueError unless the teacher's token grid equals the student's."""
        if int(student_grid) == self._grid:
            return
        who = "the student"
        if student_image_size is not None and student_patch_size is not None:
            who = f"the student at {student_image_size} px / patch {student_patch_size}"
        raise ValueError(
            f"teacher {self.arch} at {self._image_size} px gives a {self._grid}x{self._grid} token grid but {who} "
            f"gives {student_grid}x{student_grid}; set the teacher image size to "
            f"{student_grid * self._patch_size} px")

    # -- moving and freezing -----------------------------------------------------------------
    def to(self, *args, **kwargs) -> CLIPTeacher:
        """Like ``nn.Module.to``, and also moves/casts the unregistered tower."""
        # Let torch parse the many forms of .to() by applying them to an empty probe tensor.
        probe = torch.empty(0, device=self.device, dtype=self.dtype).to(*args, **kwargs)
        if probe.device != self.device or probe.dtype != self.dtype:
            self.tower.to(device=probe.device, dtype=probe.dtype)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True) -> CLIPTeacher:
        """A frozen teacher stays in eval mode (no dropout, no patch dropout, MHA fast path)."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, weights={self.weights}, image_size={self._image_size}, "
                f"grid={self._grid}x{self._grid}, embed_dim={self.embed_dim}, "
                f"quick_gelu={self.quick_gelu}, dtype={self.dtype}, frozen")

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each of the tower's residual blocks (regional, as the student's blocks;
        ``kwargs`` go to ``nn.Module.compile``). One graph per block, no break (inside
        ``forward``: no autograd, no autocast, eval mode), shared by the blocks, which have one
        shape: LayerNorms, residual adds and the (Quick)GELU fuse into Triton kernels around
        the GEMMs, and attention runs SDPA (docs/clip_teacher.md, "Compiled teacher")."""
        for blk in self.tower.transformer.resblocks:
            blk.compile(**kwargs)

    # -- forward -------------------------------------------------------------------------------
    def _check_input(self, images: torch.Tensor) -> None:
        s = self._image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"CLIP teacher {self.arch} expects (B, 3, {s}, {s}) images, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"CLIP teacher expects CLIP-normalised float images, got {images.dtype}")
        if images.device != self.device:
            log.info("CLIP teacher: moving the tower from %s to %s", self.device, images.device)
            self.tower.to(images.device)

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP-normalised -> (B, 1 + N, W): the residual stream after the last
        block, class token first, before ``ln_post``; in the tower's dtype."""
        self._check_input(images)
        t = self.tower
        # Autocast off: the weights already are in the run's precision, and autocast would
        # keep nn.MultiheadAttention off its fused path.
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = t.conv1(images.to(self.dtype))  # (B, W, g, g)
            x = x.flatten(2).transpose(1, 2)  # (B, W, g, g) -> (B, N, W)
            cls = t.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (W,) -> (B, 1, W)
            x = torch.cat([cls, x], dim=1) + t.positional_embedding.to(x.dtype)  # (B, 1 + N, W)
            # t.patch_dropout is skipped: the teacher must see every patch (it is the
            # identity in eval mode anyway).
            x = t.ln_pre(x)
            blocks = t.transformer.resblocks
            # open_clip 2.x builds sequence-first blocks, 3.x batch-first ones; calling the
            # blocks ourselves (not t.transformer, whose input layout changed across versions)
            # keeps one code path.
            seq_first = not getattr(blocks[0].attn, "batch_first", False)
            if seq_first:
                x = x.transpose(0, 1)  # (B, 1 + N, W) -> (1 + N, B, W)
            for blk in blocks:
                x = blk(x)  # the vision tower uses no attention mask
            if seq_first:
                x = x.transpose(0, 1)  # (1 + N, B, W) -> (B, 1 + N, W)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP-normalised teacher view -> (B, N, D) float32 targets:
        LN(ln_post(patch tokens) @ proj), the last LayerNorm without weight or bias."""
        x = self.forward_features(images)
        t = self.tower
        with torch.autocast(device_type=images.device.type, enabled=False):
            z = t.ln_post(x[:, 1:]) @ t.proj  # (B, N, W) @ (W, D) -> (B, N, D)
        # Normalised in float32: the targets feed a Smooth-L1 loss whatever the run's precision.
        return F.layer_norm(z.float(), (z.shape[-1],))


def build_clip_teacher(cfg: Mapping[str, Any], dtype: torch.dtype | str | None = None,
                       device: torch.device | str | None = None) -> CLIPTeacher:
    """A ``CLIPTeacher`` from a config mapping: ``arch``, ``weights``, optional ``image_size``,
    ``dtype`` (name or torch dtype; the argument wins), ``cache_dir`` and ``model_cfg`` (an
    open_clip config dict registered under ``arch`` first)."""
    known = {"arch", "weights", "image_size", "dtype", "cache_dir", "model_cfg"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unknown CLIP teacher config keys {sorted(unknown)} (known: {sorted(known)})")
    if "arch" not in cfg:
        raise ValueError("CLIP teacher config needs 'arch'")
    if cfg.get("model_cfg") is not None:
        register_model_config(cfg["arch"], cfg["model_cfg"])
    dtype = dtype if dtype is not None else cfg.get("dtype", torch.bfloat16)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"CLIP teacher dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return CLIPTeacher(cfg["arch"], cfg.get("weights"), image_size=cfg.get("image_size"), dtype=dtype,
                       device=device, cache_dir=cfg.get("cache_dir"))
