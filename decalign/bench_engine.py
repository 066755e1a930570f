"""Engine speed against transformers' own `generate`, measured side by side in one process.

Both decode the same left-padded prompts with the same sampling settings (temperature 1, no
top-k/top-p, exactly `new_tokens` tokens, EOS suppressed); runs alternate, after a warm-up of each,
and each cell is the median of the repeats.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from .engine import get_engine
from .sampling import Sampling

PROMPTS = [
    "How do I bake bread at home?",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in two sentences.",
    "What should I pack for a weekend hike in the mountains?",
]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_bench(model: str | None = None, batch_sizes=(1, 4, 16), new_tokens: int = 64, repeats: int = 3,
              threads: int | None = None) -> str:
    """A markdown table of tokens per second (whole batch) for the engine and for HF generate."""

    if threads:
        torch.set_num_threads(threads)
    engine = get_engine(model)
    policy = engine.model
    sampling = Sampling(temperature=1.0)
    rows = [f"engine vs transformers.generate · model {engine.name} · {new_tokens} new tokens · "
            f"median of {repeats} · torch {torch.__version__} · {torch.get_num_threads()} threads · "
            f"{platform.processor() or platform.machine()}",
            "",
            "| batch | engine tok/s | generate tok/s | ratio (engine / generate) |",
            "|---|---|---|---|"]
    for batch_size in batch_sizes:
        ids = [engine.render(PROMPTS[i % len(PROMPTS)]) for i in range(batch_size)]

        def run_engine():
            batch = engine.start(ids, seeds=list(range(batch_size)), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens)
            batch.extend(sampling)

        width = max(map(len, ids))
        input_ids = torch.tensor([[engine.pad_id] * (width - len(x)) + x for x in ids], device=engine.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=engine.device)

        def run_generate():
            with torch.no_grad():
                policy.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=engine.pad_id)

        run_engine(), run_generate()  # warm-up
        engine_times, generate_times = [], []
        for _ in range(repeats):
            engine_times.append(_time(run_engine))
            generate_times.append(_time(run_generate))
        tokens = batch_size * new_tokens
        engine_rate = tokens / statistics.median(engine_times)
        generate_rate = tokens / statistics.median(generate_times)
        rows.append(f"| {batch_size} | {engine_rate:.1f} | {generate_rate:.1f} | {engine_rate / generate_rate:.2f} |")
    return "\n".join(rows)
