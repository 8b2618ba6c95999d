"""Every registered variant builds through timm, trains (every parameter gets a gradient,
nothing is NaN), and follows the timm model API."""

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

import itpn
from itpn.models import ITPN, HiViTConfig, ITPNDense, ViTPyramid, model_names

TINY = dict(embed_dim=64, depths=(1, 1, 2), num_heads=2)


def _outputs(out):
    return out if isinstance(out, (list, tuple)) else [out]


def test_registry_names_visible_to_timm():
    names = set(model_names())
    assert {"itpn_base_patch16_224", "itpn_large_patch16_224", "itpn_large_patch16_256",
            "hivit_base_patch16_224", "itpn_fpn_base_patch16_224", "itpn_fpn_vit_base_patch16_224"} <= names
    assert names <= set(timm.list_models("*"))


@pytest.mark.parametrize("name", model_names())
def test_variant_structure_on_meta(name):
    """The full-size variant: forward + backward on the meta device reaches every parameter."""
    with torch.device("meta"):
        model = timm.create_model(name)
        size = model.pretrained_cfg["input_size"][-1]
        out = model(torch.randn(2, 3, size, size))
    loss = sum(o.float().sum() for o in _outputs(out))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", model_names())
def test_variant_trains_tiny(name):
    """Same family at a tiny width: real numbers, finite outputs, every parameter a gradient."""
    plain_vit = name.startswith("itpn_fpn_vit")
    kw = dict(embed_dim=96, depth=3, num_heads=2, taps=(1, 2)) if plain_vit else dict(TINY, layer_scale=0.1)
    kw["img_size"] = 32
    model = timm.create_model(name, drop_path_rate=0.1, fpn_dim=32, **kw) if "fpn" in name else \
        timm.create_model(name, drop_path_rate=0.1, **kw)
    model.train()
    out = _outputs(model(torch.randn(2, 3, 32, 32)))
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.square().mean() for o in out).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad[:5]


def test_classifier_shapes_and_head_api():
    m = timm.create_model("itpn_base_patch16_224", num_classes=10, **TINY)
    x = torch.randn(2, 3, 64, 64)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 16, 64)
    assert m.forward_head(tokens, pre_logits=True).shape == (2, 64)
    assert m(x).shape == (2, 10)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)


def test_dense_api_strides():
    m = timm.create_model("itpn_fpn_base_patch16_224", fpn_dim=32, **TINY)
    maps = m(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in maps] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]


def test_vit_pyramid_taps():
    m = ViTPyramid(embed_dim=64, depth=4, num_heads=2, taps=(1, 3), img_size=32, fpn_dim=16)
    maps = m(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[-2:]) for f in maps] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="taps"):
        ViTPyramid(depth=4, taps=(3, 5))


def test_no_weight_decay_names_exist():
    m = timm.create_model("itpn_base_patch16_224", **TINY)
    nwd = m.no_weight_decay()
    params = dict(m.named_parameters())
    assert "pos_embed" in nwd and "blocks.0.attn.relative_position_bias_table" in nwd
    assert nwd <= set(params)


def test_group_matcher_layer_ids():
    m = ITPN(HiViTConfig(embed_dim=64, depths=(2, 1, 3), num_heads=2), num_classes=5)
    lid = m.group_matcher()
    assert lid("patch_embed.proj.weight") == 0 and lid("pos_embed") == 0
    assert [lid(f"stage1.{i}.mlp.fc1.weight") for i in range(2)] == [1, 2]
    assert lid("merge1.reduction.weight") == 3 == lid("stage2.0.mlp.fc1.weight")
    assert lid("merge2.norm.weight") == 4 == lid("blocks.0.attn.qkv.weight")
    assert lid("blocks.2.mlp.fc2.bias") == 6
    assert lid("fc_norm.weight") == lid("head.weight") == 7
    # timm's generic layer decay consumes it: 8 distinct scales, head undecayed, stem most decayed.
    groups = param_groups_layer_decay(m, weight_decay=0.05, no_weight_decay_list=m.no_weight_decay(),
                                      layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 8 and scales[-1] == 1.0 and scales[0] == 0.5 ** 7
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(m.pos_embed) in no_decay and id(m.blocks[0].attn.relative_position_bias_table) in no_decay
    assert id(m.blocks[0].attn.qkv.weight) not in no_decay


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = ITPN(HiViTConfig(**TINY, img_size=32), num_classes=3)
    b = ITPN(HiViTConfig(**TINY, img_size=32), num_classes=3)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        m.train()
        m(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("size", [256, 384])
def test_other_input_sizes(size):
    m = ITPN(HiViTConfig(**TINY, img_size=224), num_classes=4).eval()
    g = size // 16
    assert m.forward_features(torch.randn(1, 3, size, size)).shape == (1, g * g, 64)
    assert m.rel_index_for((g, g)).shape == (g * g, g * g)
    # The interpolated position embedding is the table itself at the native grid.
    torch.testing.assert_close(m.pos_embed_for((14, 14)), m.pos_embed)
    assert m.pos_embed_for((g, g)).shape == (1, g * g, 64)


def test_load_224_weights_into_384_model(tmp_path):
    src = timm.create_model("itpn_base_patch16_224", num_classes=4, **TINY)
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = timm.create_model("itpn_base_patch16_224", num_classes=4, img_size=384, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert dst.pos_embed.shape == (1, 576, 64)
    assert dst.blocks[0].attn.relative_position_bias_table.shape == (47 * 47, 2)
    torch.testing.assert_close(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    # Running the 224 model at 384 resizes on the fly to the same tables. (timm drops the
    # head when num_classes differs from the default config's, so compare the features.)
    x = torch.randn(1, 3, 384, 384)
    torch.testing.assert_close(dst.eval().forward_features(x), src.eval().forward_features(x),
                               rtol=1e-4, atol=1e-5)


def test_bad_config_names_the_field():
    with pytest.raises(TypeError, match="no_such_field"):
        timm.create_model("itpn_base_patch16_224", no_such_field=3)
    with pytest.raises(ValueError, match="divisible"):
        HiViTConfig(img_size=230)


def test_model_code_has_no_distributed_imports():
    import pathlib
    root = pathlib.Path(itpn.__file__).parent
    for sub in ("layers", "models", "objectives"):
        for f in (root / sub).glob("*.py"):
            text = f.read_text()
            assert "torch.distributed" not in text and "import deepspeed" not in text, f
