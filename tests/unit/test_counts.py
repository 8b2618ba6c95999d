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
