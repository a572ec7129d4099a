#!/usr/bin/env python3
"""Which SDPA backend libtorch picks for the attention shapes sigma trains
(issue #13), and the forward+backward time of each shape: training repeats K
(n_k < n_v) to n_v heads and calls SDPA with enable_gqa when n_q > n_v.
Run on a GPU machine with the torch that provides sigma's libtorch:
    python3 scripts/sdpa-backends.py
"""
import time

import torch
from torch.nn.attention import SDPBackend

dev, dt = "cuda", torch.bfloat16
b, t = 2, 4096
cases = [
    # name, n_q, kv heads after the repeat, q/k dim, v dim
    ("SIGMA-1.5B (32 q, K repeated to 16, V 16)", 32, 16, 64, 64),
    ("GQA 16/16 at 1.5B width (32 q, 16 kv)", 32, 16, 64, 64),
    ("MHA 32/32", 32, 32, 64, 64),
    ("K dim halved, cached reading (q.k 32, v 64)", 32, 16, 32, 64),
    ("SIGMA-10B (32 q, 16 kv, 128)", 32, 16, 128, 128),
]


def timed(f, n=10):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1e3


print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, batch {b}, seq {t}, bf16, causal")
print(f"{'shape':<46} {'backend':<20} {'fwd+bwd ms':>10}")
for name, nq, nkv, dqk, dv in cases:
    q = torch.randn(b, nq, t, dqk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, nkv, t, dqk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, nkv, t, dv, device=dev, dtype=dt, requires_grad=True)
    gqa = nq != nkv
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=None, enable_gqa=gqa)
    backend = SDPBackend(choice).name

    def step():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        o.sum().backward()

    print(f"{name:<46} {backend:<20} {timed(step):>10.2f}")
    if gqa:
        # The same attention with K and V repeated to n_q heads (no grouping needed).
        kr = k.detach().repeat_interleave(nq // nkv, 1).requires_grad_()
        vr = v.detach().repeat_interleave(nq // nkv, 1).requires_grad_()
        c2 = SDPBackend(torch._fused_sdp_choice(q, kr, vr, None, 0.0, True)).name

        def step2():
            o = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
            o.sum().backward()

        print(f"{'  ... K, V repeated to ' + str(nq) + ' heads':<46} {c2:<20} {timed(step2):>10.2f}")
