"""A decoder forward for Llama-family models without transformers' per-call machinery.

transformers' forward wraps every layer and attention call in generic code (keyword merging,
deprecation checks, output capture hooks, an attention dispatch table, a mask builder): on the
embedded 135M model that is about a third of a one-row decode step on the CPU, and on a GPU, where
the arithmetic of a small model's step takes well under a millisecond, most of a step. `Decoder`
runs the same modules (so LoRA-wrapped and packed linear layers, and the model's own rotary
embedding with its scaling, are used as they are) in a plain loop over the layers, writing the
engine's cache layers (`cache.RowLayer`) directly. Its logits and hidden states equal transformers'
(the engine's tests compare both, with and without padding, subset steps and adapters).

Only architectures whose forward it reproduces are run this way (`Decoder.build` says None
otherwise, and the engine keeps transformers' forward); `DECALIGN_LEAN_DECODER=0` turns it off.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

# the causal LMs whose forward is: embed; per layer x += attn(rms(x)); x += mlp(rms(x)); rms; head
# (Llama's; Qwen2 adds biases inside its linear layers, Mistral a sliding window we refuse below)
ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})


class Decoder:
    """`decoder(input_ids, mask, positions, cache, layers)` -> (last-position logits, states of
    `layers` at every new position concatenated on the feature axis, or None), as the engine's
    forward pass reads them from transformers' output (layer 0 = embeddings, N = the normed output)."""

    def __init__(self, model) -> None:
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)

    @classmethod
    def build(cls, model) -> "Decoder | None":
        """A decoder for `model` (a PEFT model's base is used), or None where it would not be exact."""
        if os.environ.get("DECALIGN_LEAN_DECODER", "1") == "0":
            return None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        if type(base).__name__ not in ARCHITECTURES or getattr(config, "hidden_act", None) != "silu":
            return None
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return None
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return None
        if getattr(config, "pretraining_tp", 1) != 1:
            return None
        for layer in base.model.layers:
            attn = layer.self_attn
            if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                return None
            if hasattr(attn, "q_norm") or type(layer.mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                return None
        return cls(base)

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 layers: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, new = input_ids.shape
        hidden = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        bias = attention_bias(mask, new, hidden.dtype)
        last = len(self.layers)
        kept = {0: hidden} if 0 in layers else {}
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(layer.input_layernorm, hidden)
            shape = (rows, new, -1, attn.head_dim)
            query = rotate(attn.q_proj(x).view(shape).transpose(1, 2), cos, sin)
            key = rotate(attn.k_proj(x).view(shape).transpose(1, 2), cos, sin)
            value = attn.v_proj(x).view(shape).transpose(1, 2)
            key, value = cache.layers[index].update(key, value)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scaling,
                                                 enable_gqa=key.shape[1] != query.shape[1])
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(rows, new, -1))
            x = rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            if index + 1 in layers and index + 1 < last:
                kept[index + 1] = hidden
        if last in layers:
            hidden = kept[last] = rms_norm(self.inner.norm, hidden)
        else:
            hidden = rms_norm(self.inner.norm, hidden[:, -1:])
        logits = self.model.lm_head(hidden[:, -1])
        states = torch.cat([kept[layer] for layer in layers], dim=-1) if layers else None
        return logits, states


def attention_bias(mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (rows x 1 x new x width): 0 where a new position may read a key (the
    key is unmasked and not after it), the dtype's lowest value elsewhere (a finite value, so a
    padding position that may read nothing gets finite nonsense, as in transformers, never NaN)."""
    allowed = mask[:, None, None, :].bool()
    if new > 1:
        width = mask.shape[1]
        allowed = allowed & torch.ones((new, width), dtype=torch.bool, device=mask.device).tril(width - new)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm: in float32 as one fused call (same numbers); in other dtypes the module
    itself, whose casts set the rounding."""
    if hidden.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(hidden)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the halves convention of Llama's `rotate_half`)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

