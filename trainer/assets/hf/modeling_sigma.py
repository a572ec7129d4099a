"""SIGMA for Hugging Face transformers, as trained by sigma.

DiffQKV attention: query head i reads key head i // (n_q / n_k) and value
head i // (n_q / n_v) (contiguous groups). AugQ (aug_q_dim > 0) passes the
whole projected query through down(silu(gate(q0)) * up(q0)) before the head
split and RoPE. K compression: "projected" computes K at k_dim and maps it to
qk_head_dim with one matrix shared by the key heads (before RoPE); "native"
makes the q.k product itself k_dim wide. RMSNorm, SwiGLU, RoPE rotating the
two halves of each head. Parameter names are sigma's own, so the exported
weights load without a mapping.

Generation uses transformers' cache: each layer keeps its n_k key heads
after RoPE (at the q.k width; under the "projected" reading that is after
the up-projection) and its n_v value heads, so decoding reads the cache
instead of recomputing the prefix. Left padding (batched prompts of
different lengths) is handled through the attention mask: padded positions
are never attended to and positions count real tokens only.

Both a `DynamicCache` (the default) and a `StaticCache`
(`generate(..., cache_implementation="static")`, which transformers compiles
on a GPU) work. transformers' `StaticLayer` allocates its value buffer with
the key heads' count (it takes the head count from the keys alone), which
DiffQKV's n_k != n_v breaks; the model turns the cache's `StaticLayer`s into
`SigmaStaticLayer`s, whose key and value buffers each take their own head
count and width. With a static cache every layer attends over the whole
buffer (max_cache_len slots), so a mask always excludes the slots not yet
written; under `generate()` that mask is made outside the compiled forward
(`create_masks_for_generate`) from the cache's length, which stays on the
device.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import StaticLayer
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


class SigmaStaticLayer(StaticLayer):
    """A `StaticLayer` whose key and value buffers each have their own head
    count and width ([batch, n_k, max_cache_len, q.k width] and [batch, n_v,
    max_cache_len, v_head_dim]). transformers' `StaticLayer` gives the value
    buffer the key heads' count, and `Cache.early_initialization` gives both
    buffers one shape; a buffer of the wrong shape is made again at the first
    update (before anything is written to it)."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self._fit(key_states, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized:
            self._fit(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def _fit(self, k, v):
        for name, new in (("keys", k), ("values", v)):
            want = (new.shape[0], new.shape[1], self.max_cache_len, new.shape[3])
            have = getattr(self, name)
            if tuple(have.shape) != want or have.dtype != new.dtype:
                buf = torch.zeros(want, dtype=new.dtype, device=self.device)
                if not torch.compiler.is_compiling():
                    torch._dynamo.mark_static_address(buf)
                setattr(self, name, buf)
        self.batch_size = k.shape[0]
        self.num_heads = k.shape[1]
        self.k_head_dim = k.shape[3]
        self.v_head_dim = v.shape[3]


def _adopt_static_cache(cache):
    """True for a static (compileable) cache, whose plain `StaticLayer`s
    become `SigmaStaticLayer`s (their state kept)."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return False
    for layer in getattr(cache, "layers", []):
        if type(layer) is StaticLayer:
            layer.__class__ = SigmaStaticLayer
    return True


def _attention_mask(padding, past, t, kv_len, device):
    """Boolean [b or 1, 1, t, kv_len] of the allowed (query, key) pairs for `t`
    new tokens after `past` cached ones (an int, or a 0-d tensor on `device`
    for a static cache): query i (absolute index past + i) sees the keys j <=
    past + i, and with `padding` ([b, <= kv_len], 1 for a real token, 0 for
    padding) only the real ones. Slots past the end of `padding` (a static
    cache's unwritten ones) are later than every query, so causality excludes
    them. A padding query sees itself, so no row is empty (its output is
    unused)."""
    keys = torch.arange(kv_len, device=device)
    q = torch.arange(t, device=device) + past
    mask = (keys[None, :] <= q[:, None])[None, None]
    if padding is not None:
        real = padding.to(device=device, dtype=torch.bool)
        if real.shape[-1] < kv_len:
            real = torch.cat([real, real.new_zeros(real.shape[0], kv_len - real.shape[-1])], -1)
        own = keys[None, :] == q[:, None]
        mask = (mask & real[:, None, None, :]) | own[None, None]
    return mask


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
        # Query head i reads K head i // (nq / nk) and V head i // (nq / nv):
        # the smaller of K and V is repeated to the other's head count (the
        # counts divide each other), and SDPA groups the query heads over it.
        nkv = max(c.num_k_heads, c.num_v_heads)
        k = k.repeat_interleave(nkv // c.num_k_heads, dim=1)
        v = v.repeat_interleave(nkv // c.num_v_heads, dim=1)
        gqa = {"enable_gqa": True} if nkv < c.num_q_heads else {}
        scale = 1.0 / math.sqrt(dd)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
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
        logits_to_keep=0,
        **kwargs,
    ):
        """Causal forward of `input_ids` [b, t] after the tokens already in the
        cache (transformers >= 5.x passes it as `cache`, earlier 5.x releases
        as `past_key_values`; a new `DynamicCache` is made when `use_cache` is
        true; a `StaticCache` works too). `attention_mask` [b, past + t] marks
        real tokens (1) and padding (0): padding is never attended to and
        positions count real tokens only, so a left-padded prompt gives its
        real tokens the logits it gets alone. A 4-D boolean `attention_mask`
        [b or 1, 1, t, keys] is taken as it is (what `create_masks_for_generate`
        makes for a static cache; `position_ids` are then required).
        `logits_to_keep` > 0 computes the logits of the last that many
        positions only (generate() asks for 1)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is None and use_cache:
            cache = DynamicCache()
        static = _adopt_static_cache(cache)
        b, t = input_ids.shape
        dev = input_ids.device
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("SigmaForCausalLM: a 4-D attention_mask needs position_ids")
            if attention_mask.dtype != torch.bool or attention_mask.shape[-2] != t:
                raise ValueError(
                    f"SigmaForCausalLM: a 4-D attention_mask is boolean [b, 1, {t}, keys]; got "
                    f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            mask = attention_mask
        else:
            past = cache.get_seq_length() if cache is not None else 0
            past = int(past)
            if attention_mask is not None and attention_mask.shape != (b, past + t):
                raise ValueError(
                    f"SigmaForCausalLM: attention_mask has shape {tuple(attention_mask.shape)}; it covers "
                    f"the cached and the new tokens, ({b}, {past + t}) here"
                )
            if static and past + t > cache.get_max_length():
                raise ValueError(
                    f"SigmaForCausalLM: the static cache holds {cache.get_max_length()} tokens; "
                    f"{past} cached and {t} new ones do not fit"
                )
            padded = attention_mask is not None and bool((attention_mask == 0).any())
            if position_ids is None:
                if padded:
                    real = attention_mask.to(torch.int64)
                    position_ids = (real.cumsum(-1) - 1).clamp(min=0)[:, -t:]
                else:
                    position_ids = torch.arange(past, past + t, device=dev).expand(b, t)
            padding = attention_mask if padded else None
            if static:
                # The keys are the whole buffer: its unwritten slots are masked.
                mask = _attention_mask(padding, past, t, cache.get_max_length(), dev)
            elif padded or past > 0:
                mask = _attention_mask(padding, past, t, past + t, dev)
            else:
                mask = None
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, position_ids, mask, cache, i)
        if logits_to_keep and labels is None:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.final_norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def create_masks_for_generate(
        self, config, inputs_embeds, attention_mask, cache=None, position_ids=None, **kwargs
    ):
        """The mask of a forward under `generate()` with a static cache,
        made before the (compiled) forward: boolean [b or 1, 1, t, max_cache_len]
        from the 2-D padding mask (or none) and the cache's length, which is
        read as a device tensor (no synchronisation, no recompilation). (The
        cache comes as `cache`, or as `past_key_values` before transformers 5.2x.)"""
        if cache is None:
            cache = kwargs.get("past_key_values")
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        t = inputs_embeds.shape[1]
        dev = inputs_embeds.device
        if not _adopt_static_cache(cache):
            past = cache.get_seq_length() if cache is not None else 0
            return _attention_mask(attention_mask, past, t, int(past) + t, dev)
        past = cache.get_seq_length()
        if isinstance(past, torch.Tensor):
            past = past.to(dev)
        return _attention_mask(attention_mask, past, t, cache.get_max_length(), dev)
