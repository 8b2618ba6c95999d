"""The MLP of every block (fc1 -> exact GELU -> fc2) with GELU and the fc1 bias gradient fused
into the epilogues of two GEMMs, in Triton.

Why: between fc1 and fc2 the hidden activation is 4x the block's width, and with the
GEMMs in cuBLAS every pointwise op on it is a pass through memory of its own. Per MLP call,
in (M tokens, 4C) elements:

=========================  =======================================  =====================
                           separate kernels (eager or compiled)     fused (this module)
=========================  =======================================  =====================
forward                    fc1 writes h; GELU reads h, writes a     fc1 writes h and a
backward                   fc2's dgrad writes da; GELU' reads da    fc2's dgrad reads h,
                           and h, writes dh; the bias gradient      writes dh and one fp32
                           reads dh                                 partial bias sum per
                                                                    row tile
hidden-sized passes        8                                        4
=========================  =======================================  =====================

Inductor fuses neither (the GELU sits between two GEMMs; docs/performance.md, the
roofline): in iTPN-L's stage-3 blocks these four passes are ~4.8 of the 18.7 MB per image
of non-GEMM traffic, and they are most of what the attention-free C-MLP blocks of stages
1-2, the pyramid and the pixel decoder move at all.

The other four GEMMs (fc1's input and weight gradients, fc2's forward and weight gradient)
stay in cuBLAS. The values match the unfused module's rounding: h is rounded to its storage
type before GELU reads it, and fc2's input gradient before GELU' multiplies it, as the
separate kernels see them; the bias gradient is summed from the rounded dh in fp32.

``fused_mlp(x, w1, b1, w2, b2)`` is a custom op (``torch.library``), opaque to
``torch.compile``; its backward is traced (the custom op of the dgrad kernel, matmuls and a
sum). On CUDA it launches compiled kernels (autotuned per shape among configs that compile
for sm90 without spills: ``benchmarks/kernel_resources.py``); on the CPU the same kernel
code runs in Triton's interpreter (for the tests). ``Mlp.fused`` switches it on per module
(``deepspeed.fused_mlp`` in the trainer, the benchmark's ``mlp`` setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import available, device_reason, jit, require, tl, triton

#: (BM, BN, BK, warps, stages) per kernel, tried by Triton's autotuner on CUDA once per
#: (M, N, K). Each config compiles for sm90 without spilling registers
#: (`python benchmarks/kernel_resources.py --mlp`); the interpreter uses INTERPRETER_TILE.
FWD_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3),
               (128, 64, 64, 4, 3), (64, 128, 64, 4, 4))
DGRAD_CONFIGS = FWD_CONFIGS
#: Rows of output tiles that run next to each other, so that they share their weight tiles in L2.
GROUP_M = 8
INTERPRETER_TILE = (16, 16, 16)
#: Every width must be a multiple of this (16-byte aligned rows for the kernels' loads in bf16).
ALIGN = 8


@jit
def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    # This program's output tile, in groups of GROUP row tiles that sweep the columns together.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@jit
def _matmul(A, B, rm, rn, M, N, K, s_am, s_ak, s_bk, s_bn,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
    # The fp32 (BM, BN) tile rows rm x columns rn of A (M, K) @ B (K, N), any strides.
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + rk
        a = tl.load(A + rm[:, None] * s_am + ks[None, :] * s_ak, mask=(rm < M)[:, None] & (ks < K)[None, :],
                    other=0.0)
        b = tl.load(B + ks[:, None] * s_bk + rn[None, :] * s_bn, mask=(ks < K)[:, None] & (rn < N)[None, :],
                    other=0.0)
        if F32:  # Triton's interpreter multiplies bf16 operands wrongly (numpy has no bf16)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    return acc


@jit
def _fc1_gelu_fwd(X, W, BIAS, H, A, M, N, K, s_xm, s_xk, s_wn, s_wk, s_hm, s_hn,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, F32: tl.constexpr):
    # h = x @ w^T + b and a = gelu(h), h rounded to its storage type before GELU reads it.
    _, rm, rn = _tile(M, N, BM, BN, GROUP)
    acc = _matmul(X, W, rm, rn, M, N, K, s_xm, s_xk, s_wk, s_wn, BM, BN, BK, F32)
    acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    h = acc.to(H.dtype.element_ty)
    hf = h.to(tl.float32)
    a = 0.5 * hf * (1.0 + tl.math.erf(hf * 0.7071067811865476))
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm[:, None] * s_hm + rn[None, :] * s_hn
    tl.store(H + offs, h, mask=ok)
    tl.store(A + offs, a.to(A.dtype.element_ty), mask=ok)


@jit
def _fc2_dgrad_gelu(DY, W2, H, DH, DB, M, N, K, s_dym, s_dyk, s_wk, s_wn, s_hm, s_hn, s_dbm,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, F32: tl.constexpr):
    # dh = (dy @ w2) * gelu'(h), fc2's input gradient rounded first; the fp32 column sums of
    # the rounded dh over this row tile into row pid_m of DB (fc1's bias gradient, in parts;
    # every row tile writes its row, for all columns, so DB needs no zeroing).
    pid_m, rm, rn = _tile(M, N, BM, BN, GROUP)
    da = _matmul(DY, W2, rm, rn, M, N, K, s_dym, s_dyk, s_wk, s_wn, BM, BN, BK, F32)
    da = da.to(DH.dtype.element_ty).to(tl.float32)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm[:, None] * s_hm + rn[None, :] * s_hn
    h = tl.load(H + offs, mask=ok, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    dh = (da * (cdf + h * pdf)).to(DH.dtype.element_ty)
    tl.store(DH + offs, dh, mask=ok)
    tl.store(DB + pid_m * s_dbm + rn, tl.sum(dh.to(tl.float32), axis=0), mask=rn < N)


def _widths_ok(*widths: int) -> bool:
    return all(w % ALIGN == 0 for w in widths)


def unusable_reason(device, dtype: torch.dtype, dim: int, hidden: int, out_dim: int) -> str | None:
    """Why ``fused_mlp`` cannot run for these tensors (None: it can): ``device_reason``, and
    widths that are multiples of ALIGN."""
    reason = device_reason(device, dtype)
    if reason is None and not _widths_ok(dim, hidden, out_dim):
        reason = f"widths {dim} -> {hidden} -> {out_dim} (multiples of {ALIGN})"
    return reason


def _check(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
    hidden, dim = w1.shape
    if x.ndim != 2 or x.shape[1] != dim or w2.ndim != 2 or w2.shape[1] != hidden or b1.shape != (hidden,) \
            or b2.shape != (w2.shape[0],):
        raise ValueError(f"fused_mlp: expected x (M, {dim}), w1 ({hidden}, {dim}), b1 ({hidden},), w2 (out, {hidden}), "
                         f"b2 (out,); got x {tuple(x.shape)}, w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    dtypes = {t.dtype for t in (x, w1, b1, w2, b2)}
    if len(dtypes) != 1:
        raise ValueError(f"fused_mlp: x, weights and biases must share one dtype, got {sorted(map(str, dtypes))}")
    if not _widths_ok(dim, hidden, w2.shape[0]):
        raise ValueError(f"fused_mlp: widths {dim} -> {hidden} -> {w2.shape[0]} must be multiples of {ALIGN}")


def _kernels(device: torch.device) -> dict:
    """The two kernels: autotuned compiled ones for CUDA, or Triton's interpreter on CPU tensors."""
    require("fused_mlp", device)
    if device.type != "cuda":
        return dict(fwd=_fc1_gelu_fwd, dgrad=_fc2_dgrad_gelu)
    if not _TUNED:
        def configs(tiles):
            return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                    for bm, bn, bk, w, st in tiles]
        # Both kernels write every element of their outputs (DB: the rows of the chosen
        # config's row tiles, the only ones summed), so trial launches need no reset.
        _TUNED.update(
            fwd=triton.autotune(configs(FWD_CONFIGS), key=["M", "N", "K"])(_fc1_gelu_fwd),
            dgrad=triton.autotune(configs(DGRAD_CONFIGS), key=["M", "N", "K"])(_fc2_dgrad_gelu))
    return _TUNED


_TUNED: dict = {}


def _launch(device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """The kernels and the tile arguments to pass: none on CUDA (the autotuner picks them);
    INTERPRETER_TILE in the interpreter, with fp32 dot operands for bf16 only."""
    if device.type == "cuda":
        return _kernels(device), dict(GROUP=GROUP_M, F32=False)
    bm, bn, bk = INTERPRETER_TILE
    return _kernels(device), dict(BM=bm, BN=bn, BK=bk, GROUP=GROUP_M, F32=dtype == torch.bfloat16)


def _min_bm(device: torch.device) -> int:
    return min(c[0] for c in DGRAD_CONFIGS) if device.type == "cuda" else INTERPRETER_TILE[0]


def _parts_buffer(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """fp32 room for one bias-gradient row per row tile of the smallest BM; uninitialised: the
    kernel writes the rows of its own tiles, and only those are summed."""
    return torch.empty(rows, cols, dtype=torch.float32, device=device)


def _tiles(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


@torch.library.custom_op("itpn::fc1_gelu", mutates_args=())
def _fc1_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    N = w1.shape[0]
    h = torch.empty(M, N, dtype=x.dtype, device=x.device)
    a = torch.empty_like(h)
    k, tiles = _launch(x.device, x.dtype)
    k["fwd"][_tiles(M, N)](x, w1, b1, h, a, M, N, K, x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
                           h.stride(0), h.stride(1), **tiles)
    return h, a


def fc1_gelu_fake(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of ``fc1_gelu``'s outputs (h, a): (M, hidden) each."""
    h = x.new_empty(x.shape[0], w1.shape[0])
    return h, torch.empty_like(h)


def dgrad_gelu_fake(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of ``fc2_dgrad_gelu``'s outputs: dh like h, fc1's bias gradient (hidden,) in fp32."""
    return torch.empty_like(h), h.new_empty(h.shape[1], dtype=torch.float32)


_fc1_gelu.register_fake(fc1_gelu_fake)


@torch.library.custom_op("itpn::fc2_dgrad_gelu", mutates_args=())
def _fc2_dgrad_gelu_op(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, fc1's bias gradient in fp32) from fc2's output gradient dy, its weight w2 and h."""
    M, K = dy.shape
    N = h.shape[1]
    dh = torch.empty_like(h)
    parts = _parts_buffer(triton.cdiv(M, _min_bm(dy.device)), N, dy.device)
    k, tiles = _launch(dy.device, dy.dtype)
    kernel = k["dgrad"]
    kernel[_tiles(M, N)](dy, w2, h, dh, parts, M, N, K, dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1),
                         h.stride(0), h.stride(1), parts.stride(0), **tiles)
    bm = tiles["BM"] if "BM" in tiles else kernel.best_config.kwargs["BM"]  # the autotuner's pick on CUDA
    return dh, parts[:triton.cdiv(M, bm)].sum(0)


_fc2_dgrad_gelu_op.register_fake(dgrad_gelu_fake)


@torch.library.custom_op("itpn::fused_mlp", mutates_args=())
def _fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, w1, b1, w2, b2)
    h, a = _fc1_gelu(x, w1, b1)
    return F.linear(a, w2, b2), h, a


@_fused_mlp.register_fake
def _(x, w1, b1, w2, b2):
    _check(x, w1, b1, w2, b2)
    return x.new_empty(x.shape[0], w2.shape[0]), *fc1_gelu_fake(x, w1, b1)


def _setup(ctx, inputs, output):
    x, w1, b1, w2, _ = inputs
    _, h, a = output
    ctx.save_for_backward(x, w1, w2, h, a)
    ctx.mark_non_differentiable(h, a)
    ctx.set_materialize_grads(False)  # no zero gradients written for h and a


def _backward(ctx, grad, _grad_h, _grad_a):
    x, w1, w2, h, a = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
    if grad is None:  # not materialised (set_materialize_grads(False)): y took no part in the loss
        return None, None, None, None, None
    grad = grad.contiguous()
    dh, db1 = _fc2_dgrad_gelu_op(grad, w2, h)
    return (dh @ w1 if need_x else None,
            dh.t() @ x if need_w1 else None,
            db1.to(w1.dtype) if need_b1 else None,
            grad.t() @ a if need_w2 else None,
            grad.sum(0) if need_b2 else None)  # as F.linear's backward (fp32 accumulation)


_fused_mlp.register_autograd(_backward, setup_context=_setup)


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """fc2(gelu(fc1(x))) over the last dim of ``x`` (any leading dims), exact-erf GELU:
    ``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)`` with the kernels above."""
    lead = x.shape[:-1]
    y = _fused_mlp(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)[0]
    return y.reshape(*lead, w2.shape[0])


def reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The same MLP in plain fp32 torch (the tests' reference), in x's dtype."""
    h = F.linear(x.float(), w1.float(), b1.float())
    return F.linear(F.gelu(h), w2.float(), b2.float()).to(x.dtype)


__all__ = ["fused_mlp", "reference", "available", "unusable_reason", "FWD_CONFIGS", "DGRAD_CONFIGS"]
