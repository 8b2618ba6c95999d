"""itpn-prep: ImageNet-style inputs (folder and nested tar, odd files included) -> shards."""

import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_prep import cli, writer
from data_prep.writer import ShardOptions, verify_shards, write_shards
from data_prep.sources import scan_folder

WNIDS = ["n01000003", "n01000001", "n01000002"]  # listed unsorted on purpose
CLASSES = sorted(WNIDS)
PER_CLASS = 6


def _jpeg(seed: int, mode: str = "RGB", size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _fake_imagenet() -> dict[str, dict[str, bytes]]:
    """wnid -> {file name: bytes}: RGB JPEGs plus a CMYK JPEG, a PNG named .JPEG, a grayscale
    JPEG and a truncated JPEG."""
    files = {}
    for c, wnid in enumerate(CLASSES):
        files[wnid] = {f"{wnid}_{i}.JPEG": _jpeg(100 * c + i) for i in range(PER_CLASS)}
    files[CLASSES[0]][f"{CLASSES[0]}_cmyk.JPEG"] = _jpeg(900, mode="CMYK")
    files[CLASSES[1]][f"{CLASSES[1]}_png.JPEG"] = _png(901)
    files[CLASSES[2]][f"{CLASSES[2]}_gray.JPEG"] = _jpeg(902, mode="L")
    full = _jpeg(903, size=(64, 48))
    files[CLASSES[2]][f"{CLASSES[2]}_trunc.JPEG"] = full[: len(full) * 6 // 10]
    return files


GOOD = {name: wnid for wnid, fs in _fake_imagenet().items() for name in fs if "trunc" not in name}
TRUNCATED = f"{CLASSES[2]}_trunc.JPEG"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    files = _fake_imagenet()
    for wnid in WNIDS:
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for name, data in files[wnid].items():
            (d / name).write_bytes(data)
    # The original layout: an outer tar holding one uncompressed tar per class.
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for name, data in files[wnid].items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = inner.tell()
            inner.seek(0)
            outer.addfile(info, inner)
    return root


def _read_shards(out) -> list[dict]:
    """Samples of every shard in manifest order: {"shard", "key", "jpg", "cls", "json"}."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for rec in manifest["shards"]:
        with tarfile.open(out / rec["name"]) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1]["key"] != key or samples[-1]["shard"] != rec["name"]:
                    samples.append({"shard": rec["name"], "key": key})
                samples[-1][ext] = t.extractfile(m).read()
    return samples


def _prep(*args) -> int:
    return cli.main(["-q", *[str(a) for a in args]])


def test_folder_every_good_image_once_with_its_label(inputs, tmp_path):
    out = tmp_path / "shards"
    assert _prep("folder", inputs / "train", out, "--shard-samples", 4, "--workers", 1, "--no-progress") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    samples = _read_shards(out)

    sources = [os.path.basename(json.loads(s["json"])["source"]) for s in samples]
    assert sorted(sources) == sorted(GOOD)                       # every good image exactly once
    for s, src in zip(samples, sources):
        meta = json.loads(s["json"])
        assert int(s["cls"]) == CLASSES.index(GOOD[src]) and meta["wnid"] == GOOD[src]
        with Image.open(io.BytesIO(s["jpg"])) as im:                # stored as RGB JPEG
            assert (im.format, im.mode) == ("JPEG", "RGB")
        if "cmyk" in src or "png" in src or "gray" in src:
            assert "reencoded" in meta
        else:
            assert "reencoded" not in meta and s["jpg"] == (inputs / "train" / GOOD[src] / src).read_bytes()
    assert [s["source"].endswith(TRUNCATED) for s in manifest["skipped"]] == [True]

    assert manifest["total"] == len(GOOD) == sum(r["samples"] for r in manifest["shards"])
    assert manifest["classes"] == CLASSES and manifest["complete"]
    per_shard = {r["name"]: r["samples"] for r in manifest["shards"]}
    assert per_shard == {n: sum(s["shard"] == n for s in samples) for n in per_shard}
    assert all(len(s["key"]) and "." not in s["key"] for s in samples)
    for r in manifest["shards"]:
        assert r["sha256"] == hashlib.sha256((out / r["name"]).read_bytes()).hexdigest()
    # Globally shuffled: shards mix classes, and the label sequence is not class-sorted.
    labels = [int(s["cls"]) for s in samples]
    assert max(len({int(s["cls"]) for s in samples if s["shard"] == n}) for n in per_shard) > 1
    assert labels != sorted(labels)
    # Files the trainers read.
    assert (out / "classes.txt").read_text().split() == CLASSES
    assert json.loads((out / "sizes.json").read_text()) == per_shard
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert info["num_samples"] == len(GOOD) and info["shard_lengths"] == list(per_shard.values())


def test_nested_imagenet_tar_gives_the_same_samples(inputs, tmp_path):
    a, b = tmp_path / "from_folder", tmp_path / "from_tar"
    assert _prep("folder", inputs / "train", a, "--shard-samples", 5, "--no-progress") == 0
    assert _prep("imagenet-tar", inputs / "ILSVRC2012_img_train.tar", b, "--shard-samples", 5, "--no-progress") == 0

    def content(out):
        return sorted((s["key"], int(s["cls"]), hashlib.sha256(s["jpg"]).hexdigest()) for s in _read_shards(out))

    assert content(a) == content(b) and len(content(b)) == len(GOOD)
    # Same plan: the same keys land in the same shards in the same order.
    assert [s["key"] for s in _read_shards(a)] == [s["key"] for s in _read_shards(b)]
    skipped = json.loads((b / "manifest.json").read_text())["skipped"]
    assert len(skipped) == 1 and skipped[0]["source"].endswith(TRUNCATED) and ".tar/" in skipped[0]["source"]


def test_worker_processes_write_identical_shards(inputs, tmp_path):
    classes, refs = scan_folder(str(inputs / "train"))
    m1 = write_shards(classes, refs, str(tmp_path / "w1"), ShardOptions(shard_samples=4, workers=1, progress=False), "x")
    m2 = write_shards(classes, refs, str(tmp_path / "w2"), ShardOptions(shard_samples=4, workers=2, progress=False), "x")
    assert [r["sha256"] for r in m1["shards"]] == [r["sha256"] for r in m2["shards"]]
    m3 = write_shards(classes, refs, str(tmp_path / "s1"), ShardOptions(shard_samples=4, seed=1, progress=False), "x")
    assert [r["sha256"] for r in m1["shards"]] != [r["sha256"] for r in m3["shards"]]


def test_shard_bytes_option(inputs, tmp_path):
    classes, refs = scan_folder(str(inputs / "train"))
    limit = 3 * max(r.size for r in refs)
    m = write_shards(classes, refs, str(tmp_path / "b"),
                     ShardOptions(shard_samples=None, shard_bytes=limit, progress=False), "x")
    assert len(m["shards"]) > 2 and m["total"] == len(GOOD)
    size = {os.path.basename(r.source): r.size for r in refs}
    per_shard = {}
    for smp in _read_shards(tmp_path / "b"):
        per_shard[smp["shard"]] = per_shard.get(smp["shard"], 0) + size[json.loads(smp["json"])["source"].split("/")[-1]]
    assert max(per_shard.values()) <= limit
    assert len(per_shard) <= 2 * sum(size.values()) // limit + 1


def _val_inputs(root):
    val = root / "val_flat"
    val.mkdir()
    labels = {}
    for i in range(7):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (val / f"{name}.JPEG").write_bytes(_jpeg(500 + i))
        labels[name] = CLASSES[i % 3]
    (val / "ILSVRC2012_val_00000099.JPEG").write_bytes(_jpeg(599))  # no label: skipped
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for name, wnid in labels.items():
            w.writerow([name, f"{wnid} 1 2 30 20 {wnid} 3 4 10 12"])
    (root / "val.txt").write_text("".join(f"{n}.JPEG {w}\n" for n, w in labels.items()))
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
        for p in sorted(val.iterdir()):
            t.add(p, arcname=p.name)
    return labels


def test_val_folder_tar_and_label_formats(inputs, tmp_path):
    labels = _val_inputs(tmp_path)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("\n".join(CLASSES) + "\n")
    runs = {"csv": (tmp_path / "val_flat", tmp_path / "LOC_val_solution.csv"),
            "txt": (tmp_path / "val_flat", tmp_path / "val.txt"),
            "tar": (tmp_path / "ILSVRC2012_img_val.tar", tmp_path / "LOC_val_solution.csv")}
    for name, (src, lab) in runs.items():
        out = tmp_path / f"out_{name}"
        assert _prep("val", src, lab, out, "--classes", classes_file, "--shard-samples", 3, "--no-progress") == 0
        got = {json.loads(s["json"])["source"].rsplit(":", 1)[-1].split(".")[0]: int(s["cls"])
               for s in _read_shards(out)}
        assert got == {n: CLASSES.index(w) for n, w in labels.items()}, name
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["split"] == "val" and manifest["shards"][0]["name"].startswith("val-")
        assert len(manifest["skipped"]) == 1 and "00000099" in manifest["skipped"][0]["source"]


def _snapshot(out):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("train-*.tar")}


def test_rerun_keeps_good_shards_and_rebuilds_damaged_ones(inputs, tmp_path):
    out = tmp_path / "shards"
    args = ("folder", inputs / "train", out, "--shard-samples", 4, "--no-progress")
    assert _prep(*args) == 0
    first = json.loads((out / "manifest.json").read_text())
    names = [r["name"] for r in first["shards"]]
    before = _snapshot(out)
    (out / names[1]).unlink()
    damaged = bytearray((out / names[2]).read_bytes())
    damaged[700] ^= 0xFF
    (out / names[2]).write_bytes(bytes(damaged))
    (out / f"{names[3]}.tmp-12345").write_bytes(b"half a shard")   # leftover of a killed run

    assert _prep(*args) == 0
    second = json.loads((out / "manifest.json").read_text())
    assert [r["sha256"] for r in second["shards"]] == [r["sha256"] for r in first["shards"]]
    after = _snapshot(out)
    for n in (names[0], names[3], names[4]):
        assert after[n] == before[n]                                   # kept, not rewritten
    assert not list(out.glob("*.tmp-*"))
    assert verify_shards(str(out)) == []


def test_interrupted_run_resumes(inputs, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert _prep("folder", inputs / "train", reference, "--shard-samples", 4, "--no-progress") == 0
    out = tmp_path / "shards"
    real, calls = writer._build_shard, []

    def dies_on_third_shard(task):
        calls.append(task[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(writer, "_build_shard", dies_on_third_shard)
    classes, refs = scan_folder(str(inputs / "train"))
    with pytest.raises(KeyboardInterrupt):
        write_shards(classes, refs, str(out), ShardOptions(shard_samples=4, workers=1, progress=False), "x")
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [r["name"] for r in partial["shards"]] == calls[:2]
    assert any("incomplete" in p for p in verify_shards(str(out)))
    assert sorted(p.name for p in out.glob("train-*")) == sorted(calls[:2])   # no half shard under a final name
    kept = _snapshot(out)

    monkeypatch.setattr(writer, "_build_shard", real)
    assert _prep("folder", inputs / "train", out, "--shard-samples", 4, "--no-progress") == 0
    done = json.loads((out / "manifest.json").read_text())
    ref = json.loads((reference / "manifest.json").read_text())
    assert done["complete"] and [r["sha256"] for r in done["shards"]] == [r["sha256"] for r in ref["shards"]]
    assert {n: v for n, v in _snapshot(out).items() if n in kept} == kept


def test_verify_catches_a_corrupted_shard(inputs, tmp_path, capsys):
    out = tmp_path / "shards"
    assert _prep("folder", inputs / "train", out, "--shard-samples", 4, "--no-progress") == 0
    assert _prep("verify", out, "--decode", "--workers", 1) == 0
    name = json.loads((out / "manifest.json").read_text())["shards"][1]["name"]
    data = bytearray((out / name).read_bytes())
    data[-2000] ^= 0x01                                   # one flipped bit inside a member
    (out / name).write_bytes(bytes(data))
    capsys.readouterr()
    assert _prep("verify", out, "--workers", 1) == 1
    assert name in capsys.readouterr().out
    (out / name).unlink()
    assert any(name in p and "missing" in p for p in verify_shards(str(out), workers=1))


def test_webdataset_reads_the_shards(inputs, tmp_path):
    import webdataset as wds
    out = tmp_path / "shards"
    assert _prep("folder", inputs / "train", out, "--shard-samples", 100, "--no-progress") == 0
    samples = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False))
    assert len(samples) == len(GOOD)
    assert all({"__key__", "jpg", "cls", "json"} <= set(s) for s in samples)


def test_bad_source_is_reported_not_fatal(tmp_path):
    (tmp_path / "src").mkdir()
    assert _prep("folder", tmp_path / "missing", tmp_path / "out") == 1
    assert _prep("folder", tmp_path / "src", tmp_path / "out") == 1      # no class folders


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="the demo photos ship with scikit-image")
def test_demo_builds_train_and_val(tmp_path):
    assert _prep("demo", tmp_path, "--no-progress") == 0
    for split, total in (("train", 480), ("val", 160)):
        m = json.loads((tmp_path / split / "manifest.json").read_text())
        assert m["total"] == total and len(m["classes"]) == 10 and m["skipped"] == []
        assert verify_shards(str(tmp_path / split), workers=1) == []
    assert len(list((tmp_path / "images" / "train").glob("*/*.JPEG"))) == 480


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "imagenet-tar" in r.stdout
