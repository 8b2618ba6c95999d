"""Write a labelled image set as shuffled WebDataset shards, resumably; verify them.

Layout of OUT after a run (``prefix`` defaults to the split name)::

    {prefix}-000000.tar ...  samples: {key}.jpg (RGB JPEG), {key}.cls (class index, ASCII),
                             {key}.json (wnid, source, original width/height)
    manifest.json            totals, classes, options, per-shard counts + sha256, skipped
    classes.txt              one wnid per line; line number = class index
    sizes.json               {shard name: samples}   (open_clip-style trainers)
    _info.json               timm's ``reader_wds`` split info

The plan (which sample goes to which shard, in which order) is a pure function of the
sorted source list, the seed and the options, so a re-run recomputes it and keeps every
shard whose file still hashes to its manifest record and whose plan is unchanged; only
missing, corrupt or stale shards are rebuilt. Shards are written under a temporary name
and renamed once complete, so a final name never holds a partial shard. Tar headers are
fixed (mtime 0, uid 0) so the same inputs give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from .encode import prepare_image
from .sources import SampleRef, assign_keys, read_bytes

log = logging.getLogger(__name__)

FORMAT = "itpn-wds/1"
MANIFEST = "manifest.json"

__all__ = ["ShardOptions", "write_shards", "verify_shards", "sha256_file", "load_manifest"]


@dataclass
class ShardOptions:
    split: str = "train"
    prefix: str | None = None          # shard name prefix; default: the split name
    shard_samples: int | None = 1000   # close a shard after this many samples ...
    shard_bytes: int | None = None     # ... or before it would exceed this many source bytes
    seed: int = 0
    workers: int = 0                   # 0: one per CPU core (small jobs: in-process); 1: in-process
    resize_shorter: int | None = None  # re-encode images whose shorter side is larger
    quality: int = 95                  # JPEG quality of re-encoded images
    progress: bool = True

    @property
    def name_prefix(self) -> str:
        return self.prefix or self.split


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, MANIFEST)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- planning

def _plan(classes: list[str], refs: list[SampleRef], opts: ShardOptions):
    """Sort, key, label and shuffle the refs, then cut them into shards.

    Returns (shards, skipped) where each shard is (name, entries, fingerprint) and an
    entry is (key, label, ref).
    """
    index = {wnid: i for i, wnid in enumerate(classes)}
    skipped = [{"source": r.source, "reason": f"class {r.wnid!r} not in the class list"}
               for r in refs if r.wnid not in index]
    # Sorting first makes the plan independent of directory-listing order.
    refs = sorted((r for r in refs if r.wnid in index), key=lambda r: (r.wnid, r.source))
    keys = assign_keys(refs)
    order = np.random.default_rng(opts.seed).permutation(len(refs))
    shards, current, current_bytes = [], [], 0

    def close():
        name = f"{opts.name_prefix}-{len(shards):06d}.tar"
        h = hashlib.sha256(json.dumps([FORMAT, opts.resize_shorter, opts.quality]).encode())
        for key, label, ref in current:
            h.update(f"\n{key}\t{label}\t{ref.source}\t{ref.size}".encode())
        shards.append((name, list(current), h.hexdigest()))

    for i in order:
        ref = refs[i]
        full = ((opts.shard_samples and len(current) >= opts.shard_samples)
                or (opts.shard_bytes and current and current_bytes + ref.size > opts.shard_bytes))
        if full:
            close()
            current, current_bytes = [], 0
        current.append((keys[i], index[ref.wnid], ref))
        current_bytes += ref.size
    if current or not shards:
        close()
    return shards, skipped


# ----------------------------------------------------------------------------- one shard

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _shard_ok(path: str, record: dict | None, fingerprint: str) -> bool:
    if not record or record.get("fingerprint") != fingerprint or not os.path.isfile(path):
        return False
    if os.path.getsize(path) != record.get("bytes"):
        return False
    return sha256_file(path) == record.get("sha256")


def _build_shard(task) -> dict:
    """Worker: keep a verified existing shard, or write it afresh under a temp name."""
    out_dir, name, entries, fingerprint, old_record, resize_shorter, quality = task
    path = os.path.join(out_dir, name)
    if _shard_ok(path, old_record, fingerprint):
        return dict(old_record, kept=True)
    skipped, samples, reencoded = [], 0, 0
    handles: dict[str, int] = {}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for key, label, ref in entries:
                    try:
                        img = prepare_image(read_bytes(ref, handles), resize_shorter, quality)
                    except Exception as e:  # one bad file must never stop the run
                        skipped.append({"source": ref.source, "reason": f"{type(e).__name__}: {e}"})
                        continue
                    meta = {"wnid": ref.wnid, "source": ref.source, "width": img.width, "height": img.height}
                    if img.reencoded:
                        meta["reencoded"] = img.reencoded
                        reencoded += 1
                    _tar_add(tar, f"{key}.jpg", img.data)
                    _tar_add(tar, f"{key}.cls", str(label).encode())
                    _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                    samples += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        for fd in handles.values():
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return {"name": name, "samples": samples, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "fingerprint": fingerprint, "reencoded": reencoded, "skipped": skipped, "kept": False}


# ----------------------------------------------------------------------------- the run

class _Progress:
    """A tqdm bar on a terminal; otherwise (logs, CI) a log line every ~10 seconds."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar, self.enabled = None, enabled
        self.total, self.done, self.last = total, 0, time.monotonic()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last > 10:
            self.last = time.monotonic()
            log.info("%d / %d images", self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _pool_context():
    # Workers only need data_prep and PIL; forkserver/spawn avoid forking a parent that
    # may hold threads (torch, tqdm's monitor) -- fork() in a threaded process can deadlock.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def write_shards(classes: list[str], refs: list[SampleRef], out_dir: str, opts: ShardOptions,
                 source: str, skipped: list[dict] | None = None) -> dict:
    """Shard ``refs`` into ``out_dir``, resuming any earlier run there; return the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    plan, plan_skipped = _plan(classes, refs, opts)
    pre_skipped = list(skipped or []) + plan_skipped
    prefix = opts.name_prefix

    old_records = {}
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        old_records = {r["name"]: r for r in load_manifest(out_dir)["shards"]}
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-*.tar.tmp-*")):
        log.info("removing leftover of an interrupted run: %s", tmp)
        os.remove(tmp)
    planned = {name for name, _, _ in plan}
    name_re = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    for path in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-*.tar")):
        base = os.path.basename(path)
        if name_re.fullmatch(base) and base not in planned:
            log.info("removing shard not in the current plan: %s", base)
            os.remove(path)

    options = {k: v for k, v in asdict(opts).items() if k not in ("workers", "progress")}
    manifest = {
        "format": FORMAT, "split": opts.split, "source": source, "complete": False,
        "total": 0, "num_classes": len(classes), "classes": list(classes), "options": options,
        "pattern": f"{prefix}-{{{0:06d}..{len(plan) - 1:06d}}}.tar", "shards": [], "skipped": [],
    }
    records: dict[str, dict] = {}

    def flush(complete: bool) -> None:
        shards = [records[name] for name, _, _ in plan if name in records]
        manifest["shards"] = [{k: v for k, v in r.items() if k != "kept"} for r in shards]
        manifest["total"] = sum(r["samples"] for r in shards)
        manifest["skipped"] = pre_skipped + [s for r in shards for s in r["skipped"]]
        manifest["complete"] = complete
        _atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)

    tasks = [(out_dir, name, entries, fp, old_records.get(name), opts.resize_shorter, opts.quality)
             for name, entries, fp in plan]
    sizes = {name: len(entries) for name, entries, _ in plan}
    total = sum(sizes.values())
    # Starting worker processes costs ~0.5 s; below a few thousand images (the demo, the
    # tests) the automatic choice is to stay in this process. An explicit count is obeyed.
    workers = opts.workers or ((os.cpu_count() or 1) if total >= 4096 else 1)
    progress = _Progress(total, opts.progress, f"{prefix} shards")
    kept = 0
    last_flush = time.monotonic()
    pool = _pool_context().Pool(min(workers, len(tasks))) if workers > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap_unordered(_build_shard, tasks) if pool else map(_build_shard, tasks)
        for record in results:
            records[record["name"]] = record
            kept += record["kept"]
            for s in record["skipped"]:
                if not record["kept"]:
                    log.warning("skipped %s: %s", s["source"], s["reason"])
            progress.update(sizes[record["name"]])
            # Rewriting the manifest after every shard would cost O(shards^2) bytes on a
            # large run; a shard finished but not yet recorded is simply rebuilt on resume.
            if time.monotonic() - last_flush > 5:
                flush(complete=False)
                last_flush = time.monotonic()
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if len(records) < len(plan):
            flush(complete=False)
    flush(complete=True)

    totals = {r["name"]: r["samples"] for r in manifest["shards"]}
    _atomic_write_json(os.path.join(out_dir, "sizes.json"), totals)
    _atomic_write_json(os.path.join(out_dir, "_info.json"), {
        "name": os.path.basename(os.path.abspath(out_dir)),
        "splits": {opts.split: {"name": opts.split, "num_samples": manifest["total"],
                                "filenames": list(totals), "shard_lengths": list(totals.values())}},
    })
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(f"{c}\n" for c in classes))
    log.info("%s: %d samples in %d shards (%d kept from an earlier run, %d rebuilt), %d skipped",
             out_dir, manifest["total"], len(plan), kept, len(plan) - kept, len(manifest["skipped"]))
    return manifest


# ----------------------------------------------------------------------------- verify

def _check_shard(task) -> list[str]:
    out_dir, record, num_classes, decode = task
    name = record["name"]
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        return [f"{name}: missing"]
    problems = []
    digest = sha256_file(path)
    if digest != record["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]}... != manifest {record['sha256'][:12]}...")
    samples: dict[str, set] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(m.name), key)
                if key not in samples:
                    samples[key] = set()
                    order.append(key)
                samples[key].add(ext)
                if ext == "cls":
                    label = int(tar.extractfile(m).read())
                    if not 0 <= label < num_classes:
                        problems.append(f"{name}: {key} has class {label} outside [0, {num_classes})")
                elif decode and ext == "jpg":
                    from PIL import Image
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                        im.load()
                        if im.format != "JPEG" or im.mode != "RGB":
                            problems.append(f"{name}: {key} is {im.format} {im.mode}, not RGB JPEG")
    except Exception as e:
        return problems + [f"{name}: unreadable ({type(e).__name__}: {e})"]
    if len(order) != record["samples"]:
        problems.append(f"{name}: {len(order)} samples, manifest says {record['samples']}")
    incomplete = [k for k in order if not {"jpg", "cls"} <= samples[k]]
    if incomplete:
        problems.append(f"{name}: {len(incomplete)} samples lack jpg or cls (first: {incomplete[0]})")
    return problems


def verify_shards(out_dir: str, decode: bool = False, workers: int = 0) -> list[str]:
    """Re-read every shard against the manifest; return the problems found (empty = OK)."""
    try:
        manifest = load_manifest(out_dir)
    except (OSError, ValueError) as e:
        return [f"{os.path.join(out_dir, MANIFEST)}: {e}"]
    problems = []
    if not manifest.get("complete", False):
        problems.append("manifest is marked incomplete (interrupted run?): re-run the same command")
    total = sum(r["samples"] for r in manifest["shards"])
    if total != manifest["total"]:
        problems.append(f"manifest total {manifest['total']} != sum of shard counts {total}")
    tasks = [(out_dir, r, len(manifest["classes"]), decode) for r in manifest["shards"]]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(tasks) > 1:
        with _pool_context().Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_check_shard, tasks)
    else:
        results = [_check_shard(t) for t in tasks]
    for r in results:
        problems.extend(r)
    return problems
