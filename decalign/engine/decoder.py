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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
        return self.run([Part(input_ids, mask, positions, cache, tuple(layers))])[0]

    def run(self, parts: Sequence["Part"]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Several batches' new tokens in one pass: each part has its own rows, cache and mask, and
        they share every weight read (the linear layers run over all parts' tokens at once; only
        attention is per part). How a running batch's decode step and the prompts joining it are
        computed together. One (logits, states) per part, as `__call__` returns them."""
        shapes = [tuple(part.input_ids.shape) for part in parts]
        counts = [rows * new for rows, new in shapes]
        if len(parts) == 1:  # rows x new x width: a LoRA row gate (rows x 1 x 1) broadcasts over it
            hidden = self.inner.embed_tokens(parts[0].input_ids)
        else:  # every token on one axis (1 x tokens x width): a LoRA gate is then one factor per token
            hidden = self.inner.embed_tokens(torch.cat([part.input_ids.reshape(-1) for part in parts]))[None]
        rotations, biases = [], []
        for part, (rows, new) in zip(parts, shapes):
            cos, sin = self.inner.rotary_emb(hidden, part.positions)
            rotations.append((cos[:, None], sin[:, None]))  # broadcast over heads
            biases.append(attention_bias(part.mask, new, hidden.dtype))
        wanted = {layer for part in parts for layer in part.layers}
        last = len(self.layers)
        kept = {0: hidden} if 0 in wanted else {}
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(layer.input_layernorm, hidden)
            projected = [flat(attn.q_proj(x)).split(counts), flat(attn.k_proj(x)).split(counts),
                         flat(attn.v_proj(x)).split(counts)]
            outs = []
            for i, (part, (rows, new), (cos, sin)) in enumerate(zip(parts, shapes, rotations)):
                query, key, value = (t[i].view(rows, new, -1, attn.head_dim).transpose(1, 2) for t in projected)
                key, value = grouped_heads(*part.cache.layers[index].update(rotate(key, cos, sin), value),
                                           query.shape[1])
                out = F.scaled_dot_product_attention(rotate(query, cos, sin), key, value, attn_mask=biases[i],
                                                     scale=attn.scaling, enable_gqa=key.shape[1] != query.shape[1])
                outs.append(out.transpose(1, 2).reshape(rows * new, -1))
            joined = outs[0] if len(outs) == 1 else torch.cat(outs)
            hidden = hidden + attn.o_proj(joined.view(*hidden.shape[:2], -1))
            x = rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            if index + 1 in wanted and index + 1 < last:
                kept[index + 1] = hidden
        # each row's last position (rows are right-aligned: a row's newest token is its part's last column)
        ends = torch.cat([start + torch.arange(1, rows + 1, device=hidden.device) * new - 1
                          for start, (rows, new) in zip(accumulate([0] + counts[:-1]), shapes)])
        if last in wanted:
            hidden = kept[last] = rms_norm(self.inner.norm, hidden)
            ends_hidden = flat(hidden)[ends]
        else:
            ends_hidden = rms_norm(self.inner.norm, flat(hidden)[ends])
        logits = self.model.lm_head(ends_hidden).split([rows for rows, _ in shapes])
        out = []
        for i, (part, (rows, new), start) in enumerate(zip(parts, shapes, accumulate([0] + counts[:-1]))):
            states = None
            if part.layers:
                states = torch.cat([flat(kept[layer])[start:start + rows * new] for layer in part.layers], dim=-1)
                states = states.view(rows, new, -1)
            out.append((logits[i], states))
        return out


@dataclass(frozen=True)
class Part:
    """One batch's share of a `Decoder.run` pass: its new tokens (rows x new), attention mask over
    its cache and the new tokens, position ids (rows x new), cache, and the layers whose states it wants."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object
    layers: tuple[int, ...] = ()


# every attention kernel but cuDNN's (see planless_attention)
PLANLESS_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def planless_attention() -> AbstractContextManager:
    """The engine's forward passes run inside this: attention by kernels that take any shape as it
    comes. PyTorch's CUDA 13 builds try cuDNN's attention first on Hopper and Blackwell GPUs, and cuDNN
    builds (then caches) an execution graph per shape of query, keys and mask. A decode step's keys are
    one position wider than the last step's, so nearly every step met a shape never seen and paid a
    build: on one H100 a 0.45B model's sampled step cost 77-145 ms the first time its shapes came and
    20-25 ms when the same shapes came again, as a build per shape would. Flash and memory-efficient
    attention need no plan. On a CPU nothing changes (its kernels are flash and math, both allowed).
    `DECALIGN_CUDNN_ATTENTION=1` lets PyTorch choose as it would (for side-by-side timings)."""
    if os.environ.get("DECALIGN_CUDNN_ATTENTION") == "1":
        return nullcontext()
    return sdpa_kernel(list(PLANLESS_KERNELS))


def grouped_heads(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values for `heads` query heads. On a GPU, grouped-query keys are repeated to one head
    per query head, as transformers does under a mask: memory-efficient attention, the planless kernel
    that takes a mask, took equal head counts only until mid-2026 (PyTorch 2.11, on our GPU machine,
    among them), and the math kernel it would fall to holds a prompt's whole score matrix. On a CPU the
    kernels share the heads themselves."""
    if key.device.type == "cpu" or key.shape[1] == heads:
        return key, value
    groups = heads // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's positions on one axis (a view): tokens x features."""
    return tensor.reshape(-1, tensor.shape[-1])


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

