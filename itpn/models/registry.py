"""Named variants (paper, Table 1), registered with timm so that
``timm.create_model("itpn_base_patch16_224")`` works after ``import itpn``.

Families: ``hivit_*`` (backbone, returns stage-3 tokens), ``itpn_*`` (classifier),
``itpn_fpn_*`` (backbone + pyramid, dense stride 4/8/16/32 maps). Any HiViTConfig field can
be overridden as a keyword (``timm.create_model("itpn_base_patch16_224", drop_path_rate=0.1,
rpe=False)``). ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)`` loads a
checkpoint in our layout or in the official one (converted on the fly).
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .hivit import HiViT, HiViTConfig
from .itpn import ITPN, ITPNDense
from .vit_pyramid import ViTPyramid, ViTPyramidConfig

#: The paper's sizes. "large_patch16_256" is the paper's L/14 setting: the patch-16 model at
#: 256 px, so its 16x16 token grid matches a CLIP-L/14 teacher at 224 px.
VARIANTS: dict[str, HiViTConfig] = {
    "base_patch16_224": HiViTConfig(embed_dim=512, depths=(3, 3, 24), num_heads=8),
    "large_patch16_224": HiViTConfig(embed_dim=768, depths=(2, 2, 40), num_heads=12),
    "large_patch16_256": HiViTConfig(img_size=256, embed_dim=768, depths=(2, 2, 40), num_heads=12),
}


def _cfg(size: int, num_classes: int = 1000, **kw) -> dict:
    cfg = dict(url="", num_classes=num_classes, input_size=(3, size, size), pool_size=None,
               crop_pct=0.9 if size == 224 else 1.0, interpolation="bicubic",
               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
    cfg.update(kw)
    return cfg


default_cfgs = generate_default_cfgs({
    **{f"hivit_{v}": _cfg(c.img_size, num_classes=0, classifier=None) for v, c in VARIANTS.items()},
    **{f"itpn_{v}": _cfg(c.img_size) for v, c in VARIANTS.items()},
    **{f"itpn_fpn_{v}": _cfg(c.img_size, num_classes=0, classifier=None, first_conv="backbone.patch_embed.proj")
       for v, c in VARIANTS.items()},
    "itpn_fpn_vit_base_patch16_224": _cfg(224, num_classes=0, classifier=None, first_conv="patch_embed"),
})


def _filter(state_dict, model):
    # Imported here: compat imports the models package.
    from ..compat.convert import checkpoint_filter_fn
    return checkpoint_filter_fn(state_dict, model)


def _build(cls, variant: str, pretrained: bool, cfg, **kwargs):
    kwargs_filter = None
    if cls is not ITPN:
        if kwargs.pop("num_classes", 0):
            raise ValueError(f"{variant} has no classification head; use itpn_* for a classifier")
        kwargs.pop("global_pool", None)
        kwargs_filter = ("num_classes", "global_pool")
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=_filter,
                                kwargs_filter=kwargs_filter, cfg=cfg, **kwargs)


def _register(family: str, cls, size: str, cfg):
    name = f"{family}_{size}"

    def fn(pretrained: bool = False, **kwargs):
        return _build(cls, name, pretrained, cfg, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{cls.__name__} {size} ({cfg})"
    register_model(fn)
    return fn


for _size, _cfg_ in VARIANTS.items():
    _register("hivit", HiViT, _size, _cfg_)
    _register("itpn", ITPN, _size, _cfg_)
    _register("itpn_fpn", ITPNDense, _size, _cfg_)
_register("itpn_fpn_vit", ViTPyramid, "base_patch16_224", ViTPyramidConfig())


def model_names() -> list[str]:
    """Every name this package registers with timm."""
    return sorted(default_cfgs)
