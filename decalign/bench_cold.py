"""`decalign bench-cold`: CoLD's cost against greedy decoding with the same adapter, side by side.

Latency: every variant decodes the same prompts through `generate` (the real code path). A run of
exactly N new tokens (EOS suppressed) and a run of 1 token are timed; decode ms per token is
(T_N - T_1) / (N - 1) per step of the whole batch, and prefill is T_1. Variants alternate inside
each repeat, after a warm-up, and every cell is a median. Tokens per answer are measured apart, on
free-running answers (EOS allowed), so length effects and per-token cost are not mixed up.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .api import generate
from .bench_engine import PROMPTS as BENCH_PROMPTS
from .engine import Engine
from .models import resolve_model_path

PROMPTS = BENCH_PROMPTS + [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]


def random_adapter(model: str | None, out: Path, rank: int = 8, scale: float = 0.02, seed: int = 0) -> Path:
    """A random-init LoRA on every linear layer (B ~ N(0, scale)): enough to time, not to use."""
    from peft import LoraConfig, get_peft_model  # local: peft costs ~2 s and only this helper needs it here

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model))
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    peft_model.save_pretrained(str(out))
    return out


def run_latency(model: str | None = None, adapter: str | None = None, batch_sizes=(1, 8), new_tokens: int = 32,
                repeats: int = 5, threads: int | None = None, alpha: float = 0.1, beta: float = 0.5,
                routes: bool = True, free_tokens: int = 128) -> str:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch:
        adapter_note = adapter or "random LoRA r=8 on all linear layers"
        if adapter is None:
            adapter = str(random_adapter(model, Path(scratch) / "adapter"))
        engine = Engine.load(model, adapter)
    variants = {"greedy + adapter": dict(method="greedy"), "cold": dict(method="cold", alpha=alpha, beta=beta)}
    if routes:
        variants["cold (PEFT adapter_names route)"] = dict(method="cold", alpha=alpha, beta=beta, _route="peft")

    def call(spec: dict, prompts: list[str], tokens: int, fixed: bool) -> tuple[float, list]:
        spec = dict(spec)
        engine.lora_gate.ok = False if spec.pop("_route", None) == "peft" else None
        start = time.perf_counter()
        results = generate(prompts, model=engine, max_new_tokens=tokens, min_new_tokens=tokens if fixed else 0,
                           seed=0, batch_size=len(prompts), **spec)
        engine.lora_gate.ok = None
        return time.perf_counter() - start, results

    lines = [f"CoLD vs greedy with the same adapter · model {engine.name} · adapter: {adapter_note} · "
             f"alpha {alpha} beta {beta} · {new_tokens} new tokens · median of {repeats} · free answers "
             f"capped at {free_tokens} tokens · torch "
             f"{torch.__version__} · {torch.get_num_threads()} threads · "
             f"{platform.processor() or platform.machine()}",
             "",
             "| batch | variant | prefill ms | decode ms / step | ratio to greedy | tokens / answer (free) |",
             "|---|---|---|---|---|---|"]
    for size in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        for spec in variants.values():  # warm-up
            call(spec, prompts, 2, True)
        full: dict[str, list[float]] = {name: [] for name in variants}
        one: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, spec in variants.items():
                full[name].append(call(spec, prompts, new_tokens, True)[0])
                one[name].append(call(spec, prompts, 1, True)[0])
        lengths = {name: statistics.mean(len(r.tokens) for r in call(spec, prompts, free_tokens, False)[1])
                   for name, spec in variants.items()}
        decode = {name: (statistics.median(full[name]) - statistics.median(one[name])) / (new_tokens - 1) * 1000
                  for name in variants}
        base = decode["greedy + adapter"]
        for name in variants:
            lines.append(f"| {size} | {name} | {statistics.median(one[name]) * 1000:.0f} | {decode[name]:.1f} | "
                         f"{decode[name] / base:.2f} | {lengths[name]:.1f} |")
    return "\n".join(lines)
