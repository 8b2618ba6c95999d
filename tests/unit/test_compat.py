"""Official-checkpoint compatibility: the reference fixtures are reproduced to 1e-5, and the
key mapping is general (any depths, both directions)."""

import os

import pytest
import torch

from itpn.compat import from_official, official_depths, official_to_ours, ours_to_official
from itpn.compat.official import _IGNORED
from itpn.models import ITPN, HiViTConfig
from itpn.objectives.clip_mfm import ClipMFM
from itpn.objectives.pixel_mim import PixelMIM


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def load(fixtures_dir, name):
    return torch.load(os.path.join(fixtures_dir, name), weights_only=False)


def test_clip_distill_fixture(fixtures_dir):
    d = load(fixtures_dir, "clip_distill.pt")
    m = from_official(d["checkpoint"], "clip_distill", **d["kwargs"])
    with torch.no_grad():
        out = m(d["x"], d["bool_masked_pos"])
    for ours, ref in zip(out["pyramid_tokens"], d["pyramid"]):
        assert rel_err(ours, ref) < 1e-5
    assert [tuple(p.shape) for p in out["pyramid_tokens"]] == [(2, 16, 1, 1, 32), (2, 16, 2, 2, 32),
                                                              (2, 16, 4, 4, 32)]
    assert rel_err(out["aux_tokens"], d["aux_tokens"]) < 1e-5
    assert rel_err(out["mfm"], d["mfm_pred"]) < 1e-5
    assert rel_err(out["aux"], d["aux_pred"]) < 1e-5


def test_finetune_classifier_fixture(fixtures_dir, tmp_path):
    d = load(fixtures_dir, "finetune_classifier.pt")
    path = tmp_path / "ft.pth"
    # Released files also pickle their argparse arguments, which safe loading refuses.
    torch.save({**d["finetuned_checkpoint"], "args": __import__("argparse").Namespace(lr=1.0)}, path)
    m = from_official(str(path), "classifier", **d["kwargs"])
    with torch.no_grad():
        assert rel_err(m.forward_features(d["x"]), d["tokens"]) < 1e-5
        assert rel_err(m(d["x"]), d["logits"]) < 1e-5


def test_pretrain_checkpoint_into_classifier(fixtures_dir):
    """A pre-trained CLIP checkpoint initialises the classifier; only fc_norm and head stay
    unloaded, as in the reference fine-tuning code."""
    d = load(fixtures_dir, "finetune_classifier.pt")
    kw = {k: v for k, v in d["kwargs"].items() if k not in ("num_outs", "num_classes")}
    clip = from_official(d["pretrain_checkpoint"], "clip_distill", teacher_dim=48, fpn_dim=32, **kw)
    sd = official_to_ours(d["pretrain_checkpoint"], "clip_distill", target="classifier")
    model = ITPN(clip.encoder.cfg, num_classes=7)
    own = model.state_dict()
    missing, _ = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    assert sorted(missing) == sorted(d["keys_not_loaded_from_pretrain"])
    torch.testing.assert_close(model.forward_features(d["x"]), clip.encoder.forward_features(d["x"]))


def test_pixel_mim_fixture(fixtures_dir):
    d = load(fixtures_dir, "pixel_mim.pt")
    m = from_official(d["checkpoint"], "pixel_mim", **d["kwargs"])
    with torch.no_grad():
        out = m(d["x"], d["mask"])
    assert rel_err(out["pred"], d["pred"]) < 1e-5
    assert abs(out["loss"].item() - d["loss"].item()) / d["loss"].item() < 1e-5
    # Without the released resize quirk the encoder sees slightly different positions.
    m.pos_embed_quirk = False
    with torch.no_grad():
        assert rel_err(m(d["x"], d["mask"])["pred"], d["pred"]) > 1e-5


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", ["classifier", "clip_distill", "pixel_mim"])
@pytest.mark.parametrize("depths,rpe,ls", [((2, 3, 4), True, 0.1), ((1, 2, 3), False, None)])
def test_round_trip_any_depths(kind, depths, rpe, ls):
    """ours -> official -> from_official gives back the same function, for other sizes."""
    cfg = HiViTConfig(img_size=96, embed_dim=96, depths=depths, num_heads=3, rpe=rpe, layer_scale=ls)
    if kind == "classifier":
        model, kw = ITPN(cfg, num_classes=5), {}
    elif kind == "clip_distill":
        model, kw = ClipMFM(cfg, teacher_dim=40, fpn_dim=48, fpn_depth=2, stem_masking="released"), \
            dict(teacher_dim=40, fpn_dim=48, fpn_depth=2)
    else:
        cfg = cfg.replace(layer_scale=None)
        model, kw = PixelMIM(cfg, fpn_dim=48, fpn_depth=1, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                             pos_embed_quirk=True), \
            dict(fpn_dim=48, fpn_depth=1, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    _randomize(model)
    official = ours_to_official(model.state_dict(), kind, depths)
    assert official_depths(official) == depths
    assert all(k.split(".")[0] in {"blocks", "patch_embed", "absolute_pos_embed", "relative_position_index",
                                   "fc_norm", "head", "mask_token", "norm", "norm_cls", "lm_head",
                                   "lm_cls_head", "cls_pt_layers", "align_dim_16tofpn", "split_16to8",
                                   "block_16to8", "align_dim_16to8", "split_8to4", "block_8to4",
                                   "align_dim_8to4", "fpn_modules", "decoder_embed", "decoder_blocks",
                                   "decoder_pos_embed", "decoder_norm", "decoder_pred"} for k in official)
    if rpe:
        assert official["relative_position_index"].shape == (36, 36)
    mlp = dict(mlp_depth1=depths[0], mlp_depth2=depths[1]) if kind != "pixel_mim" else {}
    if kind == "pixel_mim" and depths[0] == depths[1]:
        mlp = dict(mlp_depth=depths[0])
    elif kind == "pixel_mim":
        mlp = dict(mlp_depth1=depths[0], mlp_depth2=depths[1])
    loaded = from_official({"model": official}, kind, img_size=96, embed_dim=96, depth=depths[2],
                           num_heads=3, rpe=rpe, init_values=ls, **mlp, **kw)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        if kind == "classifier":
            torch.testing.assert_close(loaded(x), model(x))
        else:
            mask = torch.zeros(2, 36, dtype=torch.bool)
            mask[0, :27], mask[1, 9:] = True, True
            a, b = loaded(x, mask), model(x, mask)
            key = "pred" if kind == "pixel_mim" else "mfm"
            torch.testing.assert_close(a[key], b[key])


def test_from_official_errors_name_the_problem(fixtures_dir, tmp_path):
    d = load(fixtures_dir, "clip_distill.pt")
    with pytest.raises(ValueError, match="depths"):
        from_official(d["checkpoint"], "clip_distill", **{**d["kwargs"], "depth": 7})
    with pytest.raises(TypeError, match="frobnicate"):
        from_official(d["checkpoint"], "clip_distill", frobnicate=1, **d["kwargs"])
    with pytest.raises(ValueError, match="unknown kind"):
        from_official(d["checkpoint"], "detector", **d["kwargs"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        from_official(str(tmp_path / "nope.pth"), "classifier", num_heads=2)
    with pytest.raises(KeyError, match="missing"):  # wrong head size for the checkpoint
        from_official(d["checkpoint"], "clip_distill", **{**d["kwargs"], "fpn_depth": 2})
    assert "drop_path_rate" in _IGNORED
