"""Load a `sigma checkpoint export --format hf` directory with Hugging Face
transformers and compare its logits with sigma's own.

usage: hf_logits.py EXPORT_DIR TOKENS_JSON SIGMA_LOGITS_F32 TOLERANCE
Prints the largest absolute difference; exits 1 above the tolerance. Also
checks, against the export's own full forward: right and left padding (real
positions within 1e-5), decoding with the KV cache one token at a time
(within TOLERANCE of sigma's logits, also for a left-padded row), and greedy
generate() with and without the cache, alone and in a left-padded batch
(the same tokens)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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
sys.exit(0 if diff <= tol else 1)
