"""Who reads which samples: the epoch plan shared by every rank and worker.

Every rank computes the same plan from the shard counts alone (no communication, no
data read):

* The **epoch sequence** is the shards in an epoch-seeded random order, each shard's
  samples in file order, repeated with a fresh order (cycle) as often as the epoch length
  needs. Training takes its first ``N * world_size * batch_size`` samples, where
  ``N = epoch_length // (world_size * batch_size)`` is the number of batches every rank
  yields -- the same on every rank whatever the shard sizes.
* Each rank runs ``num_workers`` **streams** (one per DataLoader worker; ``K`` = 1 without
  workers). Batch ``b`` of a rank comes from stream ``b % K``, matching the DataLoader's
  round-robin over workers, so stream ``v`` yields ``N // K + (v < N % K)`` batches.
* A stream's samples come from ``mix`` contiguous ranges ("sub-streams") of the epoch
  sequence, laid out sub-stream-major so that one stream's ranges lie far apart; it
  interleaves them in a seeded random order and shuffles in windows of ``shuffle_buffer``
  samples. Ranges start and end anywhere inside shards: a shard may be shared by several
  streams, so any number of shards works for any ranks x workers, and with
  ``epoch_length`` = data set size every sample is read at most once per epoch.

Evaluation uses the unshuffled sequence once: rank ``r`` takes the contiguous slice
``[r*T//W, (r+1)*T//W)``, cut into batches of ``batch_size``; every rank yields
``ceil(ceil(T/W) / batch_size)`` full-size batches, padded with entries marked invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EpochSequence", "TrainLayout", "EvalLayout", "stream_batches", "consumed_batches"]


def stream_batches(num_batches: int, num_streams: int, stream: int) -> int:
    """Batches of ``stream`` when batch b goes to stream b % num_streams."""
    return num_batches // num_streams + (stream < num_batches % num_streams)


def consumed_batches(step: int, num_streams: int, stream: int) -> int:
    """How many of the rank's first ``step`` batches came from ``stream``."""
    return stream_batches(step, num_streams, stream)


class EpochSequence:
    """Global sample positions -> (shard index, offset in shard) for one epoch."""

    def __init__(self, counts: list[int], seed: int, epoch: int, shuffle: bool = True):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total == 0:
            raise ValueError("the shards hold no samples")
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self._cycles: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _cycle(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        if c not in self._cycles:
            n = len(self.counts)
            order = (np.random.default_rng([self.seed, self.epoch, c, 0x5A4D]).permutation(n)
                     if self.shuffle else np.arange(n))
            self._cycles[c] = (order, np.cumsum(self.counts[order]))  # end position of each slot
        return self._cycles[c]

    def locate(self, pos: int) -> tuple[int, int, int]:
        """(cycle, slot, offset): the shard at ``slot`` of cycle ``cycle``'s order."""
        c, r = divmod(pos, self.total)
        _, ends = self._cycle(c)
        k = int(np.searchsorted(ends, r, side="right"))  # skips zero-count shards
        start = int(ends[k - 1]) if k else 0
        return c, k, r - start

    def shard(self, cycle: int, slot: int) -> int:
        return int(self._cycle(cycle)[0][slot])


@dataclass(frozen=True)
class TrainLayout:
    world_size: int
    num_workers: int        # streams per rank (DataLoader workers; 1 without workers)
    batch_size: int         # per rank
    epoch_length: int       # samples per epoch, all ranks together
    mix: int = 4            # sub-streams interleaved by each stream

    def __post_init__(self):
        if self.batches_per_rank < 1:
            raise ValueError(f"epoch_length {self.epoch_length} is less than one global batch "
                             f"(world_size {self.world_size} x batch_size {self.batch_size})")

    @property
    def batches_per_rank(self) -> int:
        return self.epoch_length // (self.world_size * self.batch_size)

    def stream_quota(self, stream: int) -> int:
        """Samples stream ``stream`` yields per epoch (the same on every rank)."""
        return stream_batches(self.batches_per_rank, self.num_workers, stream) * self.batch_size

    def _sub_quota(self, stream: int) -> np.ndarray:
        q, g = self.stream_quota(stream), self.mix
        return np.array([q // g + (i < q % g) for i in range(g)], dtype=np.int64)

    def sub_ranges(self, rank: int, stream: int) -> list[tuple[int, int]]:
        """(start, length) in the epoch sequence of each sub-stream of (rank, stream)."""
        quotas = np.stack([self._sub_quota(v) for v in range(self.num_workers)])  # (K, mix)
        per_g = quotas.sum(0) * self.world_size  # samples of all ranks' g-th sub-streams
        ranges = []
        for g in range(self.mix):
            start = int(per_g[:g].sum()) + rank * int(quotas[:, g].sum()) + int(quotas[:stream, g].sum())
            ranges.append((start, int(quotas[stream, g])))
        return ranges

    def describe(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "epoch_length": self.epoch_length, "mix": self.mix}


@dataclass(frozen=True)
class EvalLayout:
    total: int
    world_size: int
    num_workers: int
    batch_size: int

    @property
    def batches_per_rank(self) -> int:
        return max(1, math.ceil(math.ceil(self.total / self.world_size) / self.batch_size))

    def rank_slice(self, rank: int) -> tuple[int, int]:
        return rank * self.total // self.world_size, (rank + 1) * self.total // self.world_size

    def batch_range(self, rank: int, batch: int) -> tuple[int, int]:
        """Real samples [start, end) of a batch; the rest of its batch_size slots are padding."""
        lo, hi = self.rank_slice(rank)
        start = min(lo + batch * self.batch_size, hi)
        return start, min(start + self.batch_size, hi)
