"""Frozen CLIP teacher (itpn/objectives/clip_teacher.py) on tiny random open_clip towers.

The checkpoints are written to disk in the formats real weights come in -- an OpenAI-style
TorchScript archive (OpenAI key layout, fp16 weights, input_resolution/context_length/
vocab_size entries) and open_clip state dicts (.pt, .safetensors, training checkpoint) --
and read back through the code path real weights take.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from itpn.objectives import clip_teacher
from itpn.objectives.clip_teacher import (TINY_ARCH, CLIPTeacher, build_clip_teacher, fold_quick_gelu,
                                          load_clip_state_dict,
                                          quick_gelu_arch, register_model_config, register_tiny_config,
                                          resize_pos_embed, tag_quick_gelu)

# The fixture writes the OpenAI-style archive with torch.jit.script, deprecated in torch 2.14
# but the only way to produce the format real OpenAI weights come in.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated",
                                        "ignore:`torch.jit.load` is deprecated",
                                        "ignore:Warning. Profiler clears events")

ARCH = "itpn-test-clip"           # GELU config
ARCH_QG = "itpn-test-clip-quickgelu"
# Widths that open_clip's OpenAI loader can infer back (it assumes 64-wide heads): 2 vision
# heads (even, so the fused attention path applies), a 1-layer text tower.
CFG = {"embed_dim": 48,
       "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "head_width": 64, "layers": 2},
       "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}}


def _torchscript_archive(state_dict: dict[str, torch.Tensor], path) -> None:
    """Save ``state_dict`` as a TorchScript archive whose state_dict() has exactly these keys."""
    root = nn.Module()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One set of random CLIP weights, saved in every accepted format."""
    register_model_config(ARCH, CFG)
    register_model_config(ARCH_QG, {**CFG, "quick_gelu": True})
    torch.manual_seed(1)
    model = open_clip.create_model(ARCH_QG, pretrained_hf=False)
    # Spread the weights so the activations reach the range where GELU and QuickGELU differ.
    with torch.no_grad():
        for n, p in model.visual.named_parameters():
            if n.endswith("c_fc.weight"):
                p.mul_(8.0)
    open_clip.convert_weights_to_fp16(model)  # OpenAI stores most weights in fp16
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    d = tmp_path_factory.mktemp("clip")
    paths = {"openai": d / "ViT-test.pt", "pt": d / "open_clip.pt", "safetensors": d / "open_clip.safetensors",
             "train": d / "epoch_1.pt", "openai_sd": d / "openai_state_dict.pt"}
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(8), "vocab_size": torch.tensor(64)}
    _torchscript_archive({**sd, **extra}, paths["openai"])
    torch.save(sd, paths["pt"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["safetensors"]))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, paths["train"])
    torch.save({**sd, **extra}, paths["openai_sd"])
    return {k: str(v) for k, v in paths.items()} | {"sd": sd}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, 32, 32, generator=g)


def _acts(teacher):
    return {type(m) for m in teacher.tower.modules() if isinstance(m, (nn.GELU, QuickGELU, nn.SiLU))}


#: A QuickGELU tower's activations once CLIPTeacher has folded them (fold_quick_gelu)
QUICK_GELU_FOLDED = {nn.SiLU}


def test_openai_and_open_clip_files_give_identical_targets(ckpt, images):
    ref = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)(images)
    assert ref.shape == (3, 16, 48) and ref.dtype == torch.float32
    for fmt in ("pt", "safetensors", "train"):
        # A plain open_clip state dict: the arch name decides QuickGELU.
        out = CLIPTeacher(ARCH_QG, ckpt[fmt], dtype=torch.float32)(images)
        assert torch.equal(out, ref), fmt


def test_openai_files_always_get_quickgelu(ckpt, images):
    for fmt in ("openai", "openai_sd"):
        t = CLIPTeacher(ARCH, ckpt[fmt], dtype=torch.float32)  # the GELU arch name
        assert t.quick_gelu and _acts(t) == QUICK_GELU_FOLDED, fmt
    # The tower a GELU build would give for the same weights: different targets.
    qg = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)(images)
    gelu_t = CLIPTeacher(ARCH, ckpt["pt"], dtype=torch.float32)  # plain state dict, GELU arch
    assert not gelu_t.quick_gelu and _acts(gelu_t) == {nn.GELU}
    assert (gelu_t(images) - qg).abs().max() > 1e-2


def test_matches_open_clip_openai_loader(ckpt, images):
    """Same numbers as open_clip's own OpenAI loader and its own token output."""
    ref = open_clip.load_openai_model(ckpt["openai"], precision="fp32", device="cpu").visual
    t = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)
    # The residual stream as open_clip's own forward wires it. Not output_tokens: before
    # open_clip 2.23 those tokens skip ln_post. The Transformer returned (1 + N, B, W) then.
    seen = []
    ref.transformer.register_forward_hook(lambda mod, args, out: seen.append(out))
    pooled = ref(images)
    stream = seen[0] if seen[0].shape[0] == images.shape[0] else seen[0].transpose(0, 1)  # (B, 1 + N, W)
    torch.testing.assert_close(t(images), F.layer_norm(ref.ln_post(stream[:, 1:]) @ ref.proj, (48,)))
    feats = t.forward_features(images)  # (B, 1 + N, W)
    torch.testing.assert_close(feats, stream)
    torch.testing.assert_close(t.tower.ln_post(feats[:, 0]) @ t.tower.proj, pooled)


def test_quick_gelu_folded_into_silu_is_the_same_tower(ckpt, images, monkeypatch):
    """fold_quick_gelu: x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, with 1.702 moved into
    c_fc's weight and bias and 1 / 1.702 into c_proj's weight. fp32: the targets of the
    unfolded tower to rounding (1.8e-6 here). bf16: as far from the fp32 targets as the
    unfolded bf16 tower, within 10% (mean error 0.0055 against 0.0054 here)."""
    ref32 = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)
    with monkeypatch.context() as m:
        m.setattr(clip_teacher, "fold_quick_gelu", lambda tower: 0)
        plain32 = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)
        plain16 = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.bfloat16)
    assert _acts(plain32) == {QuickGELU} and _acts(ref32) == QUICK_GELU_FOLDED
    fc, fc_plain = ref32.tower.transformer.resblocks[0].mlp, plain32.tower.transformer.resblocks[0].mlp
    torch.testing.assert_close(fc.c_fc.weight, 1.702 * fc_plain.c_fc.weight)
    torch.testing.assert_close(fc.c_proj.weight, fc_plain.c_proj.weight / 1.702)
    assert torch.equal(fc.c_proj.bias, fc_plain.c_proj.bias)
    y32, plain = ref32(images), plain32(images)
    assert (y32 - plain).abs().max() < 1e-5 and (y32 - plain).abs().max() > 0  # a different computation
    folded16 = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.bfloat16)(images)
    err_folded, err_plain = (folded16 - plain).abs().mean(), (plain16(images) - plain).abs().mean()
    assert err_folded <= 1.1 * err_plain, (err_folded, err_plain)
    # GELU towers, and MLPs that are not Linear -> QuickGELU -> Linear, are left alone
    assert fold_quick_gelu(CLIPTeacher(ARCH, ckpt["pt"], dtype=torch.float32).tower) == 0
    odd = nn.Sequential(OrderedDict(c_fc=nn.Linear(4, 8), gelu=QuickGELU(), ln=nn.LayerNorm(8), c_proj=nn.Linear(8, 4)))
    before = {k: v.clone() for k, v in odd.state_dict().items()}
    assert fold_quick_gelu(odd) == 0 and isinstance(odd.gelu, QuickGELU)
    assert all(torch.equal(v, before[k]) for k, v in odd.state_dict().items())
    assert fold_quick_gelu(plain32.tower) == len(plain32.tower.transformer.resblocks) == 2


def test_targets_are_layer_normed(ckpt, images):
    y = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)(images)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 16), atol=1e-3, rtol=0)


def test_pos_embed_resized_for_other_image_sizes(ckpt, images):
    file_pos = ckpt["sd"]["visual.positional_embedding"].float()  # (1 + 4*4, W)
    for size, grid in ((48, 6), (24, 3)):
        t = CLIPTeacher(ARCH, ckpt["openai"], image_size=size, dtype=torch.float32)
        assert (t.image_size, t.grid, t.num_tokens) == (size, grid, grid * grid)
        pos = t.tower.positional_embedding
        assert pos.shape == (1 + grid * grid, 128)
        assert torch.equal(pos[0], file_pos[0])  # class token kept
        # Same as open_clip's loader resizing a checkpoint into a model built at this size.
        model = open_clip.create_model(ARCH, force_image_size=size, pretrained_hf=False)
        sd = {"visual.positional_embedding": file_pos.clone()}
        open_clip.model.resize_pos_embed(sd, model)
        torch.testing.assert_close(pos, sd["visual.positional_embedding"])
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        assert t(x).shape == (3, grid * grid, 48)
    assert resize_pos_embed(file_pos, 4) is file_pos


def test_check_grid(ckpt):
    t = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)
    t.check_grid(4, 64, 16)
    msg = "teacher itpn-test-clip at 32 px gives a 4x4 token grid but the student at 64 px / patch 8 gives 8x8"
    with pytest.raises(ValueError, match=re.escape(msg)):
        t.check_grid(8, 64, 8)
    with pytest.raises(ValueError, match="the student gives 8x8; set the teacher image size to 64 px"):
        t.check_grid(8)


def test_startup_errors(ckpt, tmp_path):
    missing = str(tmp_path / "clip" / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        CLIPTeacher("ViT-L-14", missing)
    with pytest.raises(ValueError, match=r"unknown open_clip arch 'ViT-Q-99'.*open_clip.list_models\(\)"):
        CLIPTeacher("ViT-Q-99", None)
    with pytest.raises(ValueError, match=r"'no-such-tag' are neither a file nor an open_clip pretrained tag"):
        CLIPTeacher(ARCH, "no-such-tag")
    register_tiny_config()  # different widths: the file must be refused, naming it
    with pytest.raises(ValueError, match=re.escape(ckpt["pt"]) + ".*do not fit open_clip arch"):
        CLIPTeacher(TINY_ARCH, ckpt["pt"])
    with pytest.raises(ValueError, match="not a multiple of"):
        CLIPTeacher(ARCH, None, image_size=30)


def test_gelu_weights_refused_under_a_quickgelu_arch(ckpt, monkeypatch):
    gelu_tag = {"quick_gelu": False, "hf_hub": "test/clip/"}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: gelu_tag)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, cache_dir=None: ckpt["pt"])
    with pytest.raises(ValueError, match="trained with GELU but arch 'itpn-test-clip-quickgelu'"):
        CLIPTeacher(ARCH_QG, "some-gelu-tag")


def test_pretrained_tag_goes_through_open_clip_download(monkeypatch):
    """A tag is resolved by open_clip (real ViT-B-16 'openai' entry) and fetched with
    open_clip.download_pretrained; offline, that failure becomes a clear error."""
    seen = {}

    def offline(cfg, cache_dir=None):
        seen.update(cfg)
        raise FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin): no connection")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch open_clip weights ViT-B-16:openai .*local file"):
        CLIPTeacher("ViT-B-16", "openai")
    assert "ViT-B-16" in seen["url"] or "vit_base_patch16_clip_224.openai" in seen["hf_hub"]


@pytest.mark.parametrize("tag, flags", [("openai", {"quick_gelu": True}),
                                        ("openai", {}),  # open_clip < 3 does not flag its OpenAI tags
                                        ("other_quickgelu_tag", {"quick_gelu": True})])
def test_tag_decides_quickgelu(ckpt, images, monkeypatch, tag, flags):
    """A QuickGELU tag under the GELU arch name still builds QuickGELU. The tag's file here is
    a plain open_clip state dict, so only the tag can tell."""
    real = open_clip.get_pretrained_cfg
    cfg = {"hf_hub": "test/clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), **flags}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda a, t: cfg if (a, t) == (ARCH, tag) else real(a, t))
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, cache_dir=None: ckpt["pt"])
    t = CLIPTeacher(ARCH, tag, dtype=torch.float32)
    assert t.quick_gelu and _acts(t) == QUICK_GELU_FOLDED
    assert t.mean == (0.5, 0.5, 0.5) and t.std == (0.25, 0.25, 0.25)
    assert torch.equal(t(images), CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)(images))


def test_quick_gelu_of_tags_and_archs(ckpt):
    """What the benchmark uses to give its random teacher the recipe's activation: OpenAI's tags
    are QuickGELU, LAION's GELU; an arch's QuickGELU name is open_clip's or one registered."""
    assert tag_quick_gelu("ViT-L-14", "openai") and tag_quick_gelu("ViT-B-16", "openai")
    assert not tag_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert quick_gelu_arch("ViT-L-14") == "ViT-L-14-quickgelu" and quick_gelu_arch("ViT-L/14") == "ViT-L-14-quickgelu"
    assert quick_gelu_arch(ARCH_QG) == ARCH_QG
    name = quick_gelu_arch(TINY_ARCH)  # no such variant in open_clip: registered here
    assert name == f"{TINY_ARCH}-quickgelu"
    assert _acts(CLIPTeacher(name, None, dtype=torch.float32)) == QUICK_GELU_FOLDED
    assert _acts(CLIPTeacher(TINY_ARCH, None, dtype=torch.float32)) == {nn.GELU}


@pytest.mark.parametrize("arch", [ARCH, ARCH_QG])
def test_compiled_blocks_give_the_eager_targets(ckpt, images, arch):
    """CLIPTeacher.compile_blocks (the trainer's teacher.compile): each residual block one graph
    without a break, the targets those of the eager tower (fp32, CPU inductor)."""
    eager = CLIPTeacher(arch, ckpt["pt"], dtype=torch.float32)
    compiled = CLIPTeacher(arch, ckpt["pt"], dtype=torch.float32)
    blk = compiled.tower.transformer.resblocks[0]
    x = eager.forward_features(images)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(blk)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled.compile_blocks(dynamic=False)
    assert all(b._compiled_call_impl is not None for b in compiled.tower.transformer.resblocks)
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_frozen_and_out_of_the_owners_state(ckpt, images):
    t = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)
            self.teacher = t  # even registered as a child, the tower stays out

    s = Student()
    assert [n for n, _ in s.named_parameters()] == ["head.weight", "head.bias"]
    assert set(s.state_dict()) == {"head.weight", "head.bias"}
    assert list(t.parameters()) == [] and list(t.buffers()) == [] and not t.state_dict()
    assert all(not p.requires_grad for p in t.tower.parameters())
    s.train()
    s.half()  # a DeepSpeed-style cast of the owner leaves the teacher's precision alone
    assert not t.training and not t.tower.training and t.dtype == torch.float32
    x = images.clone().requires_grad_(True)
    y = t(x)
    assert not y.requires_grad and y.grad_fn is None
    assert t.to(torch.bfloat16) is t and t.tower.proj.dtype == torch.bfloat16 and t.dtype == torch.bfloat16


def test_bf16_and_autocast(ckpt, images):
    ref = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)(images)
    t = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.bfloat16)
    assert {p.dtype for p in t.tower.parameters()} == {torch.bfloat16}
    y = t(images)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.99
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast changes nothing
        assert torch.equal(t(images), y)


def test_attention_takes_the_fused_path(ckpt, images):
    t = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.bfloat16)
    if not getattr(t.tower.transformer.resblocks[0].attn, "batch_first", False):
        pytest.skip("this open_clip builds sequence-first blocks, which never take the MHA fast path")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t(images)
    assert any(e.key == "aten::_native_multi_head_attention" for e in prof.key_averages())


def test_bad_input_is_refused(ckpt):
    t = CLIPTeacher(ARCH, ckpt["openai"], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\) images, got \(2, 3, 64, 64\)"):
        t(torch.zeros(2, 3, 64, 64))
    with pytest.raises(TypeError, match="float images"):
        t(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_load_clip_state_dict_formats(ckpt):
    for fmt, openai in (("openai", True), ("openai_sd", True), ("pt", False), ("safetensors", False),
                        ("train", False)):
        sd, is_openai = load_clip_state_dict(ckpt[fmt])
        assert is_openai is openai, fmt
        assert set(sd) == set(ckpt["sd"]), fmt  # OpenAI extras and module. prefixes gone


def test_tiny_demo_tower_and_config_builder():
    t = build_clip_teacher({"arch": TINY_ARCH, "weights": None, "image_size": 64, "dtype": "bf16"})
    assert (t.embed_dim, t.grid, t.width, t.layers, t.patch_size, t.dtype) == (32, 4, 64, 2, 16, torch.bfloat16)
    assert t.mean == open_clip.OPENAI_DATASET_MEAN and t.std == open_clip.OPENAI_DATASET_STD
    y = t(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 16, 32) and torch.isfinite(y).all()
    custom = build_clip_teacher({"arch": "itpn-test-custom", "weights": None, "model_cfg": CFG}, dtype=torch.float32)
    assert custom.arch == "itpn-test-custom" and custom.embed_dim == 48
    with pytest.raises(ValueError, match="unknown CLIP teacher config keys"):
        build_clip_teacher({"arch": TINY_ARCH, "wieghts": None})
