"""Triton, where torch ships it (its CUDA builds), for the kernels of this package
(bias_attention.py, fused_mlp.py). With TRITON_INTERPRET=1 set before Triton is imported, the
kernels run in Triton's interpreter on CPU tensors (the tests do this); without Triton,
``jit`` leaves the kernel functions undecorated and ``available()`` is False."""

from __future__ import annotations

import os

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
