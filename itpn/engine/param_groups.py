"""Optimizer parameter groups: no weight decay for norms, biases, position embeddings,
relative-bias tables and tokens; layer-wise lr decay for fine-tuning from the model's
``group_matcher`` (reference doc, section 3)."""

from __future__ import annotations

from torch import nn


def no_decay(name: str, param, extra: set[str]) -> bool:
    return (param.ndim <= 1 or name.endswith(".bias") or name in extra
            or name.endswith(("pos_embed", "relative_position_bias_table", "mask_token")))


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 backbone_prefix: str = "") -> list[dict]:
    """Groups keyed by (layer id, decay). ``layer_decay`` scales lr by decay^(L - id) with
    ids from the backbone's ``group_matcher``; ``backbone_prefix`` is where the backbone sits
    inside ``model`` (e.g. "encoder.")."""
    extra = set()
    backbone = model.get_submodule(backbone_prefix.rstrip(".")) if backbone_prefix else model
    if hasattr(backbone, "no_weight_decay"):
        extra = {backbone_prefix + n for n in backbone.no_weight_decay()}
    layer_id = None
    num_layers = 1
    if layer_decay is not None:
        matcher = backbone.group_matcher(coarse=False)
        if not callable(matcher):
            raise TypeError(f"{type(backbone).__name__}.group_matcher must return a callable for layer decay")
        layer_id = lambda n: matcher(n[len(backbone_prefix):]) if n.startswith(backbone_prefix) else None  # noqa: E731
        num_layers = max(matcher(n) for n, _ in backbone.named_parameters()) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_decay(name, p, extra)
        lid = num_layers - 1
        if layer_id is not None:
            lid = layer_id(name)
            lid = num_layers - 1 if lid is None else lid
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - lid) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "wd_enabled": decay, "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
