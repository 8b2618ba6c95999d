"""Image normalisation for the shards: every stored image is a decodable RGB JPEG.

ImageNet-1k's train set holds 22 CMYK JPEGs and one PNG named ``.JPEG``, plus a few
grayscale JPEGs; the loaders decode with libjpeg-turbo straight to RGB, so these are
re-encoded once here rather than special-cased in every training worker. RGB JPEGs are
kept byte-for-byte (no generation loss) unless ``resize_shorter`` asks to shrink them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

__all__ = ["EncodedImage", "prepare_image"]


@dataclass
class EncodedImage:
    data: bytes               # RGB JPEG bytes to store
    width: int                # original size, before any resize
    height: int
    reencoded: str | None     # why the image was re-encoded (None: stored as read)


def prepare_image(data: bytes, resize_shorter: int | None = None, quality: int = 95) -> EncodedImage:
    """Check that ``data`` decodes fully and return RGB JPEG bytes for it.

    Raises on unreadable input (unknown format, truncated or corrupt data); the caller
    records the source as skipped.
    """
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        fmt, mode = im.format, im.mode
        reasons = []
        if fmt != "JPEG":
            reasons.append(f"{fmt} file")
        elif mode != "RGB":
            reasons.append(f"{mode} JPEG")
        shrink = resize_shorter is not None and min(width, height) > resize_shorter
        if shrink:
            reasons.append(f"resize shorter side {min(width, height)} -> {resize_shorter}")
            scale = resize_shorter / min(width, height)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            if fmt == "JPEG":
                # DCT-domain downscaling (at most to 2x the target) makes the decode of
                # very large images cheap; the bicubic resize below does the rest.
                im.draft("RGB", (target[0] * 2, target[1] * 2))
        # load() decodes every scanline: truncated or corrupt files raise here (PIL does
        # not pad truncated images unless ImageFile.LOAD_TRUNCATED_IMAGES is set).
        im.load()
        if not reasons:
            return EncodedImage(data, width, height, None)
        rgb = im.convert("RGB")
        if shrink:
            rgb = rgb.resize(target, Image.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
        return EncodedImage(out.getvalue(), width, height, "; ".join(reasons))
