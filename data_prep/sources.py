"""Enumerate the images of a dataset source without reading their pixels.

Each image becomes a ``SampleRef`` that says where its bytes are: a file, or a byte range
inside a tar. ImageNet's ``ILSVRC2012_img_train.tar`` holds one tar per class; its members
are indexed in one pass over the tar headers (data is skipped by seeking), and the image
bytes are later read in place by byte offset -- nothing is unpacked to disk, and the index
allows the global shuffle and the parallel shard writers.

Class index = position of the class name (wnid) in sorted order, as in torchvision's
``ImageFolder``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tarfile
from typing import Iterable, NamedTuple

log = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS, compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = ["SampleRef", "scan_folder", "scan_imagenet_tar", "scan_val", "read_labels", "read_bytes",
           "assign_keys", "IMG_EXTENSIONS"]


class SampleRef(NamedTuple):
    wnid: str          # class name
    source: str        # human-readable origin: relative path, or "outer.tar:inner.tar/member"
    path: str          # file to read
    offset: int        # byte offset of the image data in ``path`` (0 for plain files)
    size: int          # byte length of the image data


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_folder(src: str) -> tuple[list[str], list[SampleRef]]:
    """``src/<class>/**/<image>``: every sub-folder is a class (torchvision's ImageFolder)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder not found: {src}")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not classes:
        raise ValueError(f"no class sub-folders in {src}")
    refs = []
    for wnid in classes:
        root = os.path.join(src, wnid)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if _is_image(name):
                    path = os.path.join(dirpath, name)
                    refs.append(SampleRef(wnid, os.path.relpath(path, src), path, 0, os.path.getsize(path)))
    if not refs:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) under the class folders of {src}")
    return classes, refs


def scan_imagenet_tar(tar_path: str) -> tuple[list[str], list[SampleRef]]:
    """Index ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class) by byte offsets."""
    refs = []
    classes = []
    with open(tar_path, "rb") as fobj:
        if not fobj.seekable():
            raise ValueError(f"{tar_path} is not seekable: give the tar file itself, not a pipe")
        with tarfile.open(fileobj=fobj, mode="r:") as outer:
            for member in outer:
                if not (member.isfile() and member.name.endswith(".tar")):
                    continue
                wnid = os.path.basename(member.name)[: -len(".tar")]
                classes.append(wnid)
                inner_file = outer.extractfile(member)
                # Inner offsets are relative to the start of the inner tar's data inside
                # the outer tar; their sum addresses the image bytes in the outer file.
                with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                    for im in inner:
                        if im.isfile() and _is_image(im.name):
                            refs.append(SampleRef(wnid, f"{member.name}/{im.name}", tar_path,
                                                  member.offset_data + im.offset_data, im.size))
                if len(classes) % 100 == 0:
                    log.info("indexed %d class tars, %d images", len(classes), len(refs))
    if not classes:
        raise ValueError(f"no per-class .tar members in {tar_path}")
    return sorted(set(classes)), refs


def read_labels(labels_path: str) -> dict[str, str]:
    """Validation labels: image stem -> wnid.

    Accepts ``LOC_val_solution.csv`` (``ImageId,PredictionString`` with the wnid as the
    first token of the prediction string) or a whitespace-separated ``filename wnid`` file.
    """
    labels = {}
    with open(labels_path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.startswith("ImageId"):
            for row in csv.DictReader(f):
                labels[_stem(row["ImageId"])] = row["PredictionString"].split()[0]
        else:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{labels_path}:{lineno}: expected 'filename wnid', got {line.strip()!r}")
                labels[_stem(parts[0])] = parts[1]
    if not labels:
        raise ValueError(f"no labels in {labels_path}")
    return labels


def _stem(name: str) -> str:
    base = os.path.basename(name)
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMG_EXTENSIONS else base


def scan_val(src: str, labels_path: str) -> tuple[list[str], list[SampleRef], list[dict]]:
    """Flat folder or flat tar of validation images, labelled by ``labels_path``.

    Returns (classes, refs, skipped); images without a label are skipped, not guessed.
    """
    labels = read_labels(labels_path)
    found: list[tuple[str, str, str, int, int]] = []   # (name, source, path, offset, size)
    if os.path.isdir(src):
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if _is_image(name) and os.path.isfile(path):
                found.append((name, name, path, 0, os.path.getsize(path)))
    else:
        with tarfile.open(src, mode="r:") as tar:
            for m in tar:
                if m.isfile() and _is_image(m.name):
                    found.append((m.name, f"{os.path.basename(src)}:{m.name}", src, m.offset_data, m.size))
    refs, skipped = [], []
    for name, source, path, offset, size in found:
        wnid = labels.get(_stem(name))
        if wnid is None:
            skipped.append({"source": source, "reason": "no label in " + os.path.basename(labels_path)})
            continue
        refs.append(SampleRef(wnid, source, path, offset, size))
    if len(refs) < len(labels):
        log.warning("%d labelled images were not found in %s", len(labels) - len(refs), src)
    return sorted({r.wnid for r in refs} | set(labels.values())), refs, skipped


def read_bytes(ref: SampleRef, handles: dict[str, int] | None = None) -> bytes:
    """Read one image's bytes; ``handles`` caches open descriptors of tar files.

    A tar member's data never starts at offset 0 (its 512-byte header comes first), so
    offset 0 means a plain file, which is read whole.
    """
    if ref.offset == 0:
        with open(ref.path, "rb") as f:
            return f.read()
    if handles is None:
        handles = {}
    fd = handles.get(ref.path)
    if fd is None:
        fd = handles[ref.path] = os.open(ref.path, os.O_RDONLY)
    data = os.pread(fd, ref.size, ref.offset)
    if len(data) != ref.size:
        raise OSError(f"short read: {len(data)} of {ref.size} bytes")
    return data


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def assign_keys(refs: Iterable[SampleRef]) -> list[str]:
    """A unique, dot-free ``__key__`` per ref, derived from the file name.

    webdataset splits a member name at the first dot of its base name, so keys contain
    only ``[A-Za-z0-9_-]``. Names that do not already start with the class name get it as
    a prefix (custom folders often reuse names such as ``img1.jpg`` across classes); any
    remaining collision gets a counter suffix.
    """
    keys, seen = [], set()
    for ref in refs:
        stem = _KEY_UNSAFE.sub("_", _stem(ref.source))
        wnid = _KEY_UNSAFE.sub("_", ref.wnid)
        key = stem if stem.startswith(wnid) or stem.startswith("ILSVRC") else f"{wnid}_{stem}"
        if key in seen:
            n = 1
            while f"{key}_{n}" in seen:
                n += 1
            key = f"{key}_{n}"
        seen.add(key)
        keys.append(key)
    return keys
