#!/usr/bin/env python3
"""The peer of `sigma generate`: an exported SIGMA model
(`sigma checkpoint export --format hf`) decoding greedily through Hugging
Face transformers' `generate()`, with a static cache and torch.compile, on
the same prompts, at the same batch and number of new tokens.

usage: peer-hf-generate.py EXPORT_DIR --prompts FILE [--batch B]
           [--max-new-tokens N] [--device cuda|cpu] [--dtype bf16|f32]
           [--cache static|dynamic] [--no-compile] [--compile-mode MODE]
           [--warmup W] [--repeats R]

Prompts: the file format `sigma generate --prompts` reads (one prompt per
line, or a JSON line with a string field "prompt"; blank lines skipped).
The first B prompts are decoded together (the file's prompts repeated if it
has fewer), tokenized with the export's tokenizer as sigma does (no special
tokens added) and left-padded to the longest.

Decoding: greedy, exactly N new tokens (min_new_tokens = max_new_tokens, so
EOS is never chosen and never stops a row), cache_implementation "static"
(default) or "dynamic". Compilation is transformers' own for static caches:
generate() runs the prefill eagerly and the one-token decoding forward
through torch.compile(model.__call__, mode=--compile-mode, default
"reduce-overhead", i.e. CUDA graphs; fullgraph=False), set through a
CompileConfig. --no-compile turns it off (disable_compile). On a CPU,
compilation (inductor, C++) is asked for explicitly; it is slow to build and
only a check that the path works.

Timing: --warmup whole generate() calls first (compilation and CUDA-graph
recording happen there; their wall time is reported as warmup_s), then per
repeat two timed calls on the same inputs and cache size: one new token
(prefill_ms: the time to the first token) and N new tokens (total_ms);
decode_ms_per_token = (total_ms - prefill_ms) / (N - 1), the steady-state
cost of one decoding step for the whole batch. tokens_per_s counts all B*N
new tokens over total_ms; decode_tokens_per_s = B / decode step. The device
is synchronised around each call. One JSON line per repeat, then one with
the medians ("run": "median"). --show first prints each prompt's
completion as `sigma generate --prompts` does ({"prompt", "completion"}),
with its token ids ("tokens": ids past the tokenizer's vocabulary, which
a freshly initialised model picks, decode to no text).
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time


def fail(msg):
    sys.exit(f"peer-hf-generate: {msg}")


def read_prompts(path):
    """Prompts as `sigma generate --prompts` reads them."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text ({e.reason})")
    out = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                v = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not JSON ({e.msg})")
            p = v.get("prompt") if isinstance(v, dict) else None
            if not isinstance(p, str):
                fail(f'{path}:{n}: a JSON line needs a string field "prompt"')
            out.append(p)
        else:
            out.append(line)
    if not out:
        fail(f"{path}: no prompts")
    return out


def parse_args():
    ap = argparse.ArgumentParser(
        description="Time greedy HF generate() (static cache, torch.compile) of a sigma HF export."
    )
    ap.add_argument("export", help="a `sigma checkpoint export --format hf` directory")
    ap.add_argument("--prompts", required=True, help="prompts file (as `sigma generate --prompts`)")
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt, exactly (default 128)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="weights and compute (default bf16)")
    ap.add_argument("--cache", choices=["static", "dynamic"], default="static", help="KV cache (default static)")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile of the decoding forward")
    ap.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        help='torch.compile mode of the decoding forward (default "reduce-overhead": CUDA graphs)',
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed generate() calls first (default 3)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    ap.add_argument(
        "--show",
        action="store_true",
        help='also print each prompt\'s greedy completion as a JSON line {"prompt", "completion", "tokens"}',
    )
    a = ap.parse_args()
    if a.batch < 1:
        fail(f"--batch {a.batch}: must be at least 1")
    if a.max_new_tokens < 2:
        fail(f"--max-new-tokens {a.max_new_tokens}: must be at least 2 (prefill and one decoding step)")
    if a.warmup < 1 or a.repeats < 1:
        fail("--warmup and --repeats must be at least 1")
    if a.no_compile and a.compile_mode != "reduce-overhead":
        fail("--compile-mode has no effect with --no-compile")
    return a


def main():
    a = parse_args()
    prompts = read_prompts(a.prompts)
    import os

    if not os.path.isfile(os.path.join(a.export, "config.json")) or not os.path.isfile(
        os.path.join(a.export, "modeling_sigma.py")
    ):
        fail(f"{a.export}: not a `sigma checkpoint export --format hf` directory (no config.json and modeling_sigma.py)")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        fail(f"--device {a.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device (use --device cpu for a check on the CPU)")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    tok = AutoTokenizer.from_pretrained(a.export, trust_remote_code=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.export, trust_remote_code=True, dtype=dtype)
    model = model.to(device).eval()

    batch = [prompts[i % len(prompts)] for i in range(a.batch)]
    enc = tok(batch, add_special_tokens=False, padding=True, return_tensors="pt")
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    lengths = mask.sum(-1).tolist()
    if min(lengths) == 0:
        fail("a prompt tokenizes to no tokens")
    longest = ids.shape[1]
    n = a.max_new_tokens
    if longest + n > model.config.max_position_embeddings:
        print(
            f"peer-hf-generate: note: {longest} prompt + {n} new tokens exceed the trained context "
            f"({model.config.max_position_embeddings})",
            file=sys.stderr,
        )

    gen = dict(
        do_sample=False,
        use_cache=True,  # the export's config says use_cache=false (for plain forwards)
        pad_token_id=tok.pad_token_id,
        attention_mask=mask,
    )
    if a.cache == "static":
        gen["cache_implementation"] = "static"
        # One cache size for the 1-token and the N-token calls: one compiled graph.
        gen["max_cache_len"] = longest + n
    if a.no_compile:
        gen["disable_compile"] = True
    elif a.cache == "static":
        cc = CompileConfig(mode=a.compile_mode)
        if device.type != "cuda":
            cc._compile_all_devices = True  # transformers compiles on accelerators only unless asked
        gen["compile_config"] = cc

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    last = {}

    def run(new):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        if out.shape != (a.batch, longest + new):
            fail(f"generate() returned {tuple(out.shape)}, not ({a.batch}, {longest + new})")
        last["out"] = out
        return ms

    t0 = time.perf_counter()
    first = run(n)
    for _ in range(a.warmup - 1):
        run(n)
    run(1)
    warmup_s = time.perf_counter() - t0
    compiled = hasattr(model, "_compiled_call")
    if a.cache == "static" and not hasattr(model, "_previous_max_cache_length"):
        fail("generate() did not use a static cache")
    if a.cache == "static" and not a.no_compile and not compiled:
        fail("generate() did not compile the decoding forward")

    if a.show:
        run(n)
        for p, row in zip(batch, last["out"][:, longest:].tolist()):
            text = tok.decode(row, skip_special_tokens=True)
            print(json.dumps({"prompt": p, "completion": text, "tokens": row}), flush=True)
    info = {
        "peer": "transformers generate()",
        "export": os.path.basename(os.path.normpath(a.export)),
        "batch": a.batch,
        "prompt_tokens": longest,
        "prompt_tokens_min": int(min(lengths)),
        "new_tokens": n,
        "cache": a.cache,
        "compile": (a.compile_mode if compiled else False),
        "dtype": a.dtype,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "warmup_calls": a.warmup,
        "first_call_s": round(first / 1e3, 3),
        "warmup_s": round(warmup_s, 3),
    }
    rows = []
    for r in range(a.repeats):
        pre = run(1)
        total = run(n)
        dec = (total - pre) / (n - 1)
        row = {
            "prefill_ms": round(pre, 3),
            "decode_ms_per_token": round(dec, 4),
            "total_ms": round(total, 3),
            "tokens_per_s": round(a.batch * n / (total / 1e3), 2),
            "decode_tokens_per_s": round(a.batch / (dec / 1e3), 2) if dec > 0 else math.inf,
        }
        rows.append(row)
        print(json.dumps({**info, "run": r, **row}), flush=True)
    med = {k: round(statistics.median(x[k] for x in rows), 4) for k in rows[0]}
    print(json.dumps({**info, "run": "median", **med}), flush=True)


if __name__ == "__main__":
    main()
