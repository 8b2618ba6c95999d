"""Registers, spilled bytes, shared memory and tensor-core instructions of our Triton kernels
(itpn/layers/bias_attention.py, itpn/layers/fused_mlp.py) for every autotuner config,
compiled ahead of time for a CUDA architecture (default sm90, the H100) with Triton and the
ptxas it ships with: no GPU needed. A config that spills or needs more shared memory than the
SM has is slow or fails on the GPU, and a GEMM that Hopper runs on ``mma`` rather than its
warpgroup instructions (``wgmma``) gets a fraction of the tensor cores' rate; this shows both
on any machine.

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

from itpn.layers import fused_mlp as fm

CONSTEXPRS = ("HAS_BIAS", "BIAS_GRAD", "D", "BM", "BN", "BK", "GROUP", "F32")
FLOATS = ("qk_scale", "sm_scale")
ATTENTION_TILES = ("BM", "BN")
MLP_TILES = ("BM", "BN", "BK")


def _kernels(dtype: str) -> dict:
    """name -> (kernel, pointer argument types, constexpr values, configs, the configs' tile names)."""
    t, f = f"*{dtype}", "*fp32"
    return {
        "fwd": (ba._bias_attn_fwd, dict(QKV=t, BIAS=f, O=t, LSE=f), dict(HAS_BIAS=True), ba.FWD_CONFIGS,
                ATTENTION_TILES),
        "dkdv": (ba._bias_attn_bwd_dkdv, dict(QKV=t, BIAS=f, DO=t, LSE=f, DELTA=f, DQKV=t, DBIAS=f),
                 dict(HAS_BIAS=True, BIAS_GRAD=True), ba.DKDV_CONFIGS, ATTENTION_TILES),
        "dq": (ba._bias_attn_bwd_dq, dict(QKV=t, BIAS=f, DO=t, LSE=f, DELTA=f, DQKV=t), dict(HAS_BIAS=True),
               ba.DQ_CONFIGS, ATTENTION_TILES),
        "mlp_fwd": (fm._fc1_gelu_fwd, dict(X=t, W=t, BIAS=t, H=t, A=t), dict(GROUP=fm.GROUP_M), fm.FWD_CONFIGS,
                    MLP_TILES),
        "mlp_dgrad": (fm._fc2_dgrad_gelu, dict(DY=t, W2=t, H=t, DH=t, DB=f), dict(GROUP=fm.GROUP_M),
                      fm.DGRAD_CONFIGS, MLP_TILES),
    }


#: The integer arguments at iTPN-L's shapes: the stage-3 attention (B = 128, N = 196, H = 12,
#: d = 64, one bias for the batch, 16 bias-gradient groups) and the stage-3 MLP (M = 128 x 196
#: tokens, 768 -> 3072 -> 768). Triton's JIT specializes each launch on them: a value of 1
#: becomes a constant and a multiple of 16 an alignment hint (as every pointer is), which
#: decide the vector width of loads and whether the main loop is pipelined through shared
#: memory. Compiling without them would report a kernel the GPU never runs.
_ATTENTION_INTS = dict(s_qb=196 * 2304, s_qn=2304, s_q3=768, s_qh=64, s_bb=0, s_bh=196 * 196, s_bq=196,
                       s_ob=196 * 768, s_on=768, s_oh=64, s_lb=12 * 196, s_lh=196, s_dg=12 * 196 * 196,
                       s_dh=196 * 196, s_dq=196, B=128, N=196, H=12, G=16)
_MLP_INTS = dict(M=128 * 196, s_hm=3072, s_hn=1, s_dbm=3072)
INTS = {
    "fwd": _ATTENTION_INTS, "dkdv": _ATTENTION_INTS, "dq": _ATTENTION_INTS,
    "mlp_fwd": dict(_MLP_INTS, N=3072, K=768, s_xm=768, s_xk=1, s_wn=768, s_wk=1),
    "mlp_dgrad": dict(_MLP_INTS, N=3072, K=768, s_dym=768, s_dyk=1, s_wk=3072, s_wn=1),
}


def _specialization(fn, ptrs: dict, ints: dict) -> tuple[dict, dict]:
    """The constants (integers equal to 1) and alignment hints (pointers, multiples of 16)
    Triton's JIT would give a launch with these integer values."""
    constants = {a: 1 for a, v in ints.items() if v == 1}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in ptrs or (a in ints and ints[a] != 1 and ints[a] % 16 == 0)}
    return constants, attrs


def compile_report(name: str, config: tuple, arch: int = 90, head_dim: int = 64, dtype: str = "bf16") -> dict:
    """Compile one kernel at one config (its tiles, then warps and stages) for sm``arch``;
    returns its registers per thread, spilled bytes (stores) and shared memory, as ptxas
    reports them, and its tensor-core instruction (``wgmma``, ``mma`` or None) from the PTX."""
    fn, ptrs, consts, _, tiles = _kernels(dtype)[name]
    *sizes, warps, stages = config
    ones, attrs = _specialization(fn, ptrs, INTS[name])
    constexprs = dict(consts, F32=False, **dict(zip(tiles, sizes)), **ones)
    if "D" in fn.arg_names:
        constexprs["D"] = head_dim
    signature = {a: "constexpr" if a in CONSTEXPRS or a in ones else ptrs.get(a, "fp32" if a in FLOATS else "i32")
                 for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else None
    return dict(kernel=name, config=config, registers=int(regs.group(1)) if regs else None,
                spill_bytes=sum(spills), shared_bytes=compiled.metadata.shared, mma=mma)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args(argv)
    print(f"bias_attention (d={args.head_dim}) and fused_mlp kernels, sm{args.arch}, {args.dtype}, "
          f"triton {triton.__version__}")
    print(f"{'kernel':9s} {'tiles':>14s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spill B':>8s} {'shared B':>9s} "
          f"{'mma':>6s}")
    for name, (_, _, _, configs, _) in _kernels(args.dtype).items():
        for config in configs:
            r = compile_report(name, config, args.arch, args.head_dim, args.dtype)
            tiles = "x".join(map(str, config[:-2]))
            print(f"{name:9s} {tiles:>14s} {config[-2]:5d} {config[-1]:6d} {r['registers']:5d} "
                  f"{r['spill_bytes']:8d} {r['shared_bytes']:9d} {r['mma'] or '-':>6s}")

if __name__ == "__main__":
    main()
