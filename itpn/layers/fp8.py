"""FP8 matmuls for a Linear's forward and backward (opt-in; Hopper's FP8 tensor cores
do twice the bf16 rate, performance-notes: "FP8 matmuls for the stage-3 linears").

Tensorwise dynamic scaling, the usual recipe for training (as torchao's "tensorwise"
float8 training): each operand of each GEMM is scaled by ``fp8_max / amax(operand)`` and
cast, the GEMM (``torch._scaled_mm`` on CUDA) accumulates in fp32 and undoes the two scales.
Forward operands (input, weight) are e4m3 (3 mantissa bits); the output gradient is e5m2
(2 mantissa bits, the range gradients need). Three GEMMs per Linear:

    out    = x @ W^T      x: e4m3 (M, K) row-major,  W: e4m3 (N, K) row-major = W^T column-major
    grad_x = g @ W        g: e5m2 (M, N) row-major,  W: e4m3, column-major copy
    grad_W = g^T @ x      g^T: e5m2 (N, M) row-major copy, x: e4m3 (M, K), column-major copy

cuBLAS wants the first operand row-major and the second column-major, and every dimension
but the first operand's rows divisible by 16; the weight gradient's inner dimension is the
token count M, so it is padded with zero rows (which add nothing) when M % 16 != 0.

What is saved for the backward is the fp8 input and weight (with their scales): half the
bytes of the bf16 input and cast weight a Linear saves under autocast. The bias, and a layer-scale gain folded into the
weight (linear.py), stay outside: autograd differentiates them as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
#: cuBLAS's FP8 GEMMs need the inner dimension and the output columns divisible by this.
FP8_ALIGN = 16


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled so that its largest magnitude is the format's largest value, cast to
    ``dtype``; returns it with the inverse scale (fp32 scalar) that restores ``t``."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float()
    # An all-zero tensor keeps scale fmax / tiny, finite; its cast is zeros either way.
    scale = fmax / amax.clamp(min=1e-12)
    t8 = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
    return t8, scale.reciprocal()


def scaled_mm(a8: torch.Tensor, b8: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a8 * a_inv) @ (b8 * b_inv)`` accumulated in fp32: ``torch._scaled_mm`` on CUDA. Other
    devices compute the same product from the dequantised operands in fp32; torch's own CPU
    ``_scaled_mm`` is a scalar reference (~0.1 GFLOP/s on the development VM), too slow for the
    demo (tests/unit/test_fp8.py checks that the two agree)."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
    out = (a8.float() * a_inv) @ (b8.float() * b_inv)
    # No .to() to the dtype it already has: on torch 2.11, under torch.compile, an autograd.Function
    # whose forward returns such a cast gets zero input gradients (tests/unit/test_fp8.py).
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _pad_rows(t8: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero rows appended up to a multiple of ``multiple`` (through uint8: all-zero bits are
    +0.0 in both fp8 formats, and padding kernels need not support fp8)."""
    pad = (-t8.shape[0]) % multiple
    if pad == 0:
        return t8
    return F.pad(t8.view(torch.uint8), (0, 0, 0, pad)).view(t8.dtype)


class _Fp8Matmul(torch.autograd.Function):
    """``x @ weight^T`` with FP8 operands; x is 2-d (tokens, in)."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        out = scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype, fast_accum=True)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = to_fp8(grad, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_mm(g8, _column_major(w8), g_inv, w_inv, x_dtype)
        if ctx.needs_input_grad[1]:
            g_t = _pad_rows(g8, FP8_ALIGN).t().contiguous()  # (N, M'), row-major
            x_cm = _column_major(_pad_rows(x8, FP8_ALIGN))  # (M', K), column-major
            grad_w = scaled_mm(g_t, x_cm, g_inv, x_inv, w_dtype)
        return grad_x, grad_w, None


def check_fp8_shape(in_features: int, out_features: int) -> None:
    """Raise unless an (out, in) weight can take the FP8 path."""
    if in_features % FP8_ALIGN or out_features % FP8_ALIGN:
        raise ValueError(f"FP8 matmuls need in and out features divisible by {FP8_ALIGN}, "
                         f"got in={in_features}, out={out_features}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs in forward and backward. The output dtype is autocast's
    where autocast is on (as ``F.linear``'s), else the input's."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    lead = x.shape[:-1]
    out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, out_dtype)
    out = out.reshape(*lead, weight.shape[0])
    return out if bias is None else out + bias.to(out_dtype)
