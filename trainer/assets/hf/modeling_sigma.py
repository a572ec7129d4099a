"""SIGMA for Hugging Face transformers, as trained by sigma.

DiffQKV attention: query head i reads key head i // (n_q / n_k) and value
head i // (n_q / n_v) (contiguous groups). AugQ (aug_q_dim > 0) passes the
whole projected query through down(silu(gate(q0)) * up(q0)) before the head
split and RoPE. K compression: "projected" computes K at k_dim and maps it to
qk_head_dim with one matrix shared by the key heads (before RoPE); "native"
makes the q.k product itself k_dim wide. RMSNorm, SwiGLU, RoPE rotating the
two halves of each head. Parameter names are sigma's own, so the exported
weights load without a mapping.

Generation uses transformers' cache (a `DynamicCache`): each layer keeps
its n_k key heads after RoPE (at the q.k width; under the "projected"
reading that is after the up-projection) and its n_v value heads, so
decoding reads the cache instead of recomputing the prefix. Left padding
(batched prompts of different lengths) is handled through the attention
mask: padded positions are never attended to and positions count real
tokens only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output field of the cache: `cache` since transformers 5.2x, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

try:
    from .configuration_sigma import SigmaConfig
except ImportError:  # loaded as a plain module
    from configuration_sigma import SigmaConfig


class SigmaRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope(x, theta, pos):
    """RoPE on [b, heads, t, dim] at positions `pos` [b, t]: angles
    pos * theta^(-2j/dim) on the pairs (j, j + dim/2)."""
    dim = x.shape[3]
    inv = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim * -math.log(theta)
    )
    ang = pos.to(torch.float64)[:, None, :, None] * inv
    cos = ang.cos().to(device=x.device, dtype=x.dtype)
    sin = ang.sin().to(device=x.device, dtype=x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SigmaAugQ(nn.Module):
    def __init__(self, width, aug):
        super().__init__()
        self.gate = nn.Linear(width, aug, bias=False)
        self.up = nn.Linear(width, aug, bias=False)
        self.down = nn.Linear(aug, width, bias=False)

    def forward(self, q0):
        return self.down(F.silu(self.gate(q0)) * self.up(q0))


class SigmaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        dd = c.dot_dim
        self.q_proj = nn.Linear(c.d_model, c.num_q_heads * dd, bias=False)
        if c.aug_q_dim > 0:
            self.aug_q = SigmaAugQ(c.num_q_heads * dd, c.aug_q_dim)
        self.k_proj = nn.Linear(c.d_model, c.num_k_heads * c.k_cache_dim, bias=False)
        if c.k_compression == "projected":
            self.k_up = nn.Linear(c.k_cache_dim, dd, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.num_v_heads * c.v_head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_q_heads * c.v_head_dim, c.d_model, bias=False)

    def forward(self, h, pos, mask, cache, layer):
        """`pos` [b, t]: positions of the new tokens; `mask`: None (plain causal
        attention over `h` alone) or a boolean [b, 1, t, past + t] of the
        allowed (query, key) pairs; `cache`: None or a transformers cache that
        keeps this layer's K and V."""
        c = self.c
        b, t, _ = h.shape
        dd = c.dot_dim
        q = self.q_proj(h)
        if c.aug_q_dim > 0:
            q = self.aug_q(q)
        q = rope(q.view(b, t, c.num_q_heads, dd).transpose(1, 2), c.rope_theta, pos)
        k = self.k_proj(h).view(b, t, c.num_k_heads, c.k_cache_dim)
        if c.k_compression == "projected":
            k = self.k_up(k)
        k = rope(k.transpose(1, 2), c.rope_theta, pos)
        v = self.v_proj(h).view(b, t, c.num_v_heads, c.v_head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        # Query head i reads K head i // (nq / nk) and V head i // (nq / nv).
        k = k.repeat_interleave(c.num_q_heads // c.num_k_heads, dim=1)
        v = v.repeat_interleave(c.num_q_heads // c.num_v_heads, dim=1)
        scale = 1.0 / math.sqrt(dd)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, c.num_q_heads * c.v_head_dim))


class SigmaFFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.d_model, bias=False)

    def forward(self, h):
        return self.down(F.silu(self.gate(h)) * self.up(h))


class SigmaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn_norm = SigmaRMSNorm(c.d_model, c.norm_eps)
        self.attn = SigmaAttention(c)
        self.ffn_norm = SigmaRMSNorm(c.d_model, c.norm_eps)
        self.ffn = SigmaFFN(c)

    def forward(self, x, pos, mask, cache, layer):
        x = x + self.attn(self.attn_norm(x), pos, mask, cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class SigmaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SigmaConfig
    base_model_prefix = ""
    _no_split_modules = ["SigmaBlock"]
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([SigmaBlock(config) for _ in range(config.num_layers)])
        self.final_norm = SigmaRMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.init_std)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        cache=None,
        use_cache=None,
        position_ids=None,
        **kwargs,
    ):
        """Causal forward of `input_ids` [b, t] after the tokens already in the
        cache (transformers >= 5.x passes it as `cache`, earlier 5.x releases
        as `past_key_values`; a new one is made when `use_cache` is true).
        `attention_mask` [b, past + t] marks real tokens (1) and padding (0):
        padding is never attended to and positions count real tokens only, so
        a left-padded prompt gives its real tokens the logits it gets alone."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is None and use_cache:
            cache = DynamicCache()
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(
                f"SigmaForCausalLM: attention_mask has shape {tuple(attention_mask.shape)}; it covers "
                f"the cached and the new tokens, ({b}, {past + t}) here"
            )
        padded = attention_mask is not None and bool((attention_mask == 0).any())
        if position_ids is None:
            if padded:
                real = attention_mask.to(torch.int64)
                position_ids = (real.cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        mask = None
        if padded or past > 0:
            # Query i (absolute index past + i) sees keys j <= past + i that are real tokens.
            keys = torch.arange(past + t, device=input_ids.device)
            mask = keys[None, :] <= (past + torch.arange(t, device=input_ids.device))[:, None]
            mask = mask[None, None].expand(b, 1, t, past + t)
            if padded:
                real = attention_mask[:, None, None, :].to(torch.bool)
                # A padding query sees itself, so no row is empty (its output is unused).
                own = keys[None, :] == (past + torch.arange(t, device=input_ids.device))[:, None]
                mask = (mask & real) | own
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, position_ids, mask, cache, i)
        logits = self.lm_head(self.final_norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
