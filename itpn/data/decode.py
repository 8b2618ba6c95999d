"""JPEG decoding for the loaders: libjpeg-turbo through simplejpeg, PIL as the fallback.

Chosen by measurement (docs/data.md): on ImageNet-sized JPEGs (500x375, quality 90)
simplejpeg decodes in 0.83 ms against PIL's 1.15 ms per image on one core, and reading
the header alone (to plan a crop before decoding) costs 4 us. When the crop that will
be kept is at least twice the output size, the decoder is asked for a DCT-domain
downscaled image (libjpeg-turbo scales by M/8; the same trick as PIL's ``draft`` mode),
which makes large photos several times cheaper to decode.

Anything simplejpeg refuses (PNG bytes, CMYK JPEGs, recoverable-but-corrupt streams) is
retried with PIL, which raises on truncated data, so a damaged image is never silently
padded with grey.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import simplejpeg
from PIL import Image

__all__ = ["DecodeError", "image_size", "decode_rgb"]


class DecodeError(ValueError):
    pass


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the JPEG header; None when ``data`` is not a JPEG."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return height, width
    except ValueError:
        return None


_scratch = threading.local()


def _scratch_buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        # Grow geometrically; one buffer per thread is reused for every image, which
        # spares the page faults of a fresh ~0.5 MB allocation per decode.
        buf = _scratch.buf = np.empty(max(nbytes, 2 * (0 if buf is None else buf.size)), dtype=np.uint8)
    return buf[:nbytes]


def decode_rgb(data: bytes, min_height: int = 0, min_width: int = 0, scratch: bool = False) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 RGB array.

    With ``min_height`` / ``min_width`` a JPEG may come back downscaled (by M/8), never
    below those sizes; callers map their crop boxes by the returned shape.
    ``scratch=True`` decodes into a per-thread buffer that the next scratch decode
    overwrites: for callers that copy what they keep (a crop) before decoding again.
    """
    try:
        if scratch:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data, min_height=min_height, min_width=min_width)
            buf = _scratch_buffer(h * w * 3)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width,
                                          buffer=buf)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width)
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and (min_height or min_width):
                im.draft("RGB", (min_width, min_height))
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only
    except Exception as e:
        raise DecodeError(f"undecodable image ({len(data)} bytes): {type(e).__name__}: {e}") from e
