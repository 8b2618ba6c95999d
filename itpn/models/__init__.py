"""Assembled networks: HiViT backbone, iTPN classifier, feature pyramid, plain-ViT variant."""

from .hivit import HiViT, HiViTConfig
from .itpn import ITPN, ITPNDense
from .pyramid import FeaturePyramid, LevelProjection
from .registry import VARIANTS, model_names
from .vit_pyramid import ViTPyramid, ViTPyramidConfig

__all__ = ["HiViT", "HiViTConfig", "ITPN", "ITPNDense", "FeaturePyramid", "LevelProjection",
           "VARIANTS", "model_names", "ViTPyramid", "ViTPyramidConfig"]
