"""Config layering, batch arithmetic, DeepSpeed fragments, schedules and parameter groups."""

import math

import pytest
import torch

from itpn.engine.config import (CONFIG_DIR, ConfigError, autocast_weights, batch_sizes, deepspeed_config,
                                load_config, parse_override, precision, write_run_config)
from itpn.engine.param_groups import param_groups
from itpn.engine.schedules import Schedule, scaled_lr
from itpn.models import ITPN, HiViTConfig

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "defaults")


def test_every_paper_recipe_exists():
    for name in ["pixel_b16_400e", "pixel_b16_1600e", "pixel_l16_400e", "pixel_l16_1600e", "clip_b16_300e",
                 "clip_b16_800e", "clip_l14_224_300e", "clip_l14_256_300e", "finetune_b", "finetune_l", "linprobe"]:
        assert name in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_and_give_consistent_batches(name):
    cfg = load_config(name)
    world = 8
    total = cfg["optim"]["total_batch"]
    if total and total % (cfg["data"]["batch_size"] * world) == 0:
        ds = deepspeed_config(cfg, world)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world


def test_layering_and_inheritance():
    cfg = load_config("clip_l14_256_300e", ["optim.epochs=5", "data.scale=[0.3, 1.0]"])
    assert cfg["model"]["variant"] == "large_patch16_256"  # this recipe
    assert cfg["teacher"]["arch"] == "ViT-L-14" and cfg["teacher"]["image_size"] == 224  # parent, then override
    assert cfg["optim"]["betas"] == [0.9, 0.98]  # grandparent
    assert cfg["optim"]["epochs"] == 5 and cfg["data"]["scale"] == [0.3, 1.0]  # command line
    assert cfg["objective"]["decoder_depth"] == 8  # defaults


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config("clip_b16_300e", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("optim.lr")


def test_free_form_sections_accept_any_key():
    cfg = load_config("clip_b16_300e", ["model.arch.embed_dim=128"])
    assert cfg["model"]["arch"] == {"embed_dim": 128}


def test_batch_arithmetic():
    cfg = load_config("clip_b16_300e")  # total 2048, micro 128
    assert batch_sizes(cfg, 16)["gradient_accumulation_steps"] == 1
    assert batch_sizes(cfg, 4)["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_sizes(cfg, 3)
    bad = load_config("clip_b16_300e", ["deepspeed.grad_accum=2"])
    with pytest.raises(ConfigError, match="inconsistent batch arithmetic"):
        batch_sizes(bad, 16)


def test_deepspeed_fragments_merge():
    cfg = load_config("clip_b16_300e", ["deepspeed.fragments=[zero3, fp16, clip_grad]", "optim.clip_grad=1.5"])
    ds = deepspeed_config(cfg, 16)
    assert ds["zero_optimization"]["stage"] == 3 and ds["fp16"]["enabled"] and ds["gradient_clipping"] == 1.5
    assert precision(ds) == "fp16"
    with pytest.raises(ConfigError, match="unknown DeepSpeed fragment 'zero9'"):
        deepspeed_config(load_config("clip_b16_300e", ["deepspeed.fragments=[zero9]"]), 16)
    with pytest.raises(ConfigError, match="enable bf16 and fp16"):
        deepspeed_config(load_config("clip_b16_300e", ["deepspeed.fragments=[bf16, fp16]"]), 16)
    # fp32 weights under bf16 autocast: computes in bf16, DeepSpeed keeps no bf16 copy
    ds = deepspeed_config(load_config("clip_b16_300e", ["deepspeed.fragments=[zero0, bf16_autocast, clip_grad]"]), 16)
    assert precision(ds) == "bf16" and autocast_weights(ds) and "bf16" not in ds
    assert not autocast_weights(deepspeed_config(cfg, 16))
    with pytest.raises(ConfigError, match="enable bf16 and torch_autocast"):
        deepspeed_config(load_config("clip_b16_300e", ["deepspeed.fragments=[bf16, bf16_autocast]"]), 16)


def test_run_config_written(tmp_path):
    cfg = load_config("clip_b16_300e")
    write_run_config(cfg, {"x": 1}, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert "git_revision" in text and "ViT-B-16" in text


def test_schedule_warmup_cosine_and_wd():
    s = Schedule(lr=1.0, min_lr=0.1, warmup_samples=100, total_samples=1100, weight_decay=0.05, weight_decay_end=0.2)
    assert s.lr_at(0) == 0.0 and s.lr_at(50) == 0.5 and s.lr_at(100) == 1.0
    assert math.isclose(s.lr_at(600), 0.55) and math.isclose(s.lr_at(1100), 0.1)
    assert math.isclose(s.wd_at(0), 0.05) and math.isclose(s.wd_at(1100), 0.2)
    assert scaled_lr(1.5e-3, 2048) == pytest.approx(1.2e-2)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.05, "lr_scale": 0.5},
                             {"params": [model.bias], "weight_decay": 0.0}])
    s.apply(opt, 50)
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(s.wd_at(50)) and opt.param_groups[1]["weight_decay"] == 0


def test_param_groups_decay_and_layer_decay():
    m = ITPN(HiViTConfig(img_size=32, embed_dim=64, depths=(1, 1, 2), num_heads=2), num_classes=3)
    groups = param_groups(m, 0.05)
    no_wd = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.pos_embed) in no_wd and id(m.blocks[0].norm1.weight) in no_wd and id(m.head.bias) in no_wd
    assert id(m.blocks[0].attn.relative_position_bias_table) in no_wd and id(m.head.weight) not in no_wd
    groups = param_groups(m, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(m.head.weight)] == 1.0 and scale[id(m.patch_embed.proj.weight)] == 0.5 ** 5
    assert scale[id(m.merge1.reduction.weight)] == scale[id(m.stage2[0].mlp.fc1.weight)] == 0.5 ** 3
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
