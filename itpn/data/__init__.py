"""WebDataset pipelines for iTPN: shard index, transforms, loaders, mixup.

    loader = build_pretrain_loader("shards/train", batch_size=64,
                                   augment=PretrainAugment(teacher_size=224, mask="block"),
                                   rank=rank, world_size=world_size, num_workers=8)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # {"image", "teacher_image", "mask", "label", "key"}
            batch = loader.to_device(batch, device)   # normalises too with normalize="device"
            ...
        checkpoint["loader"] = loader.state_dict()   # restore with load_state_dict

Shards are written by ``itpn-prep`` (``data_prep/``); docs/data.md has the guarantees.
"""

from .layout import EpochSequence, EvalLayout, TrainLayout
from .loader import ShardLoader, ShardStream, build_eval_loader, build_finetune_loader, build_pretrain_loader
from .mixup import build_criterion, build_mixup
from .shards import ShardOpenError, ShardSet, load_shardset
from .transforms import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EvalTransform, FinetuneAugment,
                         FinetuneTransform, PretrainAugment, PretrainTransform)

__all__ = ["build_pretrain_loader", "build_finetune_loader", "build_eval_loader", "ShardLoader", "ShardStream",
           "PretrainAugment", "PretrainTransform", "FinetuneAugment", "FinetuneTransform", "EvalTransform",
           "build_mixup", "build_criterion", "ShardSet", "ShardOpenError", "load_shardset", "EpochSequence",
           "TrainLayout", "EvalLayout", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD"]
