"""Per-step schedules (MAE / BEiT recipes): linear warm-up then cosine decay of the learning
rate, cosine schedule of the weight decay, with epochs expressed in samples so a schedule
does not change when the batch size or the number of GPUs does."""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """Linear scaling rule: base lr is for a total batch of 256."""
    return base_lr * total_batch / 256


def cosine(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """lr and weight decay at a given number of samples seen."""

    lr: float
    min_lr: float
    warmup_samples: int
    total_samples: int
    weight_decay: float
    weight_decay_end: float | None = None

    def lr_at(self, samples: int) -> float:
        if samples < self.warmup_samples:
            return self.lr * samples / self.warmup_samples
        span = max(self.total_samples - self.warmup_samples, 1)
        return cosine(self.lr, self.min_lr, (samples - self.warmup_samples) / span)

    def wd_at(self, samples: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        return cosine(self.weight_decay, self.weight_decay_end, samples / max(self.total_samples, 1))

    def apply(self, optimizer, samples: int) -> tuple[float, float]:
        """Set every group's lr (times its ``lr_scale``) and weight decay (groups that start at
        zero stay at zero). Returns (lr, wd) for logging."""
        lr, wd = self.lr_at(samples), self.wd_at(samples)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("wd_enabled", group["weight_decay"] > 0):
                group["weight_decay"] = wd
        return lr, wd
