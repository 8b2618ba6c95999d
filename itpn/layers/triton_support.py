"""Triton, where torch ships it (its CUDA builds), for the kernels of this package
(bias_attention.py, fused_mlp.py). With TRITON_INTERPRET=1 set before Triton is imported, the
kernels run in Triton's interpreter on CPU tensors (the tests do this); without Triton,
``jit`` leaves the kernel functions undecorated and ``available()`` is False."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    """Whether Triton's interpreter is on (it must be set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reason(device, dtype: torch.dtype) -> str | None:
    """Why no kernel of ours can run on tensors of ``dtype`` on ``device`` (None: they can):
    Triton, a CUDA device in bf16 / fp16 (fp32 operands would run the tensor cores in tf32),
    or Triton's interpreter (any of the three)."""
    device = torch.device(device)
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda" and not interpreted():
        return f"tensors on {device.type}, not CUDA"
    if dtype not in (torch.bfloat16, torch.float16) and not (interpreted() and dtype == torch.float32):
        return f"{dtype} (bf16 or fp16 on CUDA)"
    return None


def require(name: str, device: torch.device) -> None:
    """Raise, naming ``name``, unless its kernels can run on ``device``."""
    if triton is None:
        raise RuntimeError(f"{name} needs Triton (it ships with the CUDA builds of torch)")
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"{name} runs on CUDA tensors (got {device}); on the CPU only in Triton's interpreter, "
                           "with TRITON_INTERPRET=1 set before Triton is imported")
