"""The embedded demo data set: small, real-image, labelled, built without network access.

scikit-image ships a handful of real photographs inside its wheel (``skimage/data``). The
demo takes ten of them -- one class each -- and cuts every photo (shrunk to at most 400 px) into
deterministic random crops (10-60% of the photo's area, aspect 3/4-4/3, random horizontal flip),
resized so the shorter side is 96-128 px and saved as JPEG (quality 90). The label of a
crop is the photo it came from. Train and val crops use different random streams of the
same photos, so the task is "which photo is this patch from": easy, but real pixels with
real statistics, enough to see a loss fall and a top-1 rise in a smoke run.

Only the files are read; skimage itself is never imported (that would pull in scipy).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
from PIL import Image

from .sources import scan_folder
from .writer import ShardOptions, write_shards

log = logging.getLogger(__name__)

# class name -> file in skimage/data. Two are grayscale (camera, coins); they are stored
# as 3-channel JPEGs like ImageNet's few grayscale photos after preparation.
DEMO_PHOTOS = {
    "astronaut": "astronaut.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "hubble": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "motorcycle": "motorcycle_left.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}

__all__ = ["DEMO_PHOTOS", "skimage_data_dir", "make_demo_images", "build_demo"]


def skimage_data_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.origin:
        raise RuntimeError("the demo data set is cut from the photos shipped with scikit-image: "
                           "pip install scikit-image")
    path = os.path.join(os.path.dirname(spec.origin), "data")
    missing = [f for f in DEMO_PHOTOS.values() if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise RuntimeError(f"scikit-image at {path} lacks the demo photos {missing}")
    return path


def _crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    for _ in range(20):
        area = w * h * rng.uniform(0.1, 0.6)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    shorter = int(rng.integers(96, 129))
    scale = shorter / min(cw, ch)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def make_demo_images(root: str, train_per_class: int = 48, val_per_class: int = 16, seed: int = 0) -> None:
    """Write ``root/{train,val}/<class>/<class>_NNNN.JPEG`` (ImageFolder layout)."""
    src = skimage_data_dir()
    for c, (name, fname) in enumerate(sorted(DEMO_PHOTOS.items())):
        with Image.open(os.path.join(src, fname)) as im:
            photo = im.convert("RGB")
        # Shrink the large photos (retina is 1411 px) first: a 10%-area crop of a 400 px
        # photo is still >= 126 px, and every crop then resizes from a small image.
        photo.thumbnail((400, 400), Image.BICUBIC)
        for split, count, stream in (("train", train_per_class, 0), ("val", val_per_class, 1)):
            out = os.path.join(root, split, name)
            os.makedirs(out, exist_ok=True)
            rng = np.random.default_rng([seed, c, stream])
            for i in range(count):
                _crop(photo, rng).save(os.path.join(out, f"{name}_{i:04d}.JPEG"), quality=90)


def build_demo(out: str, seed: int = 0, workers: int = 0, progress: bool = True,
               shard_samples: int = 64) -> dict[str, dict]:
    """Images under ``out/images``, shards under ``out/train`` and ``out/val``."""
    images = os.path.join(out, "images")
    make_demo_images(images, seed=seed)
    manifests = {}
    for split in ("train", "val"):
        classes, refs = scan_folder(os.path.join(images, split))
        opts = ShardOptions(split=split, shard_samples=shard_samples, seed=seed, workers=workers,
                            progress=progress)
        manifests[split] = write_shards(classes, refs, os.path.join(out, split), opts,
                                        source="demo: crops of scikit-image sample photos")
    return manifests
