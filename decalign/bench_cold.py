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

import click
import torch

PROMPTS = [
    "How do I bake bread at home?",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in two sentences.",
    "What should I pack for a weekend hike in the mountains?",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]


def random_adapter(model: str | None, out: Path, rank: int = 8, scale: float = 0.02, seed: int = 0) -> Path:
    """A random-init LoRA on every linear layer (B ~ N(0, scale)): enough to time, not to use."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .models import resolve_model_path

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
    from .api import generate
    from .engine import Engine

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
        engine._gate_ok = False if spec.pop("_route", None) == "peft" else None
        start = time.perf_counter()
        results = generate(prompts, model=engine, max_new_tokens=tokens, min_new_tokens=tokens if fixed else 0,
                           seed=0, batch_size=len(prompts), **spec)
        engine._gate_ok = None
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


@click.command("bench-cold")
@click.option("--model", default=None, help="Model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", default=None, help="LoRA adapter [default: a random-init LoRA, for timing only].")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--new-tokens", default=32, show_default=True, type=int)
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="torch threads [default: all cores].")
@click.option("--free-tokens", default=128, show_default=True, type=int,
              help="Token cap of the free-running answers that give tokens per answer.")
def bench_cold_command(model, adapter, batch_sizes, new_tokens, repeats, threads, free_tokens):
    """CoLD's decode cost against greedy with the same adapter, side by side."""
    from .cli import _quiet_transformers

    _quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    click.echo(run_latency(model=model, adapter=adapter, batch_sizes=sizes, new_tokens=new_tokens, repeats=repeats,
                           threads=threads, free_tokens=free_tokens))
