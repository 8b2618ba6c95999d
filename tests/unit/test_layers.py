"""Shapes and exact token placement of every layer; SDPA path == naive path."""

import pytest
import torch
import torch.nn.functional as F

from itpn.layers import (Attention, Block, DropPath, PatchEmbed, PatchMerge, PatchSplit, attention_impl,
                         relative_position_index, resize_rel_pos_table, tokens_to_map)
from itpn.layers.attention import _stride_aligned
from itpn.models.flops import saved_activation_bytes


def test_patch_embed_layout():
    pe = PatchEmbed(16, 4, 3, 8)
    x = torch.randn(2, 3, 32, 48)
    t = pe(x)
    assert t.shape == (2, 6, 4, 4, 8)  # 2x3 patches, 4x4 inner grid
    # Patch 4 is row 1, col 1; its inner cell (2, 3) covers pixels rows 16+8..16+12, cols 16+12..16+16.
    conv = pe.proj(x)  # (B, C, 8, 12)
    expect = pe.norm(conv[:, :, 4 + 2, 4 + 3])
    torch.testing.assert_close(t[:, 4, 2, 3], expect)
    with pytest.raises(ValueError, match="not divisible"):
        pe(torch.randn(1, 3, 40, 32))


def test_patch_merge_order():
    m = PatchMerge(2)
    with torch.no_grad():
        m.norm.weight.fill_(1), m.norm.bias.zero_()
        m.reduction.weight.copy_(torch.eye(4, 8))  # keep the first 4 of the 8 concatenated channels
    x = torch.zeros(1, 1, 2, 2, 2)
    x[0, 0, 0, 0, 0] = 1.0  # [0::2, 0::2]
    x[0, 0, 1, 0, 0] = 2.0  # [1::2, 0::2]
    m.norm = torch.nn.Identity()
    y = m(x)
    assert y.shape == (1, 1, 1, 1, 4)
    assert y[0, 0, 0, 0].tolist() == [1.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_merge_is_the_references_concat_bit_for_bit(dtype):
    """The single permuted copy gives the reference's four-slice concat, values and input
    gradient, bit for bit (both only move numbers); a strided (non-contiguous) input too."""
    torch.manual_seed(0)
    m = PatchMerge(6).to(dtype)
    base = torch.randn(3, 5, 4, 4, 6, dtype=dtype)
    for x0 in (base, base.transpose(2, 3).contiguous().transpose(2, 3)):  # the second is strided
        x = x0.clone().requires_grad_()
        ref = x0.clone().requires_grad_()
        cat = torch.cat([ref[..., 0::2, 0::2, :], ref[..., 1::2, 0::2, :],
                         ref[..., 0::2, 1::2, :], ref[..., 1::2, 1::2, :]], dim=-1)
        y, y_ref = m(x), m.reduction(m.norm(cat))
        assert torch.equal(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(x.grad, ref.grad)
    with pytest.raises(ValueError, match="even inner grid"):
        m(torch.randn(1, 2, 3, 2, 6, dtype=dtype))


def test_patch_split_child_placement():
    s = PatchSplit(3, 5)
    x = torch.randn(2, 7, 2, 2, 3)
    y = s(x)
    assert y.shape == (2, 7, 4, 4, 5)
    full = s.reduction(s.norm(x)).view(2, 7, 2, 2, 2, 2, 5)  # (.., h, w, a, b, C)
    for h, w, a, b in [(0, 0, 0, 0), (1, 0, 0, 1), (0, 1, 1, 0), (1, 1, 1, 1)]:
        torch.testing.assert_close(y[:, :, 2 * h + a, 2 * w + b], full[:, :, h, w, a, b])


def test_tokens_to_map():
    x = torch.arange(2 * 6 * 2 * 2 * 1, dtype=torch.float).view(2, 6, 2, 2, 1)
    m = tokens_to_map(x, (2, 3))
    assert m.shape == (2, 1, 4, 6)
    # Token 5 = patch (1, 2); its child (1, 0) lands at pixel (3, 4).
    assert m[0, 0, 3, 4] == x[0, 5, 1, 0, 0]
    with pytest.raises(ValueError):
        tokens_to_map(x, (2, 2))


def test_relative_position_index_matches_definition():
    g = 3
    idx = relative_position_index(g)
    assert idx.shape == (9, 9)
    for i in range(9):
        for j in range(9):
            dy, dx = i // g - j // g, i % g - j % g
            assert idx[i, j] == (dy + g - 1) * (2 * g - 1) + (dx + g - 1)


def test_relative_position_index_rectangular():
    idx = relative_position_index((2, 3))
    assert idx.shape == (6, 6) and idx.max() < 3 * 5
    # token 0 = (0, 0), token 5 = (1, 2): offset (-1, -2) -> ((-1 + 1) * 5 + (-2 + 2)) = 0
    assert idx[0, 5] == 0 and idx[5, 0] == 3 * 5 - 1


def test_resize_rel_pos_table_identity_and_shape():
    t = torch.randn(49, 3)
    assert resize_rel_pos_table(t, 4) is t
    assert resize_rel_pos_table(t, 6).shape == (121, 3)
    assert resize_rel_pos_table(t, (2, 5)).shape == (27, 3)


def test_stride_aligned_bias_same_values():
    b = torch.randn(1, 2, 14, 14)
    a = _stride_aligned(b)
    assert a.shape == b.shape and a.stride(-2) % 8 == 0
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rpe", [False, True])
def test_sdpa_matches_naive(rpe):
    attn = Attention(32, 4, rel_pos_grid=3 if rpe else None)
    x = torch.randn(2, 9, 32, requires_grad=True)
    idx = relative_position_index(3) if rpe else None
    y = attn(x, idx, (3, 3))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    with attention_impl("naive"):
        y2 = attn(x, idx, (3, 3))
        (g2,) = torch.autograd.grad(y2.square().sum(), x)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-5)


def test_attention_gathered_index():
    # Per-sample (B, n, n) index of kept tokens gives the same result as the full sequence
    # restricted to those tokens when attention only runs among them.
    attn = Attention(16, 2, rel_pos_grid=3)
    idx = relative_position_index(3)
    keep = torch.tensor([[0, 4, 8], [1, 2, 7]])
    x = torch.randn(2, 3, 16)
    y = attn(x, idx[keep[:, :, None], keep[:, None, :]], (3, 3))
    for b in range(2):
        yb = attn(x[b:b + 1], idx[keep[b]][:, keep[b]], (3, 3))
        torch.testing.assert_close(y[b:b + 1], yb)


def test_bf16_bias_table_gradient_is_summed_in_fp32():
    """With bf16 weights (DeepSpeed's bf16 engine) the table's gradient, 16 x 196^2 / 729 ~ 840
    query-key pairs per entry here, is within bf16 rounding of the fp32 sum; summed in bf16 it
    was 1.2% off (and on CUDA a compare-and-swap loop per add)."""
    torch.manual_seed(0)
    attn = Attention(64, 4, rel_pos_grid=14)
    idx = relative_position_index(14)
    upstream = torch.randn(16, 4, 196, 196)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        attn.to(dtype).zero_grad()
        bias = attn.rel_pos_bias(idx, (14, 14))
        assert bias.dtype == torch.float32
        (bias.expand(16, -1, -1, -1).to(dtype).float() * upstream).sum().backward()
        grads[dtype] = attn.relative_position_bias_table.grad
    assert grads[torch.bfloat16].dtype == torch.bfloat16
    ref = grads[torch.float32]
    err = (grads[torch.bfloat16].float() - ref).norm() / ref.norm()
    assert err < 4e-3, err  # bf16 has 8 significant bits: rounding alone is ~2e-3

def test_block_mlp_only_and_layer_scale():
    blk = Block(8, num_heads=0, mlp_ratio=3, layer_scale=0.1)
    assert not hasattr(blk, "attn") and not hasattr(blk, "gamma_1")
    assert blk.gamma_2.shape == (8,) and blk.mlp.fc1.out_features == 24
    x = torch.randn(2, 5, 4, 4, 8)
    assert blk(x).shape == x.shape
    blk = Block(8, num_heads=2, layer_scale=None)
    assert not hasattr(blk, "gamma_1")
    assert blk(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_gelu_is_exact_erf():
    assert Block(4).mlp.act.approximate == "none"
    assert torch.allclose(Block(4).mlp.act(torch.tensor([1.0])), F.gelu(torch.tensor([1.0])))


def _layer_scale_block(heads: int, drop_path: float, shape) -> tuple[Block, torch.Tensor, tuple]:
    """A block whose gammas and biases are distinct per channel, its input and extra arguments."""
    torch.manual_seed(0)
    blk = Block(16, num_heads=heads, drop_path=drop_path, layer_scale=0.1, rel_pos_grid=3 if heads else None)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name.startswith("gamma"):
                p.uniform_(-0.5, 0.5)  # distinct per channel, so a misplaced gamma would show
            elif name.endswith("bias"):
                p.normal_()
    x = torch.randn(*shape, requires_grad=True)
    return blk, x, (relative_position_index(3), (3, 3)) if heads else ()


LAYER_SCALE_CASES = pytest.mark.parametrize("heads,shape", [(2, (3, 9, 16)), (0, (3, 4, 2, 2, 16))])


@LAYER_SCALE_CASES
def test_folded_layer_scale_equals_reference_form(heads, shape):
    """gamma folded into proj / fc2 (the default) computes the reference's gamma * branch(x):
    the same outputs and gradients, drop path included."""
    blk, x, args = _layer_scale_block(heads, 0.3, shape)
    results = {}
    for fold in (False, True):
        blk.fold_layer_scale = fold
        torch.manual_seed(1)  # the same drop-path draws
        y = blk(x, *args)
        results[fold] = (y, *torch.autograd.grad(y.square().sum(), [x, *blk.parameters()]))
    # atol: fp32 rounding of weight-gradient sums whose order the fold changes (1.7e-6 seen with
    # torch 2.11); gammas drawn from U(-0.5, 0.5) per channel make a misplaced one far larger
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@LAYER_SCALE_CASES
def test_folded_layer_scale_saves_the_branch_outputs(heads, shape):
    """What autograd saves with the fold: one branch output (B, N, C) less per residual branch;
    without autocast, where the Linear would have saved its weight parameter itself, the scaled
    weight instead; under autocast both forms save a cast copy of the weight."""
    blk, x, args = _layer_scale_block(heads, 0.0, shape)
    saved = {}
    for fold in (False, True):
        blk.fold_layer_scale = fold
        for amp in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                saved[fold, amp] = saved_activation_bytes(lambda: blk(x, *args), blk)
    out_linears = [blk.mlp.fc2] + ([blk.attn.proj] if heads else [])
    scaled_weights = sum(m.weight.numel() * 4 for m in out_linears)
    assert saved[False, False] - saved[True, False] == len(out_linears) * x.numel() * 4 - scaled_weights
    assert saved[False, True] - saved[True, True] == len(out_linears) * x.numel() * 2  # bf16 outputs


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])  # bf16: as DeepSpeed's bf16 engine
@pytest.mark.parametrize("p", [0.1, 0.25, 0.37])
def test_drop_path_bf16_scales_kept_samples_by_one_over_keep(p, module_dtype):
    """In bf16 a kept sample is x / keep rounded once (relative error <= 2^-8), not x times a
    bf16-rounded 1 / bf16(keep) (0.55% too large for keep 0.9); dropped samples are zero."""
    drop = DropPath(p).to(module_dtype).train()
    torch.manual_seed(0)
    x = torch.randn(4096, 8).to(torch.bfloat16)
    y = drop(x)
    assert y.dtype == torch.bfloat16
    kept = (y != 0).any(dim=1)
    assert 0 < kept.sum() < 4096 and (y[~kept] == 0).all()
    exact = x[kept].double() / float(drop.keep)  # the keep both the draw and the division used
    assert ((y[kept].double() - exact).abs() <= 2 ** -8 * exact.abs()).all()
