"""Pre-training objectives on tiny configs: shapes, finite losses, learning on a fixed batch,
the EMA formula, and the paper's no-leak property of CLIP-MFM masking."""

import copy

import pytest
import torch

from itpn.layers import tokens_to_map
from itpn.models import HiViTConfig
from itpn.objectives.clip_mfm import ClipMFM
from itpn.objectives.ema import EMATeacher, momentum_schedule
from itpn.objectives.pixel_mim import PixelMIM, patchify, sincos_pos_embed_2d

CFG = HiViTConfig(img_size=64, embed_dim=64, depths=(1, 1, 4), num_heads=2, rpe=True, layer_scale=0.1)


def random_mask(batch, n, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :masked], True)
    return mask


def pixel_model(mfm_weight=0.0):
    return PixelMIM(CFG.replace(rpe=False, layer_scale=None), fpn_dim=32, fpn_depth=1, decoder_dim=64,
                    decoder_depth=1, decoder_heads=4, mfm_weight=mfm_weight)


def clip_model(stem_masking="paper"):
    return ClipMFM(CFG, teacher_dim=24, fpn_dim=32, fpn_depth=1, stem_masking=stem_masking)


def test_patchify_order():
    img = torch.arange(2 * 3 * 32 * 32, dtype=torch.float).view(2, 3, 32, 32)
    p = patchify(img, 16)
    assert p.shape == (2, 4, 768)
    # patch 1 (row 0, col 1), pixel (row 2, col 5), channel 1 -> index (2*16 + 5)*3 + 1
    assert p[0, 1, (2 * 16 + 5) * 3 + 1] == img[0, 1, 2, 16 + 5]


def test_sincos_embedding_properties():
    e = sincos_pos_embed_2d(16, 4)
    assert e.shape == (1, 16, 16)
    assert torch.allclose(e[0, :, :4].pow(2) + e[0, :, 4:8].pow(2), torch.ones(16, 4))  # sin^2 + cos^2
    assert not torch.equal(e[0, 1], e[0, 4])  # (0, 1) and (1, 0) differ


@pytest.mark.parametrize("mfm_weight", [0.0, 0.3])
def test_pixel_mim_shapes_and_loss(mfm_weight):
    m = pixel_model(mfm_weight)
    x = torch.randn(3, 3, 64, 64)
    out = m(x, random_mask(3, 16, 12))
    assert out["pred"].shape == (3, 16, 768)
    assert torch.isfinite(out["loss"])
    terms = {k for k in out if k.startswith("loss_mfm_")}
    assert terms == ({"loss_mfm_p16", "loss_mfm_p8", "loss_mfm_p4"} if mfm_weight else set())
    if mfm_weight:
        expect = out["loss_pix"] + 0.3 * sum(out[t] for t in terms)
        torch.testing.assert_close(out["loss"], expect)
        assert set(m.frozen_modules()) == {"ema"}
        # The EMA copy is not part of the trained module tree.
        assert not any(n.startswith("ema") for n, _ in m.named_parameters())


def test_pixel_mim_rejects_uneven_masks():
    m = pixel_model()
    mask = random_mask(2, 16, 12)
    mask[0, (~mask[0]).nonzero()[0]] = True
    with pytest.raises(ValueError, match="must keep 4 of 16"):
        m(torch.randn(2, 3, 64, 64), mask)


def test_pixel_mim_masked_patches_do_not_reach_encoder():
    """Token dropping: the reconstruction of visible positions ignores masked pixels."""
    m = pixel_model().eval()
    x = torch.randn(1, 3, 64, 64)
    mask = random_mask(1, 16, 12)
    y = x.clone()
    masked = mask[0].nonzero().flatten()
    for i in masked.tolist():
        r, c = divmod(i, 4)
        y[:, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask)["pred"], m(y, mask)["pred"])


def _steps_reduce(model, batch_fn, steps=16, lr=2e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(*batch_fn())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if getattr(model, "ema", None) is not None:
            model.ema.update(model.encoder, 0.9)
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize("mfm_weight", [0.0, 0.3])
def test_pixel_mim_learns_fixed_batch(mfm_weight):
    m = pixel_model(mfm_weight)
    # Smooth images: masked patches are predictable from their neighbours.
    x = torch.nn.functional.interpolate(torch.randn(4, 3, 3, 3), size=64, mode="bicubic")
    mask = random_mask(4, 16, 12)
    losses = _steps_reduce(m, lambda: (x, mask))
    assert min(losses[-3:]) < 0.85 * losses[0], losses


def test_clip_mfm_learns_fixed_targets():
    m = clip_model()
    x, mask = torch.randn(4, 3, 64, 64), random_mask(4, 16, 6)
    targets = torch.nn.functional.layer_norm(torch.randn(4, 16, 24), (24,))
    losses = _steps_reduce(m, lambda: (x, mask, None, targets))
    assert min(losses[-3:]) < 0.85 * losses[0], losses


def test_clip_mfm_shapes():
    m = clip_model()
    out = m(torch.randn(2, 3, 64, 64), random_mask(2, 16, 6), targets=torch.randn(2, 16, 24))
    assert "pyramid" not in out  # the loss uses no pyramid maps, so none is built
    maps = [tokens_to_map(p, (4, 4)) for p in out["pyramid_tokens"]]
    assert [tuple(p.shape) for p in maps] == [(2, 32, 4, 4), (2, 32, 8, 8), (2, 32, 16, 16)]
    assert out["mfm"].shape == out["aux"].shape == (2, 16, 24)
    assert m.aux_tap == 3
    torch.testing.assert_close(out["loss"], out["loss_mfm"] + out["loss_aux"])
    with pytest.raises(RuntimeError, match="without a teacher"):
        m(torch.randn(2, 3, 64, 64), random_mask(2, 16, 6), teacher_view=torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("mode,leaks", [("paper", False), ("released", True)])
def test_clip_mfm_masked_pixels_reach_no_output(mode, leaks):
    m = clip_model(mode).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 16, 6)
    y = x.clone()
    for b in range(2):
        for i in mask[b].nonzero().flatten().tolist():
            r, c = divmod(i, 4)
            y[b, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = torch.randn(3, 16, 16) * 3
    with torch.no_grad():
        a, b = m(x, mask), m(y, mask)
    outs = [(k, a[k], b[k]) for k in ("mfm", "aux", "aux_tokens")]
    levels = zip(a["pyramid_tokens"], b["pyramid_tokens"])
    outs += [(f"pyramid{i}", p, q) for i, (p, q) in enumerate(levels)]
    changed = [k for k, p, q in outs if not torch.allclose(p, q, atol=1e-6)]
    if leaks:
        assert "mfm" in changed and "pyramid2" in changed  # stride-4 level sees masked pixels
    else:
        assert changed == []


def test_ema_update_matches_formula():
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ema = EMATeacher(student)
    before = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema.update(student, 0.996)
    for k, s in student.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[k], 0.996 * before[k] + 0.004 * s)
    assert not any(p.requires_grad for p in ema.module.parameters())
    ema.copy_from(student)
    torch.testing.assert_close(ema.module[0].weight, student[0].weight)


def test_ema_update_uses_gather_per_module():
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    ema = EMATeacher(student)
    calls = []

    class Ctx:
        def __init__(self, params):
            calls.append(len(params))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    ema.update(student, 0.5, gather=Ctx)
    assert calls == [2, 2]  # one gather per module that owns parameters, never the whole model


def test_momentum_schedule():
    assert momentum_schedule(10, 100) == 0.996
    assert momentum_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert momentum_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert 0.996 < momentum_schedule(50, 100, 0.996, 1.0) < 1.0
