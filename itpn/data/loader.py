"""Streaming WebDataset loaders that keep every rank in step and resume sample-exactly.

One batch, from disk to the trainer: ``ShardStream`` (an IterableDataset, one copy per
DataLoader worker) reads the byte ranges its stream owns in the epoch plan
(``layout.py``), shuffles them in a window, decodes and augments each sample with a
generator seeded by (seed, epoch, rank, stream, position), writes it into a preallocated
batch and yields whole batches; ``ShardLoader`` runs one DataLoader per epoch over it and
counts the batches handed to the trainer, which is its resumable state.

Guarantees (docs/data.md):
* every rank yields exactly ``len(loader)`` batches per epoch, whatever the shard counts,
  so collective ops never wait on a rank that ran dry;
* ``state_dict()`` -> ``{"epoch", "step", ...}``; after ``load_state_dict`` the loader
  yields exactly the batches (same samples, same augmentations, same order) that the
  uninterrupted run would have yielded from that step on, provided seed, world size,
  workers, batch size, epoch length and shards are unchanged (otherwise it keeps epoch and
  step and re-plans the rest of the epoch, with a warning);
* a sample that fails to read or decode is replaced by another sample of the same
  shuffle window (training) or marked ``valid=False`` (evaluation), counted and logged;
  a shard that cannot be opened raises ``ShardOpenError`` naming the file.

Rank and world size are arguments (the engine passes them); nothing here touches
torch.distributed.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .layout import EpochSequence, EvalLayout, TrainLayout, consumed_batches
from .shards import IMAGE_EXTS, ShardCursor, ShardSet, load_shardset
from .transforms import EvalTransform, FinetuneAugment, FinetuneTransform, PretrainAugment, PretrainTransform

log = logging.getLogger(__name__)

__all__ = ["ShardStream", "ShardLoader", "build_pretrain_loader", "build_finetune_loader", "build_eval_loader"]

_READ_EXTS = frozenset(IMAGE_EXTS + ("cls",))
_LOG_FIRST_BAD = 20       # per worker and epoch; after that every 1000th


class _RangeReader:
    """Reads samples at non-decreasing positions of an epoch sequence, one open shard at a
    time; forward jumps inside a shard skip member headers only."""

    def __init__(self, shards: ShardSet, seq: EpochSequence):
        self.shards, self.seq = shards, seq
        self.cursor: ShardCursor | None = None
        self.loc: tuple[int, int] | None = None

    def read(self, pos: int) -> dict:
        cycle, slot, offset = self.seq.locate(pos)
        if self.cursor is None or self.loc != (cycle, slot) or offset < self.cursor.index:
            self.close()
            self.cursor = ShardCursor(self.shards.paths[self.seq.shard(cycle, slot)])
            self.loc = (cycle, slot)
        cursor = self.cursor
        if offset > cursor.index:
            cursor.skip(offset - cursor.index)
        sample = cursor.next_sample(_READ_EXTS) if cursor.index == offset else None
        if sample is None:
            sample = {"__key__": f"#{offset}", "__error__": "missing: the shard ends before the count in its "
                      f"manifest ({cursor.broken or 'end of file'})"}
        sample["__shard__"] = cursor.path
        return sample

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"no image member ({'/'.join(IMAGE_EXTS)})")


class ShardStream(IterableDataset):
    """Batches of one rank; each DataLoader worker runs one stream of the epoch plan.

    ``mode="train"``: infinite epoch sequence, shuffled, equal batch counts, resumable.
    ``mode="eval"``: every sample once, in shard order, padded batches with ``valid``.
    """

    def __init__(self, shards: ShardSet, transform: Callable, batch_size: int, *, mode: str = "train",
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 epoch_length: int | None = None, mix: int = 4, shuffle_buffer: int = 512,
                 require_labels: bool = False):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.mode, self.rank, self.world_size = mode, rank, world_size
        self.num_workers = num_workers
        self.num_streams = max(1, num_workers)
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.require_labels = require_labels or mode == "eval"
        if mode == "train":
            self.layout = TrainLayout(world_size, self.num_streams, batch_size,
                                      epoch_length or shards.total, max(1, mix))
        else:
            self.layout = EvalLayout(shards.total, world_size, self.num_streams, batch_size)
        self.epoch = 0
        self.start_step = 0
        self._bad_logged = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.layout.batches_per_rank

    # ------------------------------------------------------------------ batch assembly
    def _new_batch(self) -> dict:
        batch = {name: torch.empty((self.batch_size,) + shape, dtype=dtype)
                 for name, (shape, dtype) in self.transform.output_shapes().items()}
        batch["label"] = torch.full((self.batch_size,), -1, dtype=torch.int64)
        batch["key"] = [""] * self.batch_size
        batch["_bad"] = 0
        return batch

    def _fill(self, batch: dict, i: int, sample: dict, rng: np.random.Generator) -> str | None:
        """Decode + augment ``sample`` into row i of ``batch``; the failure reason, or None."""
        if "__error__" in sample:
            return sample["__error__"]
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
            if self.require_labels and label < 0:
                raise KeyError("no cls member")
            views = {name: t[i] for name, t in batch.items() if isinstance(t, torch.Tensor) and name != "label"}
            self.transform(_image_bytes(sample), rng, views)
        except Exception as e:  # a bad sample must not stop training
            return f"{type(e).__name__}: {e}"
        batch["label"][i] = label
        batch["key"][i] = sample["__key__"]
        return None

    def _report_bad(self, sample: dict, reason: str) -> None:
        self._bad_logged += 1
        if self._bad_logged <= _LOG_FIRST_BAD or self._bad_logged % 1000 == 0:
            log.warning("bad sample %s in %s: %s (%d so far in this worker)", sample.get("__key__"),
                        sample.get("__shard__"), reason, self._bad_logged)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_streams:
            raise RuntimeError(f"this stream was planned for {self.num_streams} DataLoader worker(s) but runs "
                               f"under {workers}: build it with the same num_workers as the DataLoader "
                               "(build_*_loader does)")
        self._bad_logged = 0
        if self.mode == "train":
            # After a resume at ``start_step`` the DataLoader's round-robin restarts at
            # worker 0, so worker w serves the stream whose next batch is batch start_step + w.
            return self._train_batches((worker + self.start_step) % workers)
        return self._eval_batches(worker)

    def _train_batches(self, stream: int) -> Iterator[dict]:
        layout, B, C = self.layout, self.batch_size, self.shuffle_buffer
        seed, epoch, rank = self.seed, self.epoch, self.rank
        seq = EpochSequence(self.shards.counts, seed, epoch, shuffle=True)
        quota = layout.stream_quota(stream)
        ranges = layout.sub_ranges(rank, stream)
        # Which sub-stream each output position draws from: a uniformly random interleaving.
        choice = np.random.default_rng([seed, epoch, rank, stream, 0x1EAF]).permutation(
            np.repeat(np.arange(len(ranges), dtype=np.int16), [n for _, n in ranges]))
        p0 = consumed_batches(self.start_step, self.num_streams, stream) * B
        k0 = p0 // C
        used = np.bincount(choice[: k0 * C], minlength=len(ranges))
        next_pos = [start + int(u) for (start, _), u in zip(ranges, used)]
        readers = [_RangeReader(self.shards, seq) for _ in ranges]
        last_good: dict | None = None
        batch, filled = self._new_batch(), 0
        try:
            for k in range(k0, math.ceil(quota / C)):
                window = []
                for g in choice[k * C: min((k + 1) * C, quota)]:
                    window.append(readers[g].read(next_pos[g]))
                    next_pos[g] += 1
                perm = np.random.default_rng([seed, epoch, rank, stream, k, 0x5EED]).permutation(len(window))
                for i in range(p0 - k * C if k == k0 else 0, len(window)):
                    pos = k * C + i
                    rng = np.random.default_rng([seed, epoch, rank, stream, pos])
                    sample = window[perm[i]]
                    reason = self._fill(batch, filled, sample, rng)
                    if reason is not None:
                        self._report_bad(sample, reason)
                        batch["_bad"] += 1
                        # Stand-ins: the next samples of the window, then the last good one.
                        # The position keeps its own rng, so a stand-in gets its own crop.
                        stand_ins = [window[perm[(i + j) % len(window)]] for j in range(1, len(window))]
                        for sample in stand_ins + ([last_good] if last_good is not None else []):
                            if self._fill(batch, filled, sample, rng) is None:
                                break
                        else:
                            raise RuntimeError(f"no readable sample in a window of {len(window)} from "
                                               f"{sorted({s.get('__shard__') for s in window})}")
                    last_good = sample
                    filled += 1
                    if filled == B:
                        yield batch
                        batch, filled = self._new_batch(), 0
        finally:
            for r in readers:
                r.close()

    def _eval_batches(self, worker: int) -> Iterator[dict]:
        layout: EvalLayout = self.layout
        seq = EpochSequence(self.shards.counts, 0, 0, shuffle=False)
        reader = _RangeReader(self.shards, seq)
        try:
            for b in range(worker, layout.batches_per_rank, self.num_streams):
                batch = self._new_batch()
                batch["valid"] = torch.zeros(self.batch_size, dtype=torch.bool)
                for name, t in batch.items():
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.zero_()  # padding rows hold zeros, not stale memory
                start, end = layout.batch_range(self.rank, b)
                for i, pos in enumerate(range(start, end)):
                    sample = reader.read(pos)
                    reason = self._fill(batch, i, sample, None)
                    if reason is None:
                        batch["valid"][i] = True
                    else:
                        self._report_bad(sample, reason)
                        batch["_bad"] += 1
                yield batch
        finally:
            reader.close()


def _norm_constants(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> normalised float: (scale, shift) on ``device``, made once per loader and device
    (a host-to-device copy, so never per step: tests/integration/test_host_sync.py)."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * s), -m / s


class ShardLoader:
    """The trainer-facing loader: ``len()``, ``set_epoch``, iteration, ``state_dict``.

    Each ``iter()`` runs the current epoch from the current step in a fresh DataLoader
    (workers are not persistent: the epoch and start step are baked into the copies of
    the dataset the workers receive). Finishing an epoch moves to the next one.
    """

    def __init__(self, dataset: ShardStream, pin_memory: bool = False, prefetch_factor: int | None = 2,
                 timeout: float = 0, multiprocessing_context=None):
        self.dataset = dataset
        self.pin_memory, self.prefetch_factor, self.timeout = pin_memory, prefetch_factor, timeout
        self.multiprocessing_context = multiprocessing_context
        self.epoch, self.step = 0, 0
        self.bad_samples = 0          # replaced (train) or invalid (eval) samples this epoch
        self._norm_cache: dict = {}

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch restarts at step 0, the current one keeps the
        restored step (so ``load_state_dict`` then ``set_epoch(same)`` resumes)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def _dataloader(self) -> DataLoader:
        ds = self.dataset
        ds.epoch, ds.start_step = self.epoch, self.step
        workers = ds.num_workers
        kwargs = {}
        if workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_factor, timeout=self.timeout,
                          multiprocessing_context=self.multiprocessing_context)
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=self.pin_memory, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        if self.dataset.mode == "eval":
            self.step = 0
        total = len(self)
        if self.step >= total:
            self.epoch, self.step = self.epoch + 1, 0
        if self.step == 0:
            self.bad_samples = 0
        for batch in self._dataloader():
            self.bad_samples += batch.pop("_bad")
            self.step += 1
            yield batch
        if self.step != total:
            raise RuntimeError(f"rank {self.dataset.rank} got {self.step} of {total} batches in epoch "
                               f"{self.epoch}; the stream plan is broken")
        if self.bad_samples:
            log.warning("epoch %d: %d bad samples %s", self.epoch, self.bad_samples,
                        "replaced" if self.dataset.mode == "train" else "marked invalid")
        if self.dataset.mode == "train":
            self.epoch, self.step = self.epoch + 1, 0

    def to_device(self, batch: dict, device: torch.device | str, non_blocking: bool = True) -> dict:
        """Move a batch to ``device``; call it on every batch.

        With ``normalize="device"`` the images travel as uint8 (B, 3, S, S) -- 4x fewer
        bytes through worker IPC, pinning and the host-to-device copy -- and become
        normalised float32 here, each with its consumer's mean/std; fine-tuning
        batches then also get timm's random erasing. In worker mode it only moves.
        """
        out = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
               for k, v in batch.items()}
        tf = self.dataset.transform
        for name, (mean, std) in tf.device_norms().items():
            key = (name, str(device))
            if key not in self._norm_cache:
                self._norm_cache[key] = _norm_constants(mean, std, device)
            scale, shift = self._norm_cache[key]
            out[name] = torch.addcmul(shift, out[name].to(torch.float32), scale)
        if hasattr(tf, "device_erasing"):
            key = ("erasing", str(device))
            if key not in self._norm_cache:
                self._norm_cache[key] = tf.device_erasing(device)
            if self._norm_cache[key] is not None:
                out["image"] = self._norm_cache[key](out["image"])
        return out

    def _plan_id(self) -> dict:
        ds = self.dataset
        return {"seed": ds.seed, "shards": ds.shards.fingerprint(), "shuffle_buffer": ds.shuffle_buffer,
                **ds.layout.describe()}

    def state_dict(self) -> dict:
        """``{"epoch", "step", ...}``: ``step`` batches of ``epoch`` have been handed out."""
        return {"epoch": self.epoch, "step": self.step, **self._plan_id()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        changed = {k: (state.get(k), v) for k, v in self._plan_id().items() if state.get(k) != v}
        if changed:
            log.warning("loader plan changed since the checkpoint (%s): resuming at epoch %d step %d with "
                        "the new plan, not sample-exactly", changed, self.epoch, self.step)
        if self.step > len(self):
            self.step = len(self)


# ----------------------------------------------------------------------------- builders

def _shardset(data: str | ShardSet, split: str | None = None) -> ShardSet:
    return data if isinstance(data, ShardSet) else load_shardset(data, split)


def build_pretrain_loader(data: str | ShardSet, batch_size: int, augment: PretrainAugment | None = None, *,
                          rank: int = 0, world_size: int = 1, num_workers: int = 8, seed: int = 0,
                          epoch_length: int | None = None, mix: int = 4, shuffle_buffer: int = 512,
                          pin_memory: bool = False, prefetch_factor: int = 2, timeout: float = 0,
                          multiprocessing_context=None) -> ShardLoader:
    """Pre-training batches: {"image" (B,3,S,S), ["teacher_image" (B,3,T,T)], ["mask" (B,L) bool],
    "label" (B,) (-1 without cls), "key" [B]}. ``batch_size`` is per rank; ``epoch_length``
    counts samples of all ranks per epoch (default: the data set size). Pass every batch
    through ``loader.to_device`` (needed with ``augment.normalize="device"``)."""
    ds = ShardStream(_shardset(data), PretrainTransform(augment or PretrainAugment()), batch_size, mode="train",
                     rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                     epoch_length=epoch_length, mix=mix, shuffle_buffer=shuffle_buffer)
    return ShardLoader(ds, pin_memory, prefetch_factor, timeout, multiprocessing_context)


def build_finetune_loader(data: str | ShardSet, batch_size: int, augment: FinetuneAugment | None = None, *,
                          rank: int = 0, world_size: int = 1, num_workers: int = 8, seed: int = 0,
                          epoch_length: int | None = None, mix: int = 4, shuffle_buffer: int = 512,
                          pin_memory: bool = False, prefetch_factor: int = 2, timeout: float = 0,
                          multiprocessing_context=None) -> ShardLoader:
    """Fine-tuning batches: {"image" (B,3,S,S), "label" (B,), "key" [B]}; mixup/cutmix is applied
    on the batch by the trainer (``itpn.data.mixup``)."""
    ds = ShardStream(_shardset(data), FinetuneTransform(augment or FinetuneAugment()), batch_size, mode="train",
                     rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                     epoch_length=epoch_length, mix=mix, shuffle_buffer=shuffle_buffer, require_labels=True)
    return ShardLoader(ds, pin_memory, prefetch_factor, timeout, multiprocessing_context)


def build_eval_loader(data: str | ShardSet, batch_size: int, *, input_size: int = 224, crop_pct: float = 0.875,
                      interpolation: str = "bicubic", mean=None, std=None, normalize: str = "worker",
                      rank: int = 0, world_size: int = 1,
                      num_workers: int = 8, pin_memory: bool = False, prefetch_factor: int = 2,
                      timeout: float = 0, multiprocessing_context=None) -> ShardLoader:
    """Evaluation batches: {"image" (B,3,S,S), "label" (B,), "valid" (B,) bool, "key" [B]}.
    Every sample appears once over all ranks; every rank yields the same number of
    batches; count only rows with ``valid``."""
    from .transforms import IMAGENET_MEAN, IMAGENET_STD
    tf = EvalTransform(input_size, crop_pct, interpolation, mean or IMAGENET_MEAN, std or IMAGENET_STD,
                       normalize=normalize)
    ds = ShardStream(_shardset(data), tf, batch_size, mode="eval", rank=rank, world_size=world_size,
                     num_workers=num_workers)
    return ShardLoader(ds, pin_memory, prefetch_factor, timeout, multiprocessing_context)
