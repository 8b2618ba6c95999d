"""Data-loader throughput per CPU core: our shard pipelines against torchvision ImageFolder + PIL.

Builds an ImageNet-like image set (default: 640 JPEGs of 500x375, quality 90, cut from
the real photos that scikit-image ships; random-noise photos if it is missing), writes it
both as an ImageFolder tree and as shards, then measures, in one process with one torch
thread, images per CPU-second (images/s per core) of each pipeline and of its plain
counterpart on the same images:

* pretrain: RandomResizedCrop 224 (0.2-1, bicubic) + flip + colour jitter 0.4 +
  ImageNet normalisation + random 75% mask;
* pretrain+CLIP view: the same with a second 224 view of the crop in CLIP normalisation
  and a block mask (75 of 196), as the CLIP-distillation recipe;
* finetune: timm's training transform (RandAugment rand-m9-mstd0.5-inc1, random erasing
  0.25, bicubic);
* eval: resize 256 + centre crop 224.

The plain pipeline is ``torchvision.datasets.ImageFolder`` with PIL decoding and the
torchvision/timm transforms, batched by a DataLoader without workers. Ours runs twice:
normalising in the worker (float32 batches), and with ``normalize="device"`` (uint8
batches; ``ShardLoader.to_device`` normalises -- and, for fine-tuning, random-erases --
on the accelerator, which this CPU-only figure leaves out).

    python benchmarks/bench_loader.py [--images 640] [--batch-size 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from itpn.data import (FinetuneAugment, PretrainAugment, build_eval_loader, build_finetune_loader,
                       build_pretrain_loader)
from itpn.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, fix_posterize
from itpn.objectives.masking import MaskGenerator

log = logging.getLogger("bench_loader")


def make_images(root: str, count: int, size=(500, 375), seed: int = 0) -> None:
    """ImageFolder tree of ``count`` JPEGs, 10 classes, ImageNet-like size and quality."""
    try:
        from data_prep.demo import DEMO_PHOTOS, skimage_data_dir
        src = skimage_data_dir()
        photos = [Image.open(os.path.join(src, f)).convert("RGB") for f in DEMO_PHOTOS.values()]
    except RuntimeError:
        log.warning("scikit-image not installed: using noise images (decode speed differs from photos)")
        rng = np.random.default_rng(seed)
        photos = [Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)) for _ in range(10)]
    rng = np.random.default_rng(seed)
    for i in range(count):
        c = i % len(photos)
        photo = photos[c]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch)).resize(size if i % 3 else size[::-1], Image.BICUBIC)
        d = os.path.join(root, f"class{c:02d}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"img{i:05d}.JPEG"), quality=90)


class _PlainPretrain:
    """torchvision transforms on PIL, the same augmentation as our pre-training pipeline."""

    def __init__(self, teacher: bool):
        import torchvision.transforms as T
        self.crop = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                               T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4)])
        self.student = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.teacher = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]) if teacher else None
        self.mask = (MaskGenerator("block", 14, num_masked=75) if teacher else
                     MaskGenerator("random", 14, ratio=0.75))
        self.rng = np.random.default_rng(0)

    def __call__(self, img):
        img = self.crop(img)
        out = [self.student(img), torch.from_numpy(self.mask(self.rng))]
        if self.teacher is not None:
            out.append(self.teacher(img))
        return out


def plain_loader(root: str, kind: str, batch_size: int):
    import torchvision.transforms as T
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    if kind == "pretrain":
        tf = _PlainPretrain(teacher=False)
    elif kind == "pretrain+clip":
        tf = _PlainPretrain(teacher=True)
    elif kind == "finetune":
        tf = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                              re_prob=0.25, re_mode="pixel", re_count=1)
        fix_posterize(tf)  # Pillow >= 11 rejects timm's 0-bit posterize; see transforms.fix_posterize
    else:
        tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.utils.data.DataLoader(ImageFolder(root, transform=tf), batch_size=batch_size, shuffle=True,
                                       num_workers=0, drop_last=True)


def ours_loader(shards: str, kind: str, batch_size: int, normalize: str):
    common = dict(num_workers=0, seed=0)
    if kind == "pretrain":
        return build_pretrain_loader(shards, batch_size, PretrainAugment(normalize=normalize), **common)
    if kind == "pretrain+clip":
        return build_pretrain_loader(shards, batch_size, PretrainAugment(teacher_size=224, mask="block",
                                                                         normalize=normalize), **common)
    if kind == "finetune":
        return build_finetune_loader(shards, batch_size, FinetuneAugment(normalize=normalize), **common)
    return build_eval_loader(shards, batch_size, num_workers=0, normalize=normalize)


def images_per_second(loader, batch_size: int, min_batches: int, warmup: int = 1) -> float:
    """Images per CPU-second of this process over ``min_batches`` batches after ``warmup``.

    CPU time (user + system, one thread) is what "per core" means, and unlike wall time
    it does not move when other processes share the machine.
    """
    done, t0, n = 0, None, 0
    while t0 is None or n < min_batches:
        for _ in loader:
            done += 1
            if done == warmup:
                t0 = time.process_time()
            elif done > warmup:
                n += 1
                if n >= min_batches:
                    break
    return n * batch_size / (time.process_time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=640, help="images in the test set (default 640)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=9, help="timed batches per run (default 9)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per pipeline; the median is reported (default 3)")
    ap.add_argument("--pipelines", default="pretrain,pretrain+clip,finetune,eval")
    ap.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # one core: the figures are per core

    from data_prep.sources import scan_folder
    from data_prep.writer import ShardOptions, write_shards
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        root, shards = os.path.join(work, "images"), os.path.join(work, "shards")
        if not os.path.isdir(root):
            make_images(root, args.images)
        classes, refs = scan_folder(root)
        write_shards(classes, refs, shards, ShardOptions(shard_samples=128, workers=1, progress=False), root)
        results = []
        for kind in args.pipelines.split(","):
            # Alternate the pipelines and keep the median of --repeats runs: a shared machine
            # drifts by 10-20% between consecutive runs.
            runs = {"plain": [], "worker": [], "device": []}
            for _ in range(args.repeats):
                # The plain pipeline draws from the global generators: seed them so every run
                # (like ours, seeded per sample) does the same augmentation work.
                random.seed(0)
                np.random.seed(0)
                torch.manual_seed(0)
                runs["plain"].append(images_per_second(plain_loader(root, kind, args.batch_size),
                                                       args.batch_size, args.batches))
                for normalize in ("worker", "device"):
                    runs[normalize].append(images_per_second(ours_loader(shards, kind, args.batch_size, normalize),
                                                             args.batch_size, args.batches))
            plain = float(np.median(runs["plain"]))
            for normalize in ("worker", "device"):
                ours = float(np.median(runs[normalize]))
                results.append({"pipeline": kind, "normalize": normalize, "ours": ours, "plain": plain,
                                "speedup": ours / plain, "runs": runs[normalize], "plain_runs": runs["plain"]})

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"images/s per CPU core ({args.images} JPEGs 500x375 q90, batch {args.batch_size}, 1 process, "
          f"1 torch thread, images per CPU-second, median of {args.repeats} runs; torch {torch.__version__}, {cpu})")
    print("| pipeline | normalised in | ours (shards) | plain ImageFolder + PIL | speedup |")
    print("|---|---|---|---|---|")
    for r in results:
        where = "worker (float32 out)" if r["normalize"] == "worker" else "device (uint8 out)"
        print(f"| {r['pipeline']} | {where} | {r['ours']:.0f} | {r['plain']:.0f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "argv": sys.argv[1:], "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
