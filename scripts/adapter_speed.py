"""What serving several LoRA adapters in one batch costs a decode step (`--adapter NAME=PATH`).

    python scripts/adapter_speed.py [--model PATH] [--rows 16] [--tokens 24] [--repeats 5] [--rounds 2]

Random rank-16 LoRA adapters on all seven projections of the model (made once under --work), then
greedy decode steps of `--rows` rows split evenly among the base model and 1, 2 or 4 adapters
loaded by name, against the model with no adapter loaded, the same rows all on the base with the
adapters loaded, and PEFT's own `adapter_names` route at two adapters. Each figure is the median
over `--repeats` runs of `--tokens` steps; the cases are interleaved in each of `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model: str, folder: Path, seed: int) -> str:
    """A random LoRA adapter of `model` in `folder` (kept: later runs reuse it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not (folder / "adapter_model.safetensors").is_file():
        torch.manual_seed(seed)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                    LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
        with torch.no_grad():  # B starts at zero: give the adapter an effect
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.01)
        peft_model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def step_ms(engine, names: list[str] | None, rows: int, tokens: int, repeats: int) -> float:
    """Median milliseconds of a greedy decode step over `rows` rows running with `names`."""
    from decalign.sampling import GREEDY

    prompts = [engine.render("Tell me about bread.")] * rows
    times = []
    for _ in range(repeats):
        batch = engine.start(prompts, adapters=names, max_new_tokens=tokens + 2)
        started = time.perf_counter()
        batch.extend(GREEDY, max_tokens=tokens)
        times.append((time.perf_counter() - started) / tokens * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="policy folder or id [default: the embedded SmolLM2]")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="adapter-speed", help="folder for the random adapters")
    args = parser.parse_args()

    from decalign import Engine
    from decalign.engine import BASE
    from decalign.models import resolve_model_path

    model = resolve_model_path(args.model)
    adapters = {f"a{i}": make_adapter(model, Path(args.work) / f"a{i}", seed=i) for i in range(4)}
    cases = [("none", "base", Engine.load(model), None, False)]
    for count in (1, 2, 4):
        engine = Engine.load(model, adapters=dict(list(adapters.items())[:count]))
        split = [([BASE] + list(adapters)[:count])[row % (count + 1)] for row in range(args.rows)]
        cases.append((str(count), "base and the adapters", engine, split, False))
        if count == 2:
            cases.append(("2, PEFT's adapter_names route", "base and the adapters", engine, split, True))
        cases.append((str(count), "all base", engine, [BASE] * args.rows, False))
    print(f"| adapters loaded | {args.rows} rows | ms per decode step, round by round |\n|---|---|---|")
    figures: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for index, (_, _, engine, names, peft_route) in enumerate(cases):
            engine.lora_gate.ok = False if peft_route else None
            figures.setdefault(index, []).append(step_ms(engine, names, args.rows, args.tokens, args.repeats))
            engine.lora_gate.ok = None
    for index, (loaded, rows, *_) in enumerate(cases):
        print(f"| {loaded} | {rows} | {', '.join(f'{ms:.0f}' for ms in figures[index])} |")


if __name__ == "__main__":
    main()
