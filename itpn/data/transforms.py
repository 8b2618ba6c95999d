"""Per-sample transforms for pre-training, fine-tuning and evaluation.

Pre-training (iTPN paper, section 4.1; BEiT-style augmentation): RandomResizedCrop
(scale 0.2-1), horizontal flip, colour jitter 0.4 (brightness, contrast, saturation),
then one or two views of the *same* crop -- the student's input and, when a teacher
wants another resolution or normalisation (CLIP-L/14 at 224 for a 256 student, CLIP-B/16
at 224 or 196), the teacher's -- and the patch mask, all made in the loader worker.

Every random choice is drawn from the ``numpy.random.Generator`` the loader hands in
(seeded per sample from seed, epoch, stream and position), so a resumed run reproduces
the exact tensors. The crop is planned from the JPEG header before decoding, which lets
the decoder downscale in the DCT domain; the resize runs on uint8 tensors (torch's
antialiased bicubic, within 1/255 of PIL's on average); colour jitter (one affine colour
map) and normalisation run on the output-size crop only.

Fine-tuning uses timm's ``create_transform`` (RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25, bicubic); evaluation is resize + centre crop by ``crop_pct``, as timm.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..objectives.masking import MaskGenerator
from .decode import decode_rgb, image_size

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "PretrainAugment", "PretrainTransform",
           "FinetuneAugment", "FinetuneTransform", "EvalTransform", "sample_crop", "seed_global_rngs", "fix_posterize"]

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

_INTERP = ("bicubic", "bilinear", "nearest")
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale and PIL's "L" conversion.
_LUMA = (0.2989, 0.587, 0.114)


def sample_crop(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w), torchvision's algorithm on a numpy rng:
    ten tries of area ~ U(scale) * H * W and log-uniform aspect ratio, then a centre crop
    clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _decode_for_crop(data: bytes, box: tuple[int, int, int, int] | None, out_size: int,
                     scaled: bool) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode ``data`` (possibly downscaled) and map the crop box to the decoded image.

    ``box`` is in full-resolution pixels; it is None when the size was unknown before
    decoding (non-JPEG), in which case the caller plans the crop on the returned image.
    """
    if box is None or not scaled:
        return decode_rgb(data, scratch=True), box
    size = image_size(data)
    top, left, h, w = box
    # Smallest decoded size that keeps the crop at least out_size on both sides.
    min_h = math.ceil(size[0] * out_size / h)
    min_w = math.ceil(size[1] * out_size / w)
    # libjpeg-turbo scales by M/8; factors below 2 decode slower than full size.
    if 2 * min_h > size[0] or 2 * min_w > size[1]:
        return decode_rgb(data, scratch=True), box
    img = decode_rgb(data, min_height=min_h, min_width=min_w, scratch=True)
    if img.shape[:2] == size:
        return img, box
    sy, sx = img.shape[0] / size[0], img.shape[1] / size[1]
    top, left = int(top * sy), int(left * sx)
    h = max(1, min(img.shape[0] - top, int(round(h * sy))))
    w = max(1, min(img.shape[1] - left, int(round(w * sx))))
    return img, (top, left, h, w)


def _resize(hwc: np.ndarray, height: int, width: int, mode: str) -> torch.Tensor:
    """Antialiased resize of an (h, w, 3) uint8 image to a contiguous (height, width, 3) uint8.

    torch's uint8 kernels are fast for channels-last input: the crop is copied once into
    that layout, resized without a float copy (~5x faster than PIL on one core, within
    1/255 of PIL's bicubic on average), and the output is already HWC for PIL / numpy.
    """
    x = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # (h, w, 3) -> (1, 3, h, w) view
    x = x.contiguous(memory_format=torch.channels_last)
    antialias = mode in ("bilinear", "bicubic")
    y = torch.nn.functional.interpolate(x, size=(height, width), mode=mode, antialias=antialias)
    return y[0].permute(1, 2, 0)  # (1, 3, H, W) channels-last -> (H, W, 3) contiguous


def _jitter_matrix(order: np.ndarray, factors: np.ndarray, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour jitter as one affine map y = A x + a on RGB pixels.

    Brightness (blend with black), contrast (blend with the mean grey level) and
    saturation (blend with the grey image) are each affine in the pixel values, so their
    composition in the drawn order is one 3x3 matrix plus offset, applied in a single
    pass over the image (torchvision's ColorJitter makes three passes and clamps after
    each; the two differ only on pixels that leave [0, 255] midway). ``mean_rgb`` is the
    image's mean colour, from which the contrast blend's mean grey is tracked exactly.
    """
    luma = np.asarray(_LUMA)
    A, a = np.eye(3), np.zeros(3)
    for op in order:
        f = float(factors[op])
        if op == 0:      # brightness
            A, a = f * A, f * a
        elif op == 1:    # contrast: blend with the current mean grey level
            m = luma @ (A @ mean_rgb + a)
            A, a = f * A, f * a + (1.0 - f) * m
        else:            # saturation: blend with the current grey image
            S = f * np.eye(3) + (1.0 - f) * np.outer(np.ones(3), luma)
            A, a = S @ A, S @ a
    return A, a


def _chw_float(hwc: torch.Tensor) -> torch.Tensor:
    return hwc.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)  # (H, W, 3) -> (3, H, W)


def _apply_jitter(x: torch.Tensor, A: np.ndarray, a: np.ndarray) -> torch.Tensor:
    """clamp(A x + a, 0, 255) for every pixel of x (3, H, W) float; a new (3, H, W) tensor."""
    # (3, 3) @ (3, H*W): the channel-major product is ~10x faster than (H*W, 3) @ (3, 3).
    y = torch.addmm(torch.from_numpy(a.astype(np.float32)).view(3, 1), torch.from_numpy(A.astype(np.float32)),
                    x.view(3, -1))
    return y.clamp_(0.0, 255.0).view(x.shape)


def _normalizer(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x * scale + shift == (x / 255 - mean) / std, shaped (3, 1, 1)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def _to_normalized(chw: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor],
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """(3, H, W) uint8 or float in [0, 255] -> normalised float32, one fused pass."""
    scale, shift = norm
    x = chw if chw.dtype == torch.float32 else chw.to(torch.float32)
    if out is None:
        return torch.addcmul(shift, x, scale)
    return torch.addcmul(shift, x, scale, out=out)


def _store_uint8(chw: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """(3, H, W) float in [0, 255] or uint8 -> uint8 (3, H, W), rounded, into ``out``."""
    if chw.dtype != torch.uint8:
        chw = chw.add(0.5)  # the float -> uint8 cast truncates; +0.5 rounds (values are >= 0)
    if out is None:
        return chw.to(torch.uint8, memory_format=torch.contiguous_format)
    return out.copy_(chw)


def seed_global_rngs(rng: np.random.Generator) -> None:
    """Seed ``random``, numpy's legacy global rng and torch from a per-sample generator, for
    third-party transforms (timm's RandAugment, RandomErasing) that draw from those."""
    seed = int(rng.integers(0, 2**31 - 1))
    random.seed(seed)
    np.random.seed(seed)
    # Only the CPU generator: torch.manual_seed also queues a lazy CUDA seeding call that
    # records a formatted stack trace each time (~1 ms per sample on torch 2.14).
    torch.default_generator.manual_seed(seed)


def _image_shape(size: int, on_device: bool) -> tuple[tuple[int, ...], torch.dtype]:
    return ((3, size, size), torch.uint8 if on_device else torch.float32)


# ----------------------------------------------------------------------------- pre-training

@dataclass
class PretrainAugment:
    """Pre-training augmentation; every field is a recipe key."""
    input_size: int = 224
    teacher_size: int | None = None      # second view of the same crop (None: no teacher view)
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    color_jitter: float | tuple[float, float, float] = 0.4   # brightness, contrast, saturation
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    teacher_mean: tuple[float, float, float] = CLIP_MEAN
    teacher_std: tuple[float, float, float] = CLIP_STD
    mask: str | None = "random"          # "random" | "block" | None
    mask_ratio: float = 0.75             # random masking
    mask_num_patches: int = 75           # block masking, counted on a mask_ref_grid grid
    mask_ref_grid: int = 14              # "75 of 196" -> round(75 / 196 * grid^2)
    mask_min_block: int = 16
    patch_size: int = 16                 # mask grid = input_size // patch_size
    decode_scale: bool = True            # DCT-domain downscaled decoding when the crop allows
    normalize: str = "worker"            # "worker": float32 batches; "device": uint8, see ShardLoader.to_device


def _check_normalize(where: str) -> str:
    if where not in ("worker", "device"):
        raise ValueError(f"normalize must be 'worker' or 'device', got {where!r}")
    return where


class PretrainTransform:
    """bytes -> {"image", ["teacher_image"], ["mask"]} for one sample."""

    def __init__(self, cfg: PretrainAugment):
        if cfg.interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {_INTERP}")
        self.cfg = cfg
        self.on_device = _check_normalize(cfg.normalize) == "device"
        cj = cfg.color_jitter
        self.jitter = np.array((cj,) * 3 if isinstance(cj, (int, float)) else tuple(cj), dtype=np.float64)
        self.norm = _normalizer(cfg.mean, cfg.std)
        self.teacher_norm = _normalizer(cfg.teacher_mean, cfg.teacher_std)
        self.grid = cfg.input_size // cfg.patch_size
        self.mask_gen = None
        if cfg.mask == "random":
            self.mask_gen = MaskGenerator("random", self.grid, ratio=cfg.mask_ratio)
        elif cfg.mask == "block":
            self.mask_gen = MaskGenerator("block", self.grid, num_masked=cfg.mask_num_patches,
                                          ref_grid=cfg.mask_ref_grid, min_block=cfg.mask_min_block)
        elif cfg.mask is not None:
            raise ValueError(f"mask must be 'random', 'block' or None, got {cfg.mask!r}")

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        shapes = {"image": _image_shape(self.cfg.input_size, self.on_device)}
        if self.cfg.teacher_size:
            shapes["teacher_image"] = _image_shape(self.cfg.teacher_size, self.on_device)
        if self.mask_gen is not None:
            shapes["mask"] = ((self.grid * self.grid,), torch.bool)
        return shapes

    def device_norms(self) -> dict[str, tuple]:
        """Per-consumer (mean, std) that ``ShardLoader.to_device`` applies (device mode only)."""
        if not self.on_device:
            return {}
        norms = {"image": (self.cfg.mean, self.cfg.std)}
        if self.cfg.teacher_size:
            norms["teacher_image"] = (self.cfg.teacher_mean, self.cfg.teacher_std)
        return norms

    def crop_views(self, data: bytes, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The uint8 views (S, S, 3) and (T, T, 3) of one random crop, flipped together."""
        cfg = self.cfg
        out_size = max(cfg.input_size, cfg.teacher_size or 0)
        size = image_size(data)
        box = sample_crop(size[0], size[1], cfg.scale, cfg.ratio, rng) if size else None
        img, box = _decode_for_crop(data, box, out_size, cfg.decode_scale)
        if box is None:  # not a JPEG: plan the crop on the decoded image
            box = sample_crop(img.shape[0], img.shape[1], cfg.scale, cfg.ratio, rng)
        top, left, h, w = box
        crop = img[top: top + h, left: left + w]  # (h, w, 3) view
        view = _resize(crop, cfg.input_size, cfg.input_size, cfg.interpolation)
        teacher = None
        if cfg.teacher_size:
            teacher = (view if cfg.teacher_size == cfg.input_size
                       else _resize(crop, cfg.teacher_size, cfg.teacher_size, cfg.interpolation))
        if rng.random() < cfg.hflip:
            shared = teacher is view  # same size: one tensor serves both views
            view = view.flip(1)
            teacher = view if shared else (None if teacher is None else teacher.flip(1))
        return view, teacher

    def __call__(self, data: bytes, rng: np.random.Generator, out: dict[str, torch.Tensor] | None = None) -> dict:
        """``out``: optional preallocated per-sample tensors (views into the batch)."""
        out = out if out is not None else {}
        view, teacher = self.crop_views(data, rng)
        order = rng.permutation(3)
        factors = rng.uniform(np.maximum(0.0, 1.0 - self.jitter), 1.0 + self.jitter)
        if self.jitter.any():
            # One affine colour map from the student view's statistics, applied to both
            # views, so student and teacher see the same jitter.
            x = _chw_float(view)
            A, a = _jitter_matrix(order, factors, x.view(3, -1).mean(1).double().numpy())  # mean RGB of (3, H*W)
            student = _apply_jitter(x, A, a)
            if teacher is not None:
                teacher = student if teacher is view else _apply_jitter(_chw_float(teacher), A, a)
        else:
            student = view.permute(2, 0, 1)  # (S, S, 3) -> (3, S, S) view
            teacher = None if teacher is None else teacher.permute(2, 0, 1)
        views = [("image", student, self.norm)]
        if teacher is not None:
            views.append(("teacher_image", teacher, self.teacher_norm))
        for name, v, norm in views:
            if self.on_device:
                out[name] = _store_uint8(v, out.get(name))
            else:
                out[name] = _to_normalized(v, norm, out.get(name))
        if self.mask_gen is not None:
            mask = torch.from_numpy(self.mask_gen(rng))
            if "mask" in out:
                out["mask"].copy_(mask)
            else:
                out["mask"] = mask
        return out


# ----------------------------------------------------------------------------- fine-tuning

def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # keeping 0 bits: black, as Pillow < 11 computed it
    from PIL import ImageOps
    return ImageOps.posterize(img, bits_to_keep)


def fix_posterize(transform) -> int:
    """Make timm's RandAugment posterize ops accept 0 bits; returns how many were fixed.

    At the top magnitude (reached 2% of the time with rand-m9-mstd0.5) timm 1.0's
    PosterizeIncreasing asks PIL to keep 0 bits, which Pillow >= 11 rejects with
    "bits must be between or equal to 1 and 8"; older Pillow returned a black image,
    which is what the recipe was tuned with. The op's function is swapped on our own
    transform instance only.
    """
    fixed = 0
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize
                fixed += 1
    return fixed


@dataclass
class FinetuneAugment:
    """Fine-tuning augmentation (DeiT/BEiT recipe, as used by iTPN); timm's arguments."""
    input_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4            # ignored by timm when auto_augment is set
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fast_crop: bool = True               # our header-planned crop + uint8 resize for timm's first stage
    normalize: str = "worker"            # "device": uint8 batches; to_device normalises + erases


class FinetuneTransform:
    """bytes -> {"image": normalised (3, S, S)} through timm's training transform.

    timm's ``create_transform(..., separate=True)`` gives three stages: crop + flip, then
    RandAugment, then tensor + normalise + random erasing. With ``fast_crop`` the first
    stage is replaced by the same crop distribution computed on the JPEG header (scaled
    decode, uint8 resize) and the tensor conversion by a fused normalise; RandAugment and
    RandomErasing are timm's own objects.
    """

    def __init__(self, cfg: FinetuneAugment):
        from timm.data import create_transform
        from timm.data.random_erasing import RandomErasing

        self.cfg = cfg
        self.on_device = _check_normalize(cfg.normalize) == "device"
        if self.on_device and not cfg.fast_crop:
            raise ValueError("normalize='device' needs fast_crop=True")
        primary, secondary, final = create_transform(
            input_size=cfg.input_size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
            vflip=0.0, color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, re_prob=cfg.re_prob,
            re_mode=cfg.re_mode, re_count=cfg.re_count, separate=True)
        fix_posterize(secondary)
        self.timm_stages = (primary, secondary, final)
        self.secondary = secondary
        erasing = [t for t in getattr(final, "transforms", []) if isinstance(t, RandomErasing)]
        self.erasing = erasing[0] if erasing else None
        self.norm = _normalizer(cfg.mean, cfg.std)

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"image": _image_shape(self.cfg.input_size, self.on_device)}

    def device_norms(self) -> dict[str, tuple]:
        return {"image": (self.cfg.mean, self.cfg.std)} if self.on_device else {}

    def __call__(self, data: bytes, rng: np.random.Generator, out: dict[str, torch.Tensor] | None = None) -> dict:
        out = out if out is not None else {}
        seed_global_rngs(rng)
        cfg = self.cfg
        if not cfg.fast_crop:
            pil = Image.fromarray(decode_rgb(data))
            primary, secondary, final = self.timm_stages
            x = final(secondary(primary(pil)))
            if "image" in out:
                out["image"].copy_(x)
            else:
                out["image"] = x
            return out
        size = image_size(data)
        box = sample_crop(size[0], size[1], cfg.scale, cfg.ratio, rng) if size else None
        img, box = _decode_for_crop(data, box, cfg.input_size, True)
        if box is None:
            box = sample_crop(img.shape[0], img.shape[1], cfg.scale, cfg.ratio, rng)
        top, left, h, w = box
        view = _resize(img[top: top + h, left: left + w], cfg.input_size, cfg.input_size, cfg.interpolation)
        if rng.random() < cfg.hflip:
            view = view.flip(1)
        pil = self.secondary(Image.fromarray(view.numpy()))
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S) uint8 view
        if self.on_device:  # normalisation and random erasing run on the batch, on the device
            out["image"] = _store_uint8(x, out.get("image"))
            return out
        x = _to_normalized(x, self.norm, out.get("image"))
        if self.erasing is not None:
            x = self.erasing(x)  # in place on a (3, S, S) tensor
        out["image"] = x
        return out

    def device_erasing(self, device) -> Callable | None:
        """timm's RandomErasing for a normalised (B, 3, S, S) batch on ``device``."""
        if self.erasing is None or not self.on_device:
            return None
        from timm.data.random_erasing import RandomErasing
        cfg = self.cfg
        return RandomErasing(cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count, device=device)


# ----------------------------------------------------------------------------- evaluation

class EvalTransform:
    """bytes -> {"image": normalised (3, S, S)}: resize the shorter side to floor(S / crop_pct), centre
    crop S -- timm's eval transform, with the resize on uint8 tensors."""

    def __init__(self, input_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, decode_scale: bool = True, normalize: str = "worker"):
        self.on_device = _check_normalize(normalize) == "device"
        self.mean, self.std = mean, std
        self.input_size = input_size
        self.scale_size = math.floor(input_size / crop_pct)
        if interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {_INTERP}")
        self.interpolation = interpolation
        self.norm = _normalizer(mean, std)
        self.decode_scale = decode_scale

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"image": _image_shape(self.input_size, self.on_device)}

    def device_norms(self) -> dict[str, tuple]:
        return {"image": (self.mean, self.std)} if self.on_device else {}

    def __call__(self, data: bytes, rng: np.random.Generator | None = None,
                 out: dict[str, torch.Tensor] | None = None) -> dict:
        out = out if out is not None else {}
        min_h = min_w = 0
        size = image_size(data) if self.decode_scale else None
        if size:
            f = self.scale_size / min(size)
            min_h, min_w = math.ceil(size[0] * f), math.ceil(size[1] * f)
            if 2 * min_h > size[0] or 2 * min_w > size[1]:  # only factors >= 2 pay off
                min_h = min_w = 0
        img = decode_rgb(data, min_height=min_h, min_width=min_w, scratch=True)
        # torchvision's Resize(int) rule: shorter side -> scale_size, longer side truncated;
        # then CenterCrop's rounding of the offsets.
        h, w = img.shape[:2]
        if h <= w:
            rh, rw = self.scale_size, int(self.scale_size * w / h)
        else:
            rh, rw = int(self.scale_size * h / w), self.scale_size
        resized = _resize(img, rh, rw, self.interpolation)
        s = self.input_size
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        view = resized[top: top + s, left: left + s].permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        if self.on_device:
            out["image"] = _store_uint8(view, out.get("image"))
        else:
            out["image"] = _to_normalized(view, self.norm, out.get("image"))
        return out
