"""Fused attention with a trainable additive bias (one for the batch, or one per sample), in
Triton: the relative position bias of HiViT's stage-3 blocks (iTPN paper, section 3.2; reference doc,
sections 1 and 5) at the short sequences it meets (N = 196 at 224 px).

Why a kernel of our own: SDPA cannot take a bias on its flash path, and its
memory-efficient kernel ran the CLIP-L step's attention at ~6.5x its roofline bound
(docs/performance.md); FlexAttention was slower still inside the compiled step. This is the
FlashAttention-2 scheme (online softmax forward; backward recomputes the probabilities from
the saved log-sum-exp) with three things specific to our blocks:

* q, k and v are read in place from qkv's (B, N, 3, H, d) output, and the backward writes
  their gradients into one (B, N, 3, H, d) tensor: qkv's output gradient as its Linear reads
  it, with no stack of three (B, H, N, d) gradients (a (B, N, 3C) copy per block);
* the output is (B, N, H, d), so the (B, N, C) input of ``proj`` is a view;
* the bias is a (H, N, N) fp32 tensor for the whole batch (all tokens, CLIP-MFM) or a
  (B, H, N, N) one (each sample's visible tokens, pixel MIM); the gradient of a shared bias
  is each sample's score gradient summed over the batch in fp32, inside the dK/dV kernel:
  each program adds the samples of one group, in order, into its own slice of a (16, H, N, N)
  buffer, and the 16 partial sums are added at the end. No atomics, so the result is
  deterministic, and no (B, H, N, N) gradient goes through memory (SDPA's memory-efficient
  kernel writes one and reduces it).

``bias_attention(qkv, bias)`` is a custom op (``torch.library``), opaque to ``torch.compile``
like SDPA's kernels. On CUDA it launches the compiled kernels; on the CPU the same kernel
code runs in Triton's interpreter (slow: it exists for the tests).
"""

from __future__ import annotations

import torch

from .triton_support import available, device_reason, require, tl, triton
from .triton_support import jit as _jit

_LOG2E = 1.4426950408889634
#: (BM queries, BN keys, warps, pipeline stages) per kernel, tried by Triton's autotuner on CUDA
#: once per sequence length, head count and variant. Small tiles waste less of a short sequence
#: (N = 196 pads to 224 with 32-wide tiles, to 256 with 64 or 128), large ones reuse more of
#: each load. Each list holds configs that ptxas compiles for sm90 with d = 64, specialized
#: as for iTPN-L's shapes, without spilling registers, or nearly (<= 4 bytes; `python
#: benchmarks/kernel_resources.py` prints registers, spills, shared memory and the tensor-core
#: instructions of every config, no GPU needed). The interpreter uses INTERPRETER_BLOCK x
#: INTERPRETER_BLOCK.
FWD_CONFIGS = ((32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 3), (64, 128, 8, 2))
DKDV_CONFIGS = ((32, 32, 4, 2), (32, 32, 4, 3), (32, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3))
DQ_CONFIGS = ((32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 3))
INTERPRETER_BLOCK = 16
#: Groups of samples whose bias-gradient partial sums the dK/dV kernel keeps apart (a (G, H, N,
#: N) fp32 buffer, summed at the end): enough programs to fill the GPU (key tiles x heads x
#: groups: 7 x 12 x 16 for iTPN-L with 32-wide tiles), few enough partial sums to stay in L2
#: (29 MB at N = 196).
BIAS_GROUPS = 16


@_jit
def _dot(a, b, F32: tl.constexpr):
    # F32: fp32 operands, for Triton's interpreter, whose dot of bf16 operands is wrong (numpy has
    # no bf16); the operands are rounded to their storage type first, as on the GPU.
    if F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@_jit
def _query_tile(N, H, BM: tl.constexpr):
    # A program over (query tile, sample x head): its sample, head, query rows and their mask.
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    return bh // H, bh % H, offs_m, offs_m < N


@_jit
def _load_kv(base, s_q3, s_qn, rows, rows_ok, offs_d):
    # The (rows, d) key and value tiles of one (sample, head), read inside qkv.
    ptrs = base + rows[:, None] * s_qn + offs_d[None, :]
    k = tl.load(ptrs + s_q3, mask=rows_ok[:, None], other=0.0)
    v = tl.load(ptrs + 2 * s_q3, mask=rows_ok[:, None], other=0.0)
    return k, v


@_jit
def _load_queries(base, do_base, row_base, s_qn, s_on, rows, rows_ok, offs_d, LSE, DELTA):
    # For the backward: the (rows, d) query and output-gradient tiles, and the rows' log-sum-exp
    # and delta, of one (sample, head).
    q = tl.load(base + rows[:, None] * s_qn + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * s_on + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
    lse = tl.load(LSE + row_base + rows, mask=rows_ok, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=rows_ok, other=0.0)
    return q, do, lse, delta


@_jit
def _scores(q, k, bias_ptrs, ok, qk_scale, HAS_BIAS: tl.constexpr, F32: tl.constexpr):
    # (q k^T * scale + bias) in log2 units (times log2 e), so that exp2 does the exponentials.
    s = _dot(q, tl.trans(k), F32) * qk_scale
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=ok, other=0.0) * 1.4426950408889634
    return s


@_jit
def _bias_attn_fwd(QKV, BIAS, O, LSE, s_qb, s_qn, s_q3, s_qh, s_bb, s_bh, s_bq, s_ob, s_on, s_oh, s_lb, s_lh,
                   N, H, qk_scale,
                   HAS_BIAS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    # One program: BM queries of one (sample, head); online softmax over key tiles.
    b, h, offs_m, row_ok = _query_tile(N, H, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    base = QKV + b * s_qb + h * s_qh
    q = tl.load(base + offs_m[:, None] * s_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in range(0, N, BN):
        kn = start + offs_n
        col_ok = kn < N
        k, v = _load_kv(base, s_q3, s_qn, kn, col_ok, offs_d)
        s = _scores(q, k, BIAS + b * s_bb + h * s_bh + offs_m[:, None] * s_bq + kn[None, :],
                    row_ok[:, None] & col_ok[None, :], qk_scale, HAS_BIAS, F32)  # (BM, BN)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + b * s_lb + h * s_lh + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@_jit
def _bias_attn_delta(O, DO, DELTA, s_ob, s_on, s_oh, s_lb, s_lh, N, H, D: tl.constexpr, BM: tl.constexpr):
    # delta = rowsum(dO * O) per query: the softmax backward's correction term.
    b, h, offs_m, row_ok = _query_tile(N, H, BM)
    offs_d = tl.arange(0, D)
    ptr = b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :]
    o = tl.load(O + ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + b * s_lb + h * s_lh + offs_m, tl.sum(o * do, 1), mask=row_ok)


@_jit
def _bias_attn_bwd_dkdv(QKV, BIAS, DO, LSE, DELTA, DQKV, DBIAS, s_qb, s_qn, s_q3, s_qh, s_bb, s_bh, s_bq,
                        s_ob, s_on, s_oh, s_lb, s_lh, s_dg, s_dh, s_dq, B, N, H, G, qk_scale, sm_scale,
                        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, D: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    # One program: BN keys of one head, for the samples g, g + G, g + 2G, ... of group g; per
    # sample it loops over all query tiles and writes dk and dv. With BIAS_GRAD it adds each
    # sample's score gradient into its group's (H, N, N) slice of DBIAS (zeroed beforehand):
    # only this program touches that slice, so no atomics, and the slice stays in L2 while
    # the program's samples add into it.
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < N
    for b in range(g, B, G):
        base = QKV + b * s_qb + h * s_qh
        k, v = _load_kv(base, s_q3, s_qn, offs_n, col_ok, offs_d)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        for start in range(0, N, BM):
            qm = start + offs_m
            row_ok = qm < N
            q, do, lse, delta = _load_queries(base, DO + b * s_ob + h * s_oh, b * s_lb + h * s_lh, s_qn, s_on,
                                              qm, row_ok, offs_d, LSE, DELTA)
            ok = row_ok[:, None] & col_ok[None, :]
            s = _scores(q, k, BIAS + b * s_bb + h * s_bh + qm[:, None] * s_bq + offs_n[None, :], ok, qk_scale,
                        HAS_BIAS, F32)  # (BM, BN)
            p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, F32)
            dp = _dot(do, tl.trans(v), F32)
            ds = p * (dp - delta[:, None])  # gradient of the natural-units score
            if BIAS_GRAD:
                ptr = DBIAS + g * s_dg + h * s_dh + qm[:, None] * s_dq + offs_n[None, :]
                tl.store(ptr, tl.load(ptr, mask=ok, other=0.0) + ds, mask=ok)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, F32)
        out = DQKV + b * s_qb + h * s_qh + offs_n[:, None] * s_qn + offs_d[None, :]
        tl.store(out + s_q3, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=col_ok[:, None])
        tl.store(out + 2 * s_q3, dv.to(DQKV.dtype.element_ty), mask=col_ok[:, None])


@_jit
def _bias_attn_bwd_dq(QKV, BIAS, DO, LSE, DELTA, DQKV, s_qb, s_qn, s_q3, s_qh, s_bb, s_bh, s_bq, s_ob, s_on, s_oh,
                      s_lb, s_lh, N, H, qk_scale, sm_scale,
                      HAS_BIAS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    # One program: BM queries of one (sample, head); loops over all key tiles for dq.
    b, h, offs_m, row_ok = _query_tile(N, H, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    base = QKV + b * s_qb + h * s_qh
    q, do, lse, delta = _load_queries(base, DO + b * s_ob + h * s_oh, b * s_lb + h * s_lh, s_qn, s_on, offs_m, row_ok,
                                      offs_d, LSE, DELTA)
    dq = tl.zeros([BM, D], tl.float32)
    for start in range(0, N, BN):
        kn = start + offs_n
        col_ok = kn < N
        ok = row_ok[:, None] & col_ok[None, :]
        k, v = _load_kv(base, s_q3, s_qn, kn, col_ok, offs_d)
        s = _scores(q, k, BIAS + b * s_bb + h * s_bh + offs_m[:, None] * s_bq + kn[None, :], ok, qk_scale,
                    HAS_BIAS, F32)
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, tl.trans(v), F32) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, F32)
    tl.store(DQKV + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
             (dq * sm_scale).to(DQKV.dtype.element_ty), mask=row_ok[:, None])


def _head_dim_ok(d: int) -> bool:
    """A power of two >= 16: the width of the kernels' (rows, d) tiles."""
    return d >= 16 and not d & (d - 1)


def unusable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``bias_attention`` cannot run for these tensors (None: it can): ``device_reason``,
    and a head dim that is a power of two >= 16 (the tile width)."""
    reason = device_reason(device, dtype)
    if reason is None and not _head_dim_ok(head_dim):
        reason = f"head dim {head_dim} (a power of two >= 16)"
    return reason


def usable(qkv: torch.Tensor) -> bool:
    """Whether ``bias_attention`` can take this (B, N, 3, H, d) qkv (``unusable_reason``)."""
    return qkv.stride(-1) == 1 and unusable_reason(qkv.device, qkv.dtype, qkv.shape[-1]) is None


def _kernels(device: torch.device) -> dict:
    """The four kernels: compiled for CUDA, or Triton's interpreter on CPU tensors."""
    require("bias_attention", device)
    if device.type != "cuda":
        return dict(fwd=_bias_attn_fwd, delta=_bias_attn_delta, dkdv=_bias_attn_bwd_dkdv, dq=_bias_attn_bwd_dq)
    if not _TUNED:
        def configs(tiles):
            return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]
        # The kernels write their outputs, except the bias gradient, which dkdv adds into a
        # zeroed buffer: the autotuner zeroes it again before each of its trial launches.
        _TUNED.update(
            fwd=triton.autotune(configs(FWD_CONFIGS), key=["N", "H", "HAS_BIAS", "D"])(_bias_attn_fwd),
            delta=_bias_attn_delta,
            dkdv=triton.autotune(configs(DKDV_CONFIGS), key=["N", "H", "G", "HAS_BIAS", "BIAS_GRAD", "D"],
                                 reset_to_zero=["DBIAS"])(_bias_attn_bwd_dkdv),
            dq=triton.autotune(configs(DQ_CONFIGS), key=["N", "H", "HAS_BIAS", "D"])(_bias_attn_bwd_dq))
    return _TUNED


_TUNED: dict = {}


def _check(qkv: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int, int]:
    if qkv.ndim != 5 or qkv.shape[2] != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"bias_attention: qkv must be (B, N, 3, H, d) with unit last stride, got "
                         f"shape {tuple(qkv.shape)} strides {qkv.stride()}")
    B, N, _, H, d = qkv.shape
    if not _head_dim_ok(d):
        raise ValueError(f"bias_attention: head dim {d} must be a power of two >= 16")
    # Any strides but a unit last one: inside a compiled graph inductor may hand over a bias whose
    # rows it padded (comprehensive padding on CUDA: 196 -> 200 floats per row), which the kernels
    # read through the strides they are given.
    if bias is not None and (tuple(bias.shape) not in ((H, N, N), (B, H, N, N)) or bias.dtype != torch.float32
                             or bias.stride(-1) != 1):
        raise ValueError(f"bias_attention: bias must be a float32 ({H}, {N}, {N}) or ({B}, {H}, {N}, {N}) tensor "
                         f"with unit last stride, got {tuple(bias.shape)} {bias.dtype} strides {bias.stride()}")
    return B, N, H, d


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(sample, head, query) strides of the bias; a bias shared by the batch has sample stride 0."""
    if bias is None:
        return 0, 0, 0
    if bias.ndim == 3:
        return 0, bias.stride(0), bias.stride(1)
    return bias.stride(0), bias.stride(1), bias.stride(2)


def _launch(device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """The kernels and the tile arguments to pass: none on CUDA (the autotuner picks them),
    INTERPRETER_BLOCK in the interpreter (small tiles, so that the tests cover several tiles
    and partial ones), with fp32 dot operands for bf16 only (``_dot``)."""
    if device.type == "cuda":
        return _kernels(device), dict(F32=False)
    return _kernels(device), dict(BM=INTERPRETER_BLOCK, BN=INTERPRETER_BLOCK, F32=dtype == torch.bfloat16)


def _grid(n: int, rows: int, tile: str):
    return lambda meta: (triton.cdiv(n, meta[tile]), rows)


@torch.library.custom_op("itpn::bias_attention", mutates_args=())
def _bias_attention(qkv: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, d = _check(qkv, bias)
    out = torch.empty(B, N, H, d, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=qkv.device)
    k, tiles = _launch(qkv.device, qkv.dtype)
    b_arg = bias if bias is not None else lse  # any pointer; unread without a bias
    k["fwd"][_grid(N, B * H, "BM")](
        qkv, b_arg, out, lse, qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3), *_bias_strides(bias),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), N, H, scale * _LOG2E,
        HAS_BIAS=bias is not None, D=d, **tiles)
    return out, lse


@_bias_attention.register_fake
def _(qkv, bias, scale):
    B, N, H, d = _check(qkv, bias)
    return (qkv.new_empty(B, N, H, d), qkv.new_empty(B, H, N, dtype=torch.float32))


@torch.library.custom_op("itpn::bias_attention_backward", mutates_args=())
def _bias_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor | None,
                             out: torch.Tensor, lse: torch.Tensor, scale: float,
                             bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, d = _check(qkv, bias)
    grad = grad.contiguous()
    k, tiles = _launch(qkv.device, qkv.dtype)
    delta = torch.empty_like(lse)
    k["delta"][(triton.cdiv(N, 64), B * H)](
        out, grad, delta, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), N, H,
        D=d, BM=64)
    dqkv = torch.empty(B, N, 3, H, d, dtype=qkv.dtype, device=qkv.device)
    with_bias_grad = bias is not None and bias_grad
    # The gradient of a bias shared by the batch by group of samples, the BIAS_GROUPS groups
    # summed below in fp32; otherwise (a per-sample bias, or none) one sample per program.
    groups = min(B, BIAS_GROUPS) if with_bias_grad and bias.ndim == 3 else B
    # Without a bias gradient DBIAS is a placeholder of its own: the autotuner zeroes whatever
    # is passed there before its trial launches, so it must not be a live buffer (e.g. lse).
    dbias = torch.zeros((groups, H, N, N) if with_bias_grad else (1,), dtype=torch.float32, device=qkv.device)
    b_arg = bias if bias is not None else lse
    db_strides = dbias.stride()[:3] if with_bias_grad else (0, 0, 0)
    common = (qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3), *_bias_strides(bias),
              grad.stride(0), grad.stride(1), grad.stride(2), lse.stride(0), lse.stride(1))
    k["dkdv"][lambda meta: (triton.cdiv(N, meta["BN"]), H, groups)](
        qkv, b_arg, grad, lse, delta, dqkv, dbias, *common, *db_strides, B, N, H, groups, scale * _LOG2E, scale,
        HAS_BIAS=bias is not None, BIAS_GRAD=with_bias_grad, D=d, **tiles)
    k["dq"][_grid(N, B * H, "BM")](
        qkv, b_arg, grad, lse, delta, dqkv, *common, N, H, scale * _LOG2E, scale,
        HAS_BIAS=bias is not None, D=d, **tiles)
    if not with_bias_grad:
        return dqkv, lse.new_empty(0)
    return dqkv, dbias.sum(0) if bias.ndim == 3 else dbias


@_bias_attention_backward.register_fake
def _(grad, qkv, bias, out, lse, scale, bias_grad):
    B, N, H, d = _check(qkv, bias)
    dbias = bias.new_empty(bias.shape) if bias is not None and bias_grad else lse.new_empty(0)  # contiguous, as real
    return torch.empty(B, N, 3, H, d, dtype=qkv.dtype, device=qkv.device), dbias


def _setup(ctx, inputs, output):
    qkv, bias, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(qkv, bias, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero gradient written for lse


def _backward(ctx, grad, _grad_lse):
    if grad is None:  # not materialised (set_materialize_grads(False)): out took no part in the loss
        return None, None, None
    qkv, bias, out, lse = ctx.saved_tensors
    bias_grad = ctx.has_bias and ctx.needs_input_grad[1]
    dqkv, dbias = _bias_attention_backward(grad, qkv, bias if ctx.has_bias else None, out, lse, ctx.scale,
                                           bias_grad)
    return dqkv, dbias if bias_grad else None, None


_bias_attention.register_autograd(_backward, setup_context=_setup)


def bias_attention(qkv: torch.Tensor, bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v = qkv.unbind(2).

    qkv: (B, N, 3, H, d), d a power of two >= 16; bias: float32, unit last stride, (H, N, N) for
    every sample or (B, H, N, N) per sample (None: no bias); scale defaults to d^-0.5.
    Returns (B, N, H, d)."""
    if scale is None:
        scale = qkv.shape[-1] ** -0.5
    return _bias_attention(qkv, bias, float(scale))[0]


def reference(qkv: torch.Tensor, bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The same product in plain fp32 torch, (B, N, H, d): the tests' reference."""
    q, k, v = (t.transpose(1, 2).float() for t in qkv.unbind(2))  # (B, H, N, d)
    scale = qkv.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.float()
    return (s.softmax(-1) @ v).transpose(1, 2).to(qkv.dtype)


__all__ = ["bias_attention", "reference", "available", "usable", "unusable_reason", "FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS"]

