#!/usr/bin/env python3
"""The PyTorch peer of issue #13: what a user would write instead of sigma.

A plain PyTorch trainer of the model in a sigma config (DiffQKV attention with
AugQ, SwiGLU, RMSNorm, RoPE, tied or untied embeddings): SDPA for attention,
F.rms_norm, bf16 autocast over fp32 weights, fused AdamW with gradient
clipping, optionally torch.compile'd. Random tokens on the GPU (no data
loading). It prints one JSON line: tokens/s (median over the timed steps),
the caching allocator's peak allocation, and the loss of the first and last
step. Used by scripts/bench-train-gpu.sh (RUNS=peer-...) to put sigma and this
peer side by side in one call on one card.

With --float8 RECIPE the block linears train in FP8 through torchao's
convert_to_float8_training (recipe "tensorwise" or "rowwise"), all but
those of the first and last block, as sigma's train.precision = "fp8"
does by default (the issue #27 peer; torchao is not in the GPU image: carry
its wheel, docs/precision.md).

  python3 scripts/peer-torch.py --config configs/sigma-1.5b.toml --mbs 2 --accum 2 --compile
  python3 scripts/peer-torch.py --config configs/sigma-1.5b.toml --mbs 2 --compile --float8 tensorwise
"""
import argparse
import json
import statistics
import sys
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        d, dq, dv = m["d_model"], m["qk_head_dim"], m["v_head_dim"]
        self.nq, self.nk, self.nv = m["num_q_heads"], m["num_k_heads"], m["num_v_heads"]
        self.dq, self.dv, self.eps = dq, dv, m.get("norm_eps", 1e-5)
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, self.nq * dq, bias=False)
        aug = m.get("aug_q_dim", 0)
        self.aug = None
        if aug > 0:
            self.aug = nn.ModuleList(
                [nn.Linear(self.nq * dq, aug, bias=False), nn.Linear(self.nq * dq, aug, bias=False),
                 nn.Linear(aug, self.nq * dq, bias=False)])
        self.k = nn.Linear(d, self.nk * dq, bias=False)
        self.v = nn.Linear(d, self.nv * dv, bias=False)
        self.o = nn.Linear(self.nq * dv, d, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(d))
        f = m["ffn_dim"]
        self.gate, self.up, self.down = (nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False),
                                         nn.Linear(f, d, bias=False))

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps)
        q = self.q(h)
        if self.aug is not None:
            g, u, dn = self.aug
            q = dn(F.silu(g(q)) * u(q))
        q = rope(q.view(b, t, self.nq, self.dq), cos, sin).transpose(1, 2)
        k = rope(self.k(h).view(b, t, self.nk, self.dq), cos, sin).transpose(1, 2)
        v = self.v(h).view(b, t, self.nv, self.dv).transpose(1, 2)
        kv = max(self.nk, self.nv)
        if self.nk < kv:
            k = k.repeat_interleave(kv // self.nk, dim=1)
        if self.nv < kv:
            v = v.repeat_interleave(kv // self.nv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nq != kv)
        x = x + self.o(o.transpose(1, 2).reshape(b, t, -1))
        h = F.rms_norm(x, (x.shape[-1],), self.ffn_norm, self.eps)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rope(x, cos, sin):
    # fp32 tables: under autocast q and k turn fp32 here (as in reference
    # Llama code); the figures in docs/benchmarks.md were measured so.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Model(nn.Module):
    def __init__(self, m, seq_len):
        super().__init__()
        d = m["d_model"]
        std = m.get("init_std", 0.02)
        self.emb = nn.Embedding(m["vocab_size"], d)
        self.blocks = nn.ModuleList(Block(m) for _ in range(m["num_layers"]))
        self.norm = nn.Parameter(torch.ones(d))
        self.eps = m.get("norm_eps", 1e-5)
        self.head = None if m.get("tie_embeddings", True) else nn.Linear(d, m["vocab_size"], bias=False)
        half = m["qk_head_dim"] // 2
        inv = m.get("rope_theta", 10000.0) ** (-torch.arange(0, half, dtype=torch.float64) / half)
        ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos().float()[None, :, None, :], persistent=False)
        self.register_buffer("sin", ang.sin().float()[None, :, None, :], persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)

    def forward(self, tokens, targets):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        h = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        w = self.emb.weight if self.head is None else self.head.weight
        logits = F.linear(h, w)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def to_float8(model, recipe, layers):
    """torchao's FP8 training for the linears of blocks 1..layers-2."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        sys.exit(f"error: --float8 needs torchao ({e})")
    ends = {"blocks.0.", f"blocks.{layers - 1}."}

    def keep(mod, fqn):
        return (isinstance(mod, nn.Linear) and fqn.startswith("blocks.")
                and not any(fqn.startswith(e) for e in ends)
                and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=keep)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a sigma config TOML (its [model] and data.seq_len)")
    ap.add_argument("--mbs", type=int, default=2, help="micro-batch size")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps (the first two are not timed)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--float8", choices=["tensorwise", "rowwise"],
                    help="the block linears in FP8 through torchao (first and last block in bf16)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [model] key, e.g. num_k_heads=16")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: the peer trainer needs a CUDA device")
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    m, seq = cfg["model"], cfg["data"]["seq_len"]
    for kv in a.set:
        k, _, v = kv.partition("=")
        m[k] = tomllib.loads(f"v = {v}")["v"]  # a TOML value, as sigma's --set takes it
    for k in ("k_compression", "k_dim"):
        if m.get(k, "none") not in ("none", None):
            sys.exit(f"error: model.{k} = {m[k]!r}: the peer builds no K compression")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = Model(m, seq).to(dev)
    if a.float8:
        to_float8(model, a.float8, m["num_layers"])
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    step_fn = torch.compile(model) if a.compile else model
    g = torch.Generator(device=dev).manual_seed(1)
    times, losses = [], []
    for step in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(a.accum):
            tok = torch.randint(0, m["vocab_size"], (a.mbs, seq + 1), device=dev, generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_fn(tok[:, :-1], tok[:, 1:]) / a.accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"step {step + 1}: loss {losses[-1]:.4f}, {times[-1]:.3f} s", file=sys.stderr)
    timed = times[2:] if len(times) > 2 else times
    tokens = a.mbs * seq * a.accum
    print(json.dumps({
        "peer": ("torch.compile" if a.compile else "eager")
        + (f" + torchao float8 {a.float8}" if a.float8 else ""),
        "mbs": a.mbs, "accum": a.accum, "steps": a.steps,
        "tokens_per_s": tokens / statistics.median(timed),
        "allocated_mib_peak": torch.cuda.max_memory_allocated() // 2**20,
        "loss_first": losses[0], "loss_last": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
    }))


if __name__ == "__main__":
    main()
