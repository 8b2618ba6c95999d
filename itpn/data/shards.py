"""Shard index and sequential tar reading for the WebDataset loaders.

A ``ShardSet`` is the list of shards with their sample counts, read from the
``manifest.json`` written by ``itpn-prep`` (or from an open_clip ``sizes.json`` or a timm
``_info.json``). Counts are what let every rank plan its epoch without reading data.

``ShardCursor`` walks one tar sample by sample. Skipping samples only reads the 512-byte
member headers (the tar is seekable), so a stream can start in the middle of a shard at
the cost of one header read per member. A member whose data is cut short ends the shard:
the cursor reports the rest as missing samples instead of raising, and the caller counts
and logs them. A shard that cannot be opened at all raises ``ShardOpenError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

__all__ = ["ShardSet", "ShardOpenError", "ShardCursor", "load_shardset", "IMAGE_EXTS"]


class ShardOpenError(RuntimeError):
    """A shard that cannot be opened; the message and ``path`` name it.

    Constructible from the message alone, so a DataLoader worker re-raises it in the main
    process with its type intact.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


@dataclass
class ShardSet:
    root: str
    paths: list[str]
    counts: list[int]
    classes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        """Names and counts only: identifies the data layout a loader state refers to."""
        h = hashlib.sha256()
        for p, c in zip(self.paths, self.counts):
            h.update(f"{os.path.basename(p)}:{c}\n".encode())
        return h.hexdigest()[:16]


def load_shardset(path: str, split: str | None = None) -> ShardSet:
    """Shards of ``path``: a folder (or manifest file) written by ``itpn-prep``; folders
    with only ``sizes.json`` or timm's ``_info.json`` (pick ``split``) work too."""
    if os.path.isfile(path):
        root, name = os.path.dirname(path), os.path.basename(path)
    else:
        root, name = path, None
    candidates = [name] if name else ["manifest.json", "sizes.json", "_info.json"]
    for cand in candidates:
        full = os.path.join(root, cand)
        if not os.path.isfile(full):
            continue
        with open(full) as f:
            info = json.load(f)
        if "shards" in info:  # itpn-prep manifest
            if not info.get("complete", True):
                log.warning("%s is marked incomplete (interrupted itpn-prep run): using the %d shards "
                            "it lists", full, len(info["shards"]))
            names = [s["name"] for s in info["shards"]]
            counts = [int(s["samples"]) for s in info["shards"]]
            classes = list(info.get("classes", []))
        elif "splits" in info:  # timm reader_wds
            splits = info["splits"]
            key = split or (next(iter(splits)) if len(splits) == 1 else None)
            if key not in splits:
                raise ValueError(f"{full}: choose a split among {sorted(splits)}")
            names, counts = list(splits[key]["filenames"]), [int(c) for c in splits[key]["shard_lengths"]]
            classes = []
        else:  # sizes.json: {shard name: count}
            names, counts, classes = list(info), [int(v) for v in info.values()], []
        if not classes and os.path.isfile(os.path.join(root, "classes.txt")):
            with open(os.path.join(root, "classes.txt")) as f:
                classes = [line.strip() for line in f if line.strip()]
        if not names:
            raise ValueError(f"{full} lists no shards")
        return ShardSet(root, [os.path.join(root, n) for n in names], counts, classes)
    raise FileNotFoundError(f"no manifest.json, sizes.json or _info.json in {root} "
                            "(write shards with itpn-prep)")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


class ShardCursor:
    """Sequential sample reader over one tar shard.

    ``next_sample(exts)`` returns {"__key__": key, ext: bytes, ...} with only the wanted
    extensions read, ``{"__key__": key, "__error__": reason}`` for a sample whose member
    data is cut short, or None at the end (or after a broken header).
    """

    def __init__(self, path: str):
        self.path = path
        self.index = 0          # samples consumed so far
        self.broken: str | None = None
        try:
            self._file = open(path, "rb")
            self._tar = tarfile.open(fileobj=self._file, mode="r:")
        except Exception as e:
            if getattr(self, "_file", None) is not None:
                self._file.close()
            raise ShardOpenError(f"cannot open shard {path}: {type(e).__name__}: {e}", path) from e
        self._pending = self._next_member()

    def close(self) -> None:
        self._file.close()

    def _next_member(self):
        while True:
            try:
                m = self._tar.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                self.broken = f"{type(e).__name__}: {e}"
                log.warning("shard %s is damaged after %d samples: %s", self.path, self.index, self.broken)
                return None
            if m is None or m.isfile():
                return m

    def next_sample(self, exts: frozenset[str] | None = None) -> dict | None:
        """The next sample; ``exts`` = extensions to read (None: none, just skip)."""
        m = self._pending
        if m is None:
            return None
        key = _split_name(m.name)[0]
        sample: dict = {"__key__": key}
        while m is not None:
            mkey, ext = _split_name(m.name)
            if mkey != key:
                break
            if exts is not None and ext in exts and "__error__" not in sample:
                self._file.seek(m.offset_data)
                data = self._file.read(m.size)
                if len(data) != m.size:
                    sample["__error__"] = f"member {m.name} truncated ({len(data)} of {m.size} bytes)"
                else:
                    sample[ext] = data
            m = self._next_member()
        self._pending = m
        self.index += 1
        return sample

    def skip(self, n: int) -> int:
        """Skip ``n`` samples reading headers only; returns how many were there to skip."""
        done = 0
        while done < n and self.next_sample(None) is not None:
            done += 1
        return done
