"""Shard loaders: equal batches per rank, exact resume, views, masks, bad data, eval coverage."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.sources import scan_folder
from data_prep.writer import ShardOptions, write_shards
from itpn.data import (FinetuneAugment, PretrainAugment, ShardOpenError, TrainLayout, build_criterion,
                       build_eval_loader, build_finetune_loader, build_mixup, build_pretrain_loader, load_shardset)
from itpn.data.decode import DecodeError, decode_rgb
from itpn.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EvalTransform

NUM = 50
NUM_CLASSES = 5


def _photo(i: int, size=(56, 44)) -> np.ndarray:
    """A smooth, distinct image per index (gradients + a class tint), like a small photo."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(i)
    f = rng.uniform(0.05, 0.2, 3)
    ph = rng.uniform(0, 6.28, 3)
    img = np.stack([127 + 100 * np.sin(f[c] * (x + 1.7 * y) + ph[c]) for c in range(3)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(NUM):
        d = root / f"class{i % NUM_CLASSES}"
        d.mkdir(exist_ok=True)
        sz = (56, 44) if i % 2 else (44, 56)
        (d / f"img{i:03d}.JPEG").write_bytes(_jpeg(_photo(i, sz)))
    return root


def _shards(root, out, shard_samples):
    classes, refs = scan_folder(str(root))
    write_shards(classes, refs, str(out), ShardOptions(shard_samples=shard_samples, progress=False), "test")
    return str(out)


@pytest.fixture(scope="module")
def shards(image_root, tmp_path_factory):
    """50 samples in 8 uneven shards (7 x 7 + 1)."""
    return _shards(image_root, tmp_path_factory.mktemp("shards"), 7)


@pytest.fixture(scope="module")
def labels(shards):
    """key -> class index, read straight from the shards."""
    out = {}
    for p in load_shardset(shards).paths:
        with tarfile.open(p) as t:
            for m in t:
                if m.name.endswith(".cls"):
                    out[m.name[:-4]] = int(t.extractfile(m).read())
    return out


AUG = dict(input_size=32, patch_size=8)


def _keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("shard_samples", [7, 30])   # 8 uneven shards; 2 shards for 4 streams
def test_two_ranks_two_workers_yield_equal_batches(image_root, tmp_path, shard_samples):
    data = _shards(image_root, tmp_path / "s", shard_samples)
    per_rank = []
    for rank in (0, 1):
        loader = build_pretrain_loader(data, 4, PretrainAugment(**AUG), rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == NUM // (2 * 4)
        assert all(b["image"].shape == (4, 3, 32, 32) for b in batches)
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0
        per_rank.append(_keys(batches))
    keys = per_rank[0] + per_rank[1]
    assert len(keys) == len(set(keys)) == 48          # no sample twice within the epoch


def test_epoch_length_and_epoch_seeded_order(shards):
    loader = build_pretrain_loader(shards, 4, PretrainAugment(**AUG), num_workers=0, epoch_length=3 * NUM)
    assert len(loader) == 3 * NUM // 4
    e0 = _keys(list(loader))
    e1 = _keys(list(loader))
    assert len(e0) == len(e1) == 3 * NUM // 4 * 4 and e0 != e1
    again = build_pretrain_loader(shards, 4, PretrainAugment(**AUG), num_workers=0, epoch_length=3 * NUM)
    assert _keys(list(again)) == e0                   # same seed and epoch: same order
    other = build_pretrain_loader(shards, 4, PretrainAugment(**AUG), num_workers=0, epoch_length=3 * NUM, seed=1)
    assert _keys(list(other)) != e0


def test_resume_is_sample_exact(shards):
    def make():
        return build_pretrain_loader(shards, 4, PretrainAugment(**AUG, teacher_size=16), num_workers=2,
                                     shuffle_buffer=6, mix=2)
    loader = make()
    full, state = [], None
    for i, b in enumerate(loader):
        full.append(b)
        if i == 2:
            state = loader.state_dict()
    assert state["step"] == 3 and state["epoch"] == 0
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest):
        assert a["key"] == b["key"]
        for name in ("image", "teacher_image", "mask"):
            assert torch.equal(a[name], b[name])
    assert resumed.state_dict()["epoch"] == 1


def test_masks_have_the_configured_count(shards):
    for kind, expected in (("random", 48), ("block", 24)):   # grid 8: 64 - int(64*0.25); round(75/196*64)
        loader = build_pretrain_loader(shards, 5, PretrainAugment(input_size=64, patch_size=8, mask=kind),
                                       num_workers=0)
        masks = torch.cat([b["mask"] for b in loader])
        assert masks.shape[1] == 64 and masks.dtype == torch.bool
        assert (masks.sum(1) == expected).all()
        assert len({tuple(m.tolist()) for m in masks}) > len(masks) // 2   # drawn per sample


def test_teacher_view_is_the_same_crop(shards):
    aug = PretrainAugment(input_size=48, teacher_size=24, patch_size=8, color_jitter=0.4)
    batch = next(iter(build_pretrain_loader(shards, 8, aug, num_workers=0)))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cmean, cstd = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    student = batch["image"] * std + mean                    # back to [0, 1] with each consumer's stats
    teacher = batch["teacher_image"] * cstd + cmean
    small = torch.nn.functional.interpolate(student, size=(24, 24), mode="bicubic", antialias=True)
    same = (small - teacher).abs().mean(dim=(1, 2, 3))
    other = (small - teacher.roll(1, 0)).abs().mean(dim=(1, 2, 3))  # each teacher vs another sample
    assert same.max() < 0.03 and other.min() > 3 * same.max()


def test_device_normalisation_matches_worker(shards):
    out = {}
    for where in ("worker", "device"):
        loader = build_pretrain_loader(shards, 4, PretrainAugment(**AUG, teacher_size=16, normalize=where),
                                       num_workers=0)
        raw = next(iter(loader))
        assert raw["image"].dtype == (torch.uint8 if where == "device" else torch.float32)
        out[where] = loader.to_device(raw, "cpu")
    for name in ("image", "teacher_image"):
        assert out["device"][name].dtype == torch.float32
        assert (out["device"][name] - out["worker"][name]).abs().max() < 0.6 / 255 / 0.22


def _write_tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = [(f"g{i:02d}", _jpeg(_photo(i))) for i in range(12)]
    _write_tar(tmp_path / "a.tar", [m for k, d in good[:6] for m in ((f"{k}.jpg", d), (f"{k}.cls", b"1"))]
               + [("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.cls", b"1")])
    _write_tar(tmp_path / "b.tar", [m for k, d in good[6:] for m in ((f"{k}.jpg", d), (f"{k}.cls", b"2"))])
    whole = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[: len(whole) // 2 + 100])   # cut inside a member
    (tmp_path / "sizes.json").write_text(json.dumps({"a.tar": 7, "b.tar": 6}))

    # 24 samples per epoch: the first cycle over all 13 positions is read whole.
    loader = build_pretrain_loader(str(tmp_path), 4, PretrainAugment(**AUG), num_workers=0, shuffle_buffer=13,
                                   mix=1, epoch_length=24)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert len(batches) == len(loader) == 6
    keys = _keys(batches)
    assert "bad" not in keys and set(keys) <= {k for k, _ in good}
    assert loader.bad_samples >= 2                           # the corrupt jpg + the cut-off sample(s)
    assert "bad sample bad in" in caplog.text and "b.tar" in caplog.text

    evalr = build_eval_loader(str(tmp_path), 5, input_size=32, num_workers=0)
    eb = list(evalr)
    valid = torch.cat([b["valid"] for b in eb])
    assert len(eb) == 3 and valid.sum() == 13 - evalr.bad_samples and evalr.bad_samples >= 2


def test_unopenable_shard_is_reported_by_path(shards, tmp_path):
    ss = load_shardset(shards)
    (tmp_path / "sizes.json").write_text(json.dumps({"nothere.tar": 5}))
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(ShardOpenError, match="nothere.tar"):
        list(build_pretrain_loader(str(tmp_path), 2, PretrainAugment(**AUG), num_workers=0, mix=1))
    (tmp_path / "sizes.json").write_text(json.dumps({"garbage.tar": 5, os.path.relpath(ss.paths[0], tmp_path): 7}))
    with pytest.raises(Exception, match="garbage.tar"):  # raised in a worker, re-raised here
        list(build_pretrain_loader(str(tmp_path), 2, PretrainAugment(**AUG), num_workers=2, mix=1))


def test_eval_covers_every_sample_once(shards, labels):
    seen = {}
    lengths = []
    for rank in (0, 1):
        loader = build_eval_loader(shards, 4, input_size=32, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        lengths.append((len(batches), len(loader)))
        for b in batches:
            assert b["image"].shape == (4, 3, 32, 32)
            for key, label, valid in zip(b["key"], b["label"].tolist(), b["valid"].tolist()):
                if valid:
                    assert key not in seen and label == labels[key]
                    seen[key] = label
    assert lengths == [(7, 7), (7, 7)]                       # 25 per rank -> 7 batches, padded
    assert set(seen) == set(labels) and len(seen) == NUM


def test_eval_transform_matches_timm(tmp_path):
    from timm.data import create_transform
    data = _jpeg(_photo(3, (120, 90)))
    ours = EvalTransform(64, crop_pct=0.875, decode_scale=False)(data)["image"]
    ref = create_transform(64, is_training=False, crop_pct=0.875, interpolation="bicubic")(
        Image.open(io.BytesIO(data)).convert("RGB"))
    assert ours.shape == ref.shape == (3, 64, 64)
    assert (ours - ref).abs().mean() < 0.02                 # ~1 grey level after normalisation
    shifted = create_transform(64, is_training=False, crop_pct=0.95, interpolation="bicubic")(
        Image.open(io.BytesIO(data)).convert("RGB"))
    assert (ours - shifted).abs().mean() > 0.05             # the comparison can tell crops apart


def test_finetune_loader_and_mixup(shards, labels):
    loader = build_finetune_loader(shards, 4, FinetuneAugment(input_size=32), num_workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == NUM // 4
    for b in batches:
        assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["label"].tolist() == [labels[k] for k in b["key"]]
    mixup = build_mixup(NUM_CLASSES, label_smoothing=0.1)
    x, y = mixup(batches[0]["image"].clone(), batches[0]["label"].clone())
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, NUM_CLASSES)
    assert torch.allclose(y.sum(1), torch.ones(4))
    assert type(build_criterion(mixup)).__name__ == "SoftTargetCrossEntropy"
    assert build_mixup(NUM_CLASSES, mixup=0, cutmix=0) is None
    assert type(build_criterion(None, 0.1)).__name__ == "LabelSmoothingCrossEntropy"
    dev = build_finetune_loader(shards, 4, FinetuneAugment(input_size=32, normalize="device"), num_workers=0)
    b = dev.to_device(next(iter(dev)), "cpu")
    assert b["image"].dtype == torch.float32 and b["image"].shape == (4, 3, 32, 32)


def test_decode_fallbacks():
    arr = _photo(5)
    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG", quality=95)
    assert np.array_equal(decode_rgb(png.getvalue()), arr)
    assert decode_rgb(cmyk.getvalue()).shape == arr.shape
    full = _jpeg(_photo(6, (200, 150)))
    with pytest.raises(DecodeError):
        decode_rgb(full[: len(full) // 2])
    small = decode_rgb(full, min_height=40, min_width=40)       # DCT-domain downscale, by M/8
    assert 40 <= small.shape[0] < 150 and 40 <= small.shape[1] < 200


@pytest.mark.parametrize("world,workers,batch,length,mix", [(2, 2, 4, 50, 4), (3, 1, 5, 97, 2), (1, 4, 3, 1000, 3)])
def test_train_layout_partitions_the_epoch(world, workers, batch, length, mix):
    layout = TrainLayout(world, workers, batch, length, mix)
    spans = sorted((s, n) for r in range(world) for v in range(workers) for s, n in layout.sub_ranges(r, v))
    pos = 0
    for start, n in spans:
        assert start == pos
        pos += n
    assert pos == layout.batches_per_rank * world * batch
    for v in range(workers):
        assert sum(n for _, n in layout.sub_ranges(0, v)) == layout.stream_quota(v)
    with pytest.raises(ValueError):
        TrainLayout(world, workers, batch, world * batch - 1, mix)
