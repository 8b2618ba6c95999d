"""torch.compile of the blocks on CPU (issue #6): the compiled objective matches eager,
compiles without graph breaks (FP8 linears included), shares one graph between blocks that differ only in their
drop-path rate, and composes with activation checkpointing (the checkpoint stays outside
the compiled region and replays it, drop-path masks included).

``aot_eager`` runs dynamo + AOTAutograd (where tracing and recompilation problems live)
without inductor's code generation, which would take minutes on 2 cores."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from itpn.engine.build import apply_block_options, compile_whole
from itpn.layers import Block, relative_position_index
from itpn.models import HiViTConfig
from itpn.objectives.clip_mfm import ClipMFM
from itpn.objectives.pixel_mim import PixelMIM

AOT = dict(backend="aot_eager", fullgraph=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _grads(model, x, mask, targets):
    torch.manual_seed(1)
    out = model(x, mask, targets=targets)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out["loss"].detach(), grads


@pytest.mark.parametrize("ckpt,fp8,regions", [(False, False, "block"), (True, False, "block"), (True, True, "block"),
                                              (True, False, "branch")])
def test_compiled_objective_matches_eager(ckpt, fp8, regions):
    torch.manual_seed(0)
    cfg = HiViTConfig(img_size=64, embed_dim=64, depths=(1, 1, 3), num_heads=2, rpe=True, layer_scale=0.1)
    eager = ClipMFM(cfg, teacher_dim=24, fpn_dim=32, fpn_depth=1)
    compiled = copy.deepcopy(eager)
    apply_block_options(eager, 1, False, False, fp8=fp8)
    n_ckpt = apply_block_options(compiled, 1, ckpt, True, AOT, fp8=fp8, compile_regions=regions)
    assert any(getattr(m, "fp8", False) for m in compiled.modules()) == fp8
    assert n_ckpt == (sum(isinstance(m, Block) for m in compiled.modules()) if ckpt else 0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.rand(2, 16, generator=g) < 0.4
    targets = torch.randn(2, 16, 24, generator=g)
    loss_e, grads_e = _grads(eager, x, mask, targets)
    loss_c, grads_c = _grads(compiled, x, mask, targets)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really went through dynamo
    assert not counters["graph_break"]


def test_one_static_graph_per_block_shape():
    """Every distinct block signature (input shape, attention or C-MLP, layer scale, norm
    eps) gets its own static graph: none is merged into a symbolic-shape graph, none falls
    back to eager."""
    torch.manual_seed(0)
    cfg = HiViTConfig(img_size=64, embed_dim=64, depths=(1, 1, 3), num_heads=2, rpe=True, layer_scale=0.1)
    model = ClipMFM(cfg, teacher_dim=24, fpn_dim=32, fpn_depth=1)
    signatures = set()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    hooks = [b.register_forward_pre_hook(lambda mod, args: signatures.add(
        (tuple(args[0].shape), mod.has_attn, mod.layer_scale, mod.norm2.eps))) for b in blocks]
    x, mask, targets = torch.randn(2, 3, 64, 64), torch.rand(2, 16) < 0.4, torch.randn(2, 16, 24)
    model(x, mask, targets=targets)
    for h in hooks:
        h.remove()
    assert len(signatures) >= 5  # stage 1, stage 2, stage 3, pyramid levels
    apply_block_options(model, 1, False, True, {"backend": "aot_eager"})
    for _ in range(2):  # the second pass must hit the cache
        model(x, mask, targets=targets)["loss"].backward()
    assert counters["stats"]["unique_graphs"] == len(signatures)
    # One region per residual branch: a transformer block signature is two graphs.
    torch._dynamo.reset()
    counters.clear()
    apply_block_options(model, 1, False, True, {"backend": "aot_eager"}, compile_regions="branch")
    for _ in range(2):
        model(x, mask, targets=targets)["loss"].backward()
    assert counters["stats"]["unique_graphs"] == len(signatures) + sum(attn for _, attn, _, _ in signatures)
    with pytest.raises(ValueError, match="regions"):
        blocks[0].compile("layer")


def _run(blocks, seed=3):
    idx = relative_position_index(4)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    torch.manual_seed(1)
    y = x
    for blk in blocks:
        y = blk(y, idx, (4, 4))
    (y ** 2).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in blocks.parameters()]


def test_blocks_share_one_graph_and_checkpointing_replays_drop_path():
    torch.manual_seed(0)
    plain = torch.nn.ModuleList(Block(32, 2, rel_pos_grid=4, drop_path=0.1 * (i + 1), layer_scale=0.1)
                                for i in range(3))
    ckpt = copy.deepcopy(plain)
    apply_block_options(plain, 1, False, True, AOT)
    y1, gx1, gp1 = _run(plain)
    # Three blocks with different drop-path rates: one graph (a per-block float would recompile).
    assert counters["stats"]["unique_graphs"] == 1
    apply_block_options(ckpt, 1, True, True, AOT)
    y2, gx2, gp2 = _run(ckpt)
    assert torch.equal(y1, y2)                    # same drop-path masks
    assert torch.equal(gx1, gx2)                  # the replay drew the same masks again
    for a, b in zip(gp1, gp2):
        assert torch.equal(a, b)
    # Drop path really dropped something, so the replay check above is meaningful.
    torch.manual_seed(1)
    assert (ckpt[2].drop_path(torch.ones(64, 1, 1)) == 0).any()


@pytest.mark.parametrize("kind,ckpt", [("clip", False), ("clip", True), ("pixel", False)])
def test_whole_objective_compiles_as_one_graph(kind, ckpt):
    """``compile_whole`` (the benchmark's compile_model setting): the objective traces as a
    single graph (fullgraph: any break is an error) and matches eager."""
    torch.manual_seed(0)
    cfg = HiViTConfig(img_size=64, embed_dim=64, depths=(1, 1, 3), num_heads=2, rpe=kind == "clip",
                      layer_scale=0.1 if kind == "clip" else None)
    if kind == "clip":
        eager = ClipMFM(cfg, teacher_dim=24, fpn_dim=32, fpn_depth=1)
    else:
        eager = PixelMIM(cfg, fpn_dim=32, fpn_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=4,
                         mfm_weight=0.3)
    compiled = copy.deepcopy(eager)
    if ckpt:
        apply_block_options(compiled, 1, True, False)
    compile_whole(compiled, options=AOT)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g)
    if kind == "clip":
        mask, targets = torch.rand(2, 16, generator=g) < 0.4, torch.randn(2, 16, 24, generator=g)
    else:
        mask, targets = torch.rand(2, 16, generator=g).argsort(1) < 12, None
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        out = model(x, mask, targets=targets) if kind == "clip" else model(x, mask)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] == 1


def test_deep_copy_of_a_compiled_block_uses_its_own_weights():
    """An EMA model is a deep copy of a (possibly compiled) student: the copy must stay
    compiled and compute with its own parameters, not the original's."""
    torch.manual_seed(0)
    blk = Block(16, 2, layer_scale=0.1)
    apply_block_options(blk, 1, False, True, AOT)
    twin = copy.deepcopy(blk)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-0.5)
    x = torch.randn(2, 4, 16)
    eager_twin = copy.deepcopy(twin)
    eager_twin._compiled_forward = None
    torch.testing.assert_close(twin(x), eager_twin(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(twin(x), blk(x))
    assert counters["stats"]["unique_graphs"] == 1  # both went through the one compiled graph


def test_the_trainer_compiles_branch_regions_when_asked(tmp_path):
    """deepspeed.compile_regions reaches Block.compile through the engine's block options, and
    the preflight names a wrong value."""
    from itpn.engine.config import ConfigError, load_config
    from itpn.engine.preflight import preflight
    from itpn.engine.runner import _block_options
    (tmp_path / "manifest.json").write_text("{}")
    cfg = load_config("demo", [f"data.train={tmp_path}", "deepspeed.compile=true", "deepspeed.compile_regions=branch"])
    preflight(cfg, 1)
    torch.manual_seed(0)
    model = ClipMFM(HiViTConfig(img_size=64, embed_dim=64, depths=(1, 1, 3), num_heads=2, rpe=True),
                    teacher_dim=24, fpn_dim=32, fpn_depth=1)
    _block_options(model, cfg, torch.device("cpu"), torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert all(b._compiled_forward is not None for b in blocks)
    assert any(b.has_attn for b in blocks) and not all(b.has_attn for b in blocks)
    # two regions for every transformer block, one for every C-MLP block
    assert all(b._compiled_forward.__qualname__.startswith("_two_regions") == b.has_attn for b in blocks)
    cfg["deepspeed"]["compile_regions"] = "layer"
    with pytest.raises(ConfigError, match="deepspeed.compile_regions must be block or branch, got 'layer'"):
        preflight(cfg, 1)


def test_preflight_keeps_deepspeeds_zero3_linear_out_of_compiled_blocks(tmp_path, monkeypatch):
    """ZeRO-3 replaces F.linear by DeepSpeed's own autograd.Function unless told not to; under
    torch.compile on torch 2.11 its gradients are wrong (tests/integration/test_deepspeed.py,
    stage 3compile). Our zero3 fragments turn it off, and the preflight refuses a ZeRO-3 fragment
    that leaves it on when the blocks are compiled."""
    import json

    import itpn.engine.config as config
    from itpn.engine.config import ConfigError, load_config
    from itpn.engine.preflight import preflight
    (tmp_path / "manifest.json").write_text("{}")
    for name in ("zero3", "zero3_offload"):
        cfg = load_config("demo", [f"data.train={tmp_path}", "deepspeed.compile=true",
                                   f"deepspeed.fragments=[{name}, fp32]"])
        assert preflight(cfg, 2)["zero_optimization"]["memory_efficient_linear"] is False
    frags = tmp_path / "ds"
    frags.mkdir()
    for src in config.DS_CONFIG_DIR.glob("*.json"):
        (frags / src.name).write_text(src.read_text())
    own = json.loads((frags / "zero3.json").read_text())
    del own["zero_optimization"]["memory_efficient_linear"]
    (frags / "my_zero3.json").write_text(json.dumps(own))
    monkeypatch.setattr(config, "DS_CONFIG_DIR", frags)
    cfg = load_config("demo", [f"data.train={tmp_path}", "deepspeed.fragments=[my_zero3, fp32]"])
    preflight(cfg, 2)  # eager: DeepSpeed's linear is right
    cfg["deepspeed"]["compile"] = True
    with pytest.raises(ConfigError, match=r"my_zero3.*memory_efficient_linear=false"):
        preflight(cfg, 2)


def test_activation_memory_budget_recomputes_instead_of_saving(memory_budget_restored):
    """deepspeed.activation_memory_budget below 1: the compiled block saves fewer bytes for the
    backward (the partitioner recomputes the rest) and computes the same output and gradients.
    ``aot_eager_decomp_partition`` runs the partitioner inductor runs, without code generation."""
    import torch._functorch.config as functorch_config
    torch.manual_seed(0)
    block = Block(32, num_heads=2, layer_scale=0.1, rel_pos_grid=4).train()
    index = relative_position_index(4)
    x = torch.randn(2, 16, 32, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}
    runs = {}
    for budget in (1.0, 0.9):
        torch._dynamo.reset()  # the budget is read when a block compiles
        blk = copy.deepcopy(block)
        apply_block_options(blk, 1, False, True, {"backend": "aot_eager_decomp_partition"},
                            activation_memory_budget=budget)
        assert functorch_config.activation_memory_budget == budget
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = blk(x, index, (4, 4))
        y.square().sum().backward()
        runs[budget] = (sum(saved.values()), y.detach(), x.grad.clone(),
                        {n: p.grad for n, p in blk.named_parameters()})
        x.grad = None
    (full, y1, dx1, g1), (less, y2, dx2, g2) = runs[1.0], runs[0.9]
    assert less < full
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx2, dx1, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("value", [1.5, -0.1, True, "0.5"])
def test_activation_memory_budget_is_checked(value):
    from itpn.layers.block import set_activation_memory_budget
    with pytest.raises(ValueError, match=r"activation memory budget must be a number in \[0, 1\], got "):
        set_activation_memory_budget(value)


def test_the_trainer_sets_the_activation_memory_budget_and_the_preflight_names_bad_ones(tmp_path,
                                                                                       memory_budget_restored):
    import torch._functorch.config as functorch_config

    from itpn.engine.config import ConfigError, load_config
    from itpn.engine.preflight import preflight
    from itpn.engine.runner import _block_options
    (tmp_path / "manifest.json").write_text("{}")
    cfg = load_config("demo", [f"data.train={tmp_path}", "deepspeed.compile=true",
                               "deepspeed.activation_memory_budget=0.9"])
    preflight(cfg, 1)
    model = ClipMFM(HiViTConfig(img_size=64, embed_dim=64, depths=(1, 1, 3), num_heads=2, rpe=True),
                    teacher_dim=24, fpn_dim=32, fpn_depth=1)
    _block_options(model, cfg, torch.device("cpu"), torch.float32)
    assert functorch_config.activation_memory_budget == 0.9
    for overrides, message in ((["deepspeed.activation_memory_budget=1.5"],
                                r"deepspeed.activation_memory_budget must be a number in \[0, 1\], got 1.5"),
                               (["deepspeed.activation_memory_budget=all"],
                                "deepspeed.activation_memory_budget must be a number in .0, 1., got 'all'"),
                               (["deepspeed.compile=false", "deepspeed.activation_memory_budget=0.9"],
                                "deepspeed.activation_memory_budget=0.9 decides what compiled blocks save: "
                                "it needs deepspeed.compile=true")):
        cfg = load_config("demo", [f"data.train={tmp_path}", "deepspeed.compile=true", *overrides])
        with pytest.raises(ConfigError, match=message):
            preflight(cfg, 1)
