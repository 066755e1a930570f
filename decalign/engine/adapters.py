"""What the engine does to the model itself: PEFT adapter names, per-row LoRA gating, the CPU head.

- `loaded_adapters`: the PEFT adapters on a model; `BASE` names "no adapter" in a mixed batch.
- `LoraRowGate`: runs rows of several plain LoRA adapters and rows of the base model in one forward
  pass by scaling each row's output of each adapter by 0 or 1 (PEFT's own `adapter_names` route is
  the fallback).
- `use_packed_linears`: on CPU, runs float32 Linear layers through oneDNN with packed weights
  (a decode step's few rows cost what one row costs).
- `use_lean_lora`: PEFT's LoRA Linear forward without its per-call Python (inference only).

peft is imported only inside `LoraRowGate.find_modules`, the first time a mixed batch needs it:
importing it costs about 2-3 s on top of torch and transformers, and most runs load no adapter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def loaded_adapters(model) -> list[str]:
    """Names of the PEFT adapters loaded on the model ("default" for --adapter); [] without any."""
    return list(getattr(model, "peft_config", None) or [])


class LoraRowGate:
    """A 0/1 factor per row folded into every LoRA module's scale, for each plain LoRA adapter loaded.

    `ok`: None until checked (again whenever the loaded adapters change), then whether the model is
    a case the gate handles (set it to False to force PEFT's `adapter_names` route). `modules`: (a
    LoRA module's scaling dict, adapter, its scale); `layers`: the LoRA modules."""

    def __init__(self, model, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.ok: bool | None = None
        self.checked: tuple[str, ...] | None = None  # the adapters `ok` was found for
        self.modules: list[tuple[dict, str, float]] = []
        self.layers: list = []

    def row_gate(self, adapters: list[str]) -> dict[str, torch.Tensor] | None:
        """The fast path for rows of plain LoRA adapters and "__base__": for each adapter the rows
        name, a 0/1 factor per row (1 on its own rows) folded into its LoRA modules' scales. PEFT
        computes base(x) + B(A(x)) * scale for each active adapter, and a [rows, 1, 1] scale
        broadcasts: with every named adapter active and gated, one forward gives each row exactly
        its own adapter's values (the others add 0) and base rows exactly the base model's, with no
        hook or gather. PEFT's own `adapter_names` route registers hooks and gathers sub-batches on
        every call. None when the model is not such a case (PEFT's route is used)."""
        loaded = tuple(loaded_adapters(self.model))
        names = sorted(set(adapters) - {BASE})
        if not loaded:  # every row is the base model's: nothing to gate
            return {} if not names else None
        if self.ok is None or self.checked not in (None, loaded):
            self.ok, self.checked = self.find_modules(), loaded
        if not self.ok or not set(names) <= set(loaded):
            return None
        return {name: torch.tensor([a == name for a in adapters], dtype=torch.float32, device=self.device)[:, None, None]
                for name in names}

    def find_modules(self) -> bool:
        """Whether every loaded adapter is a plain LoRA the gate handles; if so, record their modules."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        names = loaded_adapters(self.model)
        for name in names:
            config = self.model.peft_config[name]
            if getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False) \
                    or getattr(config, "modules_to_save", None) or getattr(config, "bias", "none") != "none" \
                    or getattr(config, "trainable_token_indices", None):
                return False
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if not layers or any(type(m) is not LoraLinear or m.merged or any(n in m.lora_variant for n in names)
                             for m in layers):
            return False
        self.layers = layers
        self.modules = [(layer.scaling, name, layer.scaling[name]) for layer in layers for name in names
                        if name in layer.lora_B]
        return True

    def route(self, adapters: list[str]) -> tuple[AbstractContextManager, dict]:
        """How to run a forward pass whose rows use `adapters`: (a context to run it in, extra forward
        arguments). Rows of plain LoRA adapters and "__base__": the row gate; anything else: PEFT's
        `adapter_names`."""
        gates = self.row_gate(adapters)
        if gates is None:
            return nullcontext(), {"adapter_names": adapters}
        return self.gated(gates), {}

    @contextmanager
    def gated(self, gates: dict[str, torch.Tensor] | None, shape: tuple[int, ...] = (-1, 1, 1)) -> Iterator[None]:
        """Within the block, the adapters of `gates` are the active ones in every LoRA module, each
        row's (or token's: `shape`) output of each scaled by its gate (see row_gate); without any,
        the modules run the base model."""
        if gates is None:
            yield
            return
        scaled: dict[tuple[str, float], torch.Tensor] = {}  # modules share a few scales: one product each
        active = sorted(gates)
        saved = [(layer, layer._active_adapter) for layer in self.layers]
        for scaling, name, scale in self.modules:
            if name in gates:
                if (name, scale) not in scaled:
                    scaled[name, scale] = gates[name].view(shape) * scale
                scaling[name] = scaled[name, scale]
        for layer in self.layers:
            layer._active_adapter = active
        try:
            yield
        finally:
            for layer, was in saved:
                layer._active_adapter = was
            for scaling, name, scale in self.modules:
                scaling[name] = scale


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward for inference with plain LoRA adapters: base(x) + B(A(x)) * scale
    for each active adapter, the same operations in the same order (so the same numbers), without
    its per-call checks and module calls (one module call, one row, this CPU: 66 against 80 us, about
    3 ms of a decode step over SmolLM2's 210 modules; GPU steps are bound by such Python). PEFT keeps a
    bfloat16 model's adapter weights in float32 and casts the input to them: so does this. Anything
    else (training, gradients, adapter_names, merged or disabled adapters, DoRA and other variants,
    input casting switched off) takes PEFT's own forward."""
    active = [self.active_adapter] if isinstance(self.active_adapter, str) else self.active_adapter
    if args or kwargs or self.training or torch.is_grad_enabled() or self.disable_adapters or self.merged \
            or any(name in self.lora_variant for name in active):
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, lora_B = self._modules["lora_A"], self._modules["lora_B"]
    result = self.base_layer(x)
    result_dtype = result.dtype
    for name in active:
        if name not in lora_A:
            continue
        down, up = lora_A[name].weight, lora_B[name].weight
        if x.dtype != down.dtype:  # PEFT keeps adapter weights in float32 under a bfloat16 model: cast as it does
            if up.dtype != down.dtype or not getattr(self, "cast_input_dtype_enabled", True):
                return type(self).forward(self, x)
            x = x.to(down.dtype)
        result = result + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * self.scaling[name]
    return result.to(result_dtype)


def use_lean_lora(model) -> int:
    """Give every PEFT LoRA Linear of `model` the lean inference forward above; returns how many.
    Adapters loaded later into the same modules are covered; newly wrapped modules keep PEFT's."""
    if not loaded_adapters(model):
        return 0
    from peft.tuners.lora.layer import Linear as LoraLinear  # peft is loaded already: the model has adapters

    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for layer in layers:
        layer.forward = _lean_lora_forward.__get__(layer)
    return len(layers)


PACK_MIN_WEIGHTS = 1 << 18  # smaller layers (LoRA's A and B, narrow K/V projections) stay faster in torch


def _packed_linear(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if hidden.numel() == hidden.shape[-1] or hidden.dtype != torch.float32 \
            or (torch.is_grad_enabled() and (weight.requires_grad or hidden.requires_grad)):
        return torch.nn.functional.linear(hidden, weight, self.bias)  # one row, autograd, other dtypes
    if self.packed_version != weight._version:  # the weight was written in place: pack it again
        self.packed_weight, self.packed_version = torch.ops.mkldnn._reorder_linear_weight(weight), weight._version
    rows = hidden.numel() // hidden.shape[-1]
    padded = packed_rows(rows)
    if padded == rows:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed_weight, self.bias, "none", [], "")
    flat = torch.cat([hidden.reshape(rows, -1), hidden.new_zeros(padded - rows, hidden.shape[-1])])
    out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
    return out[:rows].reshape(*hidden.shape[:-1], out.shape[-1])


def packed_rows(rows: int) -> int:
    """The row count a packed layer computes for `rows`: itself up to 16, above that rounded up to
    one of 8 steps per doubling (at most 12.5% more rows). oneDNN compiles and keeps a kernel per
    shape it meets, about 0.7 MB each here, and a server meets a new row count at almost every
    join and every finished row, a batch job a new one at every prompt width: unrounded, 66 row
    counts grew a process by 178 MB, and its caches hold 1,024 kernels each before they evict."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def use_packed_linears(model, min_weights: int = PACK_MIN_WEIGHTS) -> int:
    """Run the large float32 Linear layers of a CPU model through oneDNN with their weights packed
    once, whenever a call has two rows or more.

    torch's CPU matmul (MKL here) handles the few rows of a decode step badly: on this machine's
    AMD EPYC, one thread, a 576x1536 layer costs 70 us for one row and 138 us for two, where oneDNN's
    packed kernel costs 67 and 71 us (155 against 247 at eight rows); SmolLM2's 49152-wide output
    layer 25 ms against 10 ms at two rows; prefill (hundreds of rows) is about 20% faster too. Two
    rows costing what one costs is what makes CoLD's second row and a search method's few rows per
    prompt cheap. oneDNN's call costs about 25 us more, so single rows and layers under
    `min_weights` weights stay with torch. Same numbers up to float rounding. The packed copy costs
    the layers' weight memory again; a weight written in place through autograd-visible ops is
    repacked (edits through `.data` are not seen). Returns how many layers were patched: 0 where
    oneDNN is missing or disagrees with torch on a probe."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu" and m.in_features * m.out_features >= min_weights]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    try:
        probe = linears[0]
        packed = torch.ops.mkldnn._reorder_linear_weight(probe.weight.detach())
        x = torch.randn(3, probe.in_features, generator=torch.Generator().manual_seed(0))  # global RNG untouched
        with torch.no_grad():
            same = torch.allclose(torch.ops.mkldnn._linear_pointwise(x, packed, probe.bias, "none", [], ""),
                                  torch.nn.functional.linear(x, probe.weight, probe.bias), rtol=1e-3, atol=1e-3)
    except (AttributeError, RuntimeError):
        return 0
    if not same:
        return 0
    with torch.no_grad():
        for linear in linears:
            linear.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            linear.packed_version = linear.weight._version
            linear.forward = _packed_linear.__get__(linear)
    return len(linears)
