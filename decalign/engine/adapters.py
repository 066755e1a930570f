"""What the engine does to the model itself: PEFT adapter names, per-row LoRA gating, the CPU head.

- `loaded_adapters`: the PEFT adapters on a model; `BASE` names "no adapter" in a mixed batch.
- `LoraRowGate`: runs rows of one plain LoRA adapter and rows of the base model in one forward pass
  by scaling each row's LoRA output by 0 or 1 (PEFT's own `adapter_names` route is the fallback).
- `use_transposed_head`: computes a plain Linear output layer as (W @ h^T)^T, faster on CPU.

peft is imported only inside `LoraRowGate.find_modules`, the first time a mixed batch needs it:
importing it costs about 2-3 s on top of torch and transformers, and most runs load no adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def loaded_adapters(model) -> list[str]:
    """Names of the PEFT adapters loaded on the model ("default" for --adapter); [] without any."""
    return list(getattr(model, "peft_config", None) or [])


class LoraRowGate:
    """A 0/1 factor per row folded into every LoRA module's scale of one model.

    `ok`: None until checked, then whether the model is a case the gate handles (set it to False to
    force PEFT's `adapter_names` route). `modules`: (a LoRA module's scaling dict, adapter, its scale)."""

    def __init__(self, model, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.ok: bool | None = None
        self.modules: list[tuple[dict, str, float]] = []

    def row_gate(self, adapters: list[str]) -> torch.Tensor | None:
        """The fast path for mixed rows of one plain LoRA adapter and "__base__": a 0/1 factor per
        row folded into every LoRA module's scale (PEFT computes base(x) + B(A(x)) * scale, and a
        [rows, 1, 1] scale broadcasts), so one forward gives adapter rows exactly the adapted
        model's values (x1) and base rows exactly the base model's (+ 0), with no hook or gather.
        PEFT's own `adapter_names` route registers hooks and gathers sub-batches on every call.
        None when the model is not such a case (PEFT's route is used)."""
        if self.ok is None and len(loaded_adapters(self.model)) == 1:
            self.ok = self.find_modules()
        names = set(adapters) - {BASE}
        if not self.ok or len(names) != 1 or names != set(loaded_adapters(self.model)):
            return None
        return torch.tensor([a != BASE for a in adapters], dtype=torch.float32, device=self.device)[:, None, None]

    def find_modules(self) -> bool:
        """Whether the one loaded adapter is a plain LoRA the gate handles; if so, record its modules."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        (name,) = loaded_adapters(self.model)  # called only with exactly one adapter loaded
        config = self.model.peft_config[name]
        if getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False) \
                or getattr(config, "modules_to_save", None) or getattr(config, "bias", "none") != "none" \
                or getattr(config, "trainable_token_indices", None):
            return False
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if not layers or any(type(m) is not LoraLinear or m.merged or name in m.lora_variant for m in layers):
            return False
        self.modules = [(layer.scaling, name, layer.scaling[name]) for layer in layers if name in layer.lora_B]
        return True

    @contextmanager
    def gated(self, gate: torch.Tensor | None) -> Iterator[None]:
        """Within the block, each row's LoRA output is scaled by its gate (see row_gate)."""
        if gate is None:
            yield
            return
        for scaling, name, scale in self.modules:
            scaling[name] = gate * scale
        try:
            yield
        finally:
            for scaling, name, scale in self.modules:
                scaling[name] = scale


def _transposed_linear(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = (self.weight @ flat.T).T
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*hidden.shape[:-1], out.shape[-1])


def use_transposed_head(model) -> None:
    """Compute the output layer as (W @ h^T)^T on CPU. A decode step feeds it a few rows, and torch's
    CPU matmul is 2-4x slower for [rows, d] x [d, vocab] than for [vocab, d] x [d, rows] at 2-8 rows
    (measured with torch 2.13: 19 vs 9 ms for 2 rows of SmolLM2's 49152 x 576 head on one thread,
    40 vs 9 ms on two); the head is then the largest single cost of a step. Same weights (ties
    kept), same numbers up to float rounding. Only plain Linear heads are changed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear:
        head.forward = _transposed_linear.__get__(head)
