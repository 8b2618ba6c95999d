"""Mixup / CutMix on the batch for fine-tuning (DeiT recipe, as iTPN's fine-tuning uses).

The loader yields hard labels; the trainer calls ``mixup(images, labels)`` on the device
and trains against the returned soft targets with ``SoftTargetCrossEntropy``. Both are
timm's; this module only fixes the recipe defaults and picks the matching loss.
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = ["build_mixup", "build_criterion"]


def build_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                cutmix_minmax: tuple[float, float] | None = None, prob: float = 1.0, switch_prob: float = 0.5,
                mode: str = "batch", label_smoothing: float = 0.1) -> Mixup | None:
    """timm's ``Mixup`` (call it as ``images, targets = mixup_fn(images, labels)``; the batch
    size must be even), or None when mixup, cutmix and prob are all off."""
    if (mixup <= 0 and cutmix <= 0 and cutmix_minmax is None) or prob <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=prob,
                 switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)


def build_criterion(mixup_fn: Mixup | None, label_smoothing: float = 0.1) -> torch.nn.Module:
    """The loss matching ``build_mixup``'s output: soft targets, smoothed or plain labels."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return torch.nn.CrossEntropyLoss()
