"""Paper Table 1: parameters and multiply-adds of the classifiers at 224 px, within 0.5%."""

import pytest
import timm
import torch

from itpn.models.flops import count_macs, count_params


@pytest.mark.parametrize("name,params_m,gmacs", [
    ("itpn_base_patch16_224", 78.6, 17.8),
    ("itpn_large_patch16_224", 288.6, 61.1),
])
def test_params_and_macs(name, params_m, gmacs):
    with torch.device("meta"):
        params = count_params(timm.create_model(name))
    macs = count_macs(lambda: timm.create_model(name), img_size=224)
    assert abs(params / 1e6 - params_m) / params_m < 0.005, params
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.005, macs


@pytest.mark.parametrize("overrides", [[], ["objective.kind=pixel", "objective.decoder_dim=64",
                                            "objective.decoder_depth=1", "objective.decoder_heads=4",
                                            "objective.mfm_weight=0.3"]])
def test_trainer_counts_flops_for_mfu(overrides):
    """The trainer logs MFU from these counts: every pre-training objective must count on the
    meta device (pixel MIM + EMA-MFM once failed there, and its runs logged no MFU)."""
    from itpn.engine.build import build_teacher
    from itpn.engine.config import load_config
    from itpn.engine.runner import _pretrain_flops
    cfg = load_config("demo", overrides)
    teacher = build_teacher(cfg, torch.float32, "cpu") if cfg["objective"]["kind"] == "clip" else None
    flops = _pretrain_flops(cfg, teacher)
    assert flops is not None and flops > 0
