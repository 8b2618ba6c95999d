"""Registers, spilled bytes and shared memory of the bias_attention kernels
(itpn/layers/bias_attention.py) for every autotuner config, compiled ahead of time for a
CUDA architecture (default sm90, the H100) with Triton and the ptxas it ships with: no GPU
needed. A config that spills or needs more shared memory than the SM has is slow or fails
on the GPU; this shows it on any machine.

    python benchmarks/kernel_resources.py [--arch 90] [--head-dim 64] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from itpn.layers import bias_attention as ba

CONSTEXPRS = ("HAS_BIAS", "BIAS_GRAD", "D", "BM", "BN", "F32")
FLOATS = ("qk_scale", "sm_scale")


def _kernels(dtype: str) -> dict:
    """name -> (kernel, pointer argument types, constexpr values, configs)."""
    t, f = f"*{dtype}", "*fp32"
    return {
        "fwd": (ba._bias_attn_fwd, dict(QKV=t, BIAS=f, O=t, LSE=f), dict(HAS_BIAS=True), ba.FWD_CONFIGS),
        "dkdv": (ba._bias_attn_bwd_dkdv, dict(QKV=t, BIAS=f, DO=t, LSE=f, DELTA=f, DQKV=t, DBIAS=f),
                 dict(HAS_BIAS=True, BIAS_GRAD=True), ba.DKDV_CONFIGS),
        "dq": (ba._bias_attn_bwd_dq, dict(QKV=t, BIAS=f, DO=t, LSE=f, DELTA=f, DQKV=t), dict(HAS_BIAS=True),
               ba.DQ_CONFIGS),
    }


def compile_report(name: str, config: tuple, arch: int = 90, head_dim: int = 64, dtype: str = "bf16") -> dict:
    """Compile one kernel at one (BM, BN, warps, stages) config for sm``arch``; returns its
    registers per thread, spilled bytes (stores) and shared memory, as ptxas reports them."""
    fn, ptrs, consts, _ = _kernels(dtype)[name]
    bm, bn, warps, stages = config
    signature = {a: "constexpr" if a in CONSTEXPRS else ptrs.get(a, "fp32" if a in FLOATS else "i32")
                 for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(consts, D=head_dim, BM=bm, BN=bn, F32=False))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    return dict(kernel=name, config=config, registers=int(regs.group(1)) if regs else None,
                spill_bytes=sum(spills), shared_bytes=compiled.metadata.shared)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args(argv)
    print(f"bias_attention kernels, sm{args.arch}, d={args.head_dim}, {args.dtype}, triton {triton.__version__}")
    print(f"{'kernel':6s} {'BM':>4s} {'BN':>4s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spill B':>8s} {'shared B':>9s}")
    for name, (_, _, _, configs) in _kernels(args.dtype).items():
        for config in configs:
            r = compile_report(name, config, args.arch, args.head_dim, args.dtype)
            print(f"{name:6s} {config[0]:4d} {config[1]:4d} {config[2]:5d} {config[3]:6d} {r['registers']:5d} "
                  f"{r['spill_bytes']:8d} {r['shared_bytes']:9d}")


if __name__ == "__main__":
    main()
