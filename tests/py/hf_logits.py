"""Load a `sigma checkpoint export --format hf` directory with Hugging Face
transformers and compare its logits with sigma's own.

usage: hf_logits.py EXPORT_DIR TOKENS_JSON SIGMA_LOGITS_F32 TOLERANCE
Prints the largest absolute difference; exits 1 above the tolerance."""

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
# Right padding leaves the real positions alone; left padding is refused.
mask = torch.ones_like(tokens)
mask[:, -3:] = 0
with torch.no_grad():
    assert torch.equal(model(tokens, attention_mask=mask).logits, ours)
    mask = mask.flip(-1)
    try:
        model(tokens, attention_mask=mask)
        sys.exit("left padding was accepted")
    except ValueError as e:
        assert "left padding" in str(e)
sys.exit(0 if diff <= tol else 1)
