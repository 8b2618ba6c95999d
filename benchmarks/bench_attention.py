"""Attention with a relative position bias on the GPU (issue #6): ms per forward + backward
of SDPA with the bias as stored, SDPA with an 8-aligned row stride (memory-efficient kernel),
FlexAttention with a score_mod reading the bias, SDPA without bias (flash, the floor), and
the naive fp32 softmax; and, to locate the cost of the bias, SDPA with a bias that needs no
gradient (the backward's (B, H, N, N) bias-gradient write and its batch reduction drop out)
and SDPA restricted to cuDNN's attention backend (reports why if cuDNN refuses the bias); and
our Triton kernel (itpn/layers/bias_attention.py) on the packed (B, N, 3, H, d) qkv with an
fp32 (H, N, N) bias, its first call autotuned before timing.
B=128, H=12, N=196, d=64 by default (iTPN-L stage 3)."""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, iters=50, warmup=10):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=196)
    args = p.parse_args()
    B, H, N, d = args.batch, args.heads, args.tokens, 64
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, H, N, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, H, N, N, device=dev, dtype=dt, requires_grad=True)
    pad = (-N) % 8
    grad = torch.randn(B, H, N, d, device=dev, dtype=dt)

    def run(fn):
        def step():
            out = fn()
            out.backward(grad)
        return step

    def aligned():
        return F.pad(bias, (0, pad))[..., :N] if pad else bias

    def cudnn(mask):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # raises if cuDNN cannot take this call
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def naive():
        s = (q.float() * d ** -0.5) @ k.float().transpose(-2, -1) + bias.float()
        return (s.softmax(-1) @ v.float()).to(dt)

    rows = [
        ("SDPA, bias as stored", run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))),
        ("SDPA, bias row stride aligned to 8", run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=aligned()))),
        ("SDPA, bias without gradient", run(lambda: F.scaled_dot_product_attention(q, k, v,
                                                                                   attn_mask=bias.detach()))),
        ("SDPA cuDNN backend, bias", run(lambda: cudnn(bias))),
        ("SDPA cuDNN backend, bias without gradient", run(lambda: cudnn(bias.detach()))),
        ("SDPA, no bias (flash floor)", run(lambda: F.scaled_dot_product_attention(q, k, v))),
        ("naive fp32 softmax", run(naive)),
    ]
    from itpn.layers.bias_attention import bias_attention
    qkv = torch.randn(B, N, 3, H, d, device=dev, dtype=dt, requires_grad=True)
    bias32 = bias.detach()[0].float().contiguous().requires_grad_()
    grad_bnhd = grad.transpose(1, 2).contiguous()  # (B, N, H, d), the kernel's output layout
    rows.append(("bias_attention (ours, Triton), fp32 bias", lambda: bias_attention(qkv, bias32).backward(grad_bnhd)))
    rows.append(("bias_attention (ours, Triton), bias without gradient",
                 lambda: bias_attention(qkv, bias32.detach()).backward(grad_bnhd)))
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
        b32 = bias

        def score_mod(score, b, h, qi, ki):
            return score + b32[0, h, qi, ki]

        for opts in (None, {"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 32, "BLOCK_N": 32}):
            name = f"FlexAttention score_mod {opts or 'default blocks'}"
            try:
                fn = run(lambda o=opts: flex(q, k, v, score_mod=score_mod, kernel_options=o))
                fn()
                rows.append((name, fn))
            except Exception as e:  # noqa: BLE001 - report why a configuration cannot run
                print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    except ImportError as e:
        print(f"FlexAttention unavailable: {e}")
    print(f"B={B} H={H} N={N} d={d} bf16, forward+backward, {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'attention':52s} {'ms':>7s}")
    for name, fn in rows:
        try:
            print(f"{name:52s} {bench(fn):7.2f}")
        except Exception as e:  # noqa: BLE001
            print(f"{name:52s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()
