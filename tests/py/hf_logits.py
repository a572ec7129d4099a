"""Load a `sigma checkpoint export --format hf` directory with Hugging Face
transformers and compare its logits with sigma's own.

usage: hf_logits.py EXPORT_DIR TOKENS_JSON SIGMA_LOGITS_F32 TOLERANCE
Prints the largest absolute difference; exits 1 above the tolerance. Also
checks, against the export's own full forward: right and left padding (real
positions within 1e-5), decoding with the KV cache one token at a time
(within TOLERANCE of sigma's logits, also for a left-padded row), greedy
generate() with and without the cache, alone and in a left-padded batch
(the same tokens), and the same through a static cache: decoding into a
`StaticCache` (sigma's logits; its value buffers at the value heads' count
and width), greedy generate(cache_implementation="static") giving the
dynamic cache's tokens and logits (every step's, within TOLERANCE) alone and
in a left-padded batch, also with the
decoding forward compiled whole (torch.compile fullgraph, eager backend: no
graph breaks)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, DynamicCache, StaticCache

export, tokens_json, logits_file, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
assert tokenizer.eos_token is not None, "the tokenizer lost its special tokens"
tokens = torch.tensor(json.load(open(tokens_json)), dtype=torch.long)
with torch.no_grad():
    ours = model(tokens).logits
theirs = torch.frombuffer(bytearray(open(logits_file, "rb").read()), dtype=torch.float32)
theirs = theirs.view(ours.shape)
diff = (ours - theirs).abs().max().item()
print(f"max |transformers - sigma| = {diff:.3e} over {ours.numel()} logits")


def close(got, want, what, tol=1e-5):
    d = (got - want).abs().max().item()
    print(f"{what}: max difference {d:.1e}")
    if d > tol:
        sys.exit(f"{what}: differs by {d:.3e} (tolerance {tol:g})")


with torch.no_grad():
    # Padding on the right leaves the real positions alone.
    mask = torch.ones_like(tokens)
    mask[:, -3:] = 0
    close(model(tokens, attention_mask=mask).logits[:, :-3], ours[:, :-3], "right padding")
    # Padding on the left gives the real tokens the logits they get alone.
    short = tokens[:, :-3]
    alone = model(short).logits
    left = torch.cat([torch.zeros_like(tokens[:, :3]), short], 1)
    lmask = torch.ones_like(left)
    lmask[:, :3] = 0
    close(model(left, attention_mask=lmask).logits[:, 3:], alone, "left padding")
    # The KV cache: prefill 10 tokens, then one token per call reading the
    # cache; every position's logits equal the full forward's.
    out = model(tokens[:, :10], use_cache=True)
    steps = [out.logits]
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    assert cache is not None, "no cache returned"
    for j in range(10, tokens.shape[1]):
        out = model(tokens[:, j : j + 1], cache=cache)
        steps.append(out.logits)
    close(torch.cat(steps, 1), ours, "cached decoding", tol)
    # The same with left padding: row 1 of [20, 14 + 6 pads] tokens.
    batch = torch.stack([tokens[0, :20], torch.cat([torch.zeros(6, dtype=torch.long), tokens[1, :14]])])
    bmask = torch.ones_like(batch)
    bmask[1, :6] = 0
    out = model(batch[:, :16], attention_mask=bmask[:, :16], use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    got = [out.logits[1, 6:]]
    for j in range(16, 20):
        out = model(batch[:, j : j + 1], attention_mask=bmask[:, : j + 1], cache=cache)
        got.append(out.logits[1])
    close(torch.cat(got, 0), model(tokens[1:2, :14]).logits[0], "cached decoding, left-padded row", tol)
    # A mask for the new tokens alone (not the cached ones too) is refused by name.
    try:
        model(batch[:, 19:20], attention_mask=bmask[:, 19:20], cache=cache)
        sys.exit("a mask without the cached tokens was accepted")
    except ValueError as e:
        assert "cached and the new tokens" in str(e), e
    # generate(): greedy with and without the cache, one prompt and a left-padded batch.
    g = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    one = model.generate(tokens[1:2, :14], use_cache=True, **g)
    assert torch.equal(one, model.generate(tokens[1:2, :14], use_cache=False, **g)), "generate: cache changes the tokens"
    both = model.generate(batch, attention_mask=bmask, use_cache=True, **g)
    assert torch.equal(both[1, 6:], one[0]), f"generate: left-padded row {both[1, 6:].tolist()} vs alone {one[0].tolist()}"
    print("generate: greedy tokens equal with and without the cache, batched (left-padded) and alone")
    # A static cache: prefill 10 tokens, then one per call; its buffers hold
    # the n_k key and n_v value heads at their own widths.
    c = model.config
    static = StaticCache(config=c, max_cache_len=32)
    out = model(tokens[:, :10], cache=static, use_cache=True)
    steps = [out.logits]
    for j in range(10, tokens.shape[1]):
        steps.append(model(tokens[:, j : j + 1], cache=static).logits)
    close(torch.cat(steps, 1), ours, "static-cache decoding", tol)
    layer = static.layers[0]
    assert layer.keys.shape == (3, c.num_k_heads, 32, c.dot_dim), layer.keys.shape
    assert layer.values.shape == (3, c.num_v_heads, 32, c.v_head_dim), layer.values.shape
    assert int(static.get_seq_length()) == tokens.shape[1], static.get_seq_length()
    # The left-padded row through a static cache, with 2-D masks.
    static = StaticCache(config=c, max_cache_len=24)
    out = model(batch[:, :16], attention_mask=bmask[:, :16], cache=static, use_cache=True)
    got = [out.logits[1, 6:]]
    for j in range(16, 20):
        got.append(model(batch[:, j : j + 1], attention_mask=bmask[:, : j + 1], cache=static).logits[1])
    close(torch.cat(got, 0), model(tokens[1:2, :14]).logits[0], "static-cache decoding, left-padded row", tol)
    # Too many tokens for the static cache: refused by name.
    try:
        model(batch[:, :5], cache=static)
        sys.exit("a static cache overflow was accepted")
    except ValueError as e:
        assert "static cache holds 24 tokens" in str(e), e
    # generate() with a static cache: the dynamic cache's greedy tokens. (The
    # export's config says use_cache=false, so generate() is asked for a cache;
    # the cache it used is checked to be static, else generate() would have
    # quietly decoded without one.)
    def generate(ids, static, **kw):
        """Greedy tokens and the logits of every step, with a static or a dynamic cache."""
        if static:
            kw["cache_implementation"] = "static"
        out = model.generate(
            ids, use_cache=True, return_dict_in_generate=True, output_logits=True, **g, **kw
        )
        cache = out["cache"] if "cache" in out else out.get("past_key_values")
        want = StaticCache if static else DynamicCache
        assert isinstance(cache, want), f"generate used {type(cache).__name__}, not a {want.__name__}"
        if static:
            assert cache.layers[0].values.shape[1] == c.num_v_heads, cache.layers[0].values.shape
        return out.sequences, torch.stack(out.logits, 1)

    d_one, d_one_logits = generate(tokens[1:2, :14], False)
    d_both, d_both_logits = generate(batch, False, attention_mask=bmask)
    assert torch.equal(d_one, one) and torch.equal(d_both, both)
    s_one, s_logits = generate(tokens[1:2, :14], True)
    assert torch.equal(s_one, one), f"generate, static cache: {s_one.tolist()} vs dynamic {one.tolist()}"
    close(s_logits, d_one_logits, "generate, static vs dynamic cache: logits of every step", tol)
    s_both, s_logits = generate(batch, True, attention_mask=bmask)
    assert torch.equal(s_both, both), f"generate, static cache, left-padded: {s_both.tolist()} vs {both.tolist()}"
    close(s_logits, d_both_logits, "generate, static vs dynamic cache, left-padded batch: logits", tol)
    # The same with the decoding forward compiled as one graph (what
    # transformers does on a GPU, there with inductor and CUDA graphs).
    cc = CompileConfig(fullgraph=True, backend="eager", mode=None)
    cc._compile_all_devices = True
    s_comp, s_logits = generate(batch, True, attention_mask=bmask, compile_config=cc)
    assert getattr(model, "_compiled_call", None) is not None, "generate did not compile the forward"
    assert torch.equal(s_comp, both), f"generate, static cache, compiled: {s_comp.tolist()} vs {both.tolist()}"
    close(s_logits, d_both_logits, "generate, static cache compiled vs dynamic, left-padded batch: logits", tol)
    print("generate: greedy tokens equal with the static and the dynamic cache, batched (left-padded) and alone, also compiled")
sys.exit(0 if diff <= tol else 1)
