"""The engine's packed oneDNN weights against torch's own matmul on CPU, side by side in one process.

    python scripts/packed_speed.py [--model M] [--adapter A] [--batch-sizes 1,2,4,8,16] [--threads 1]

Loads the policy twice (DECALIGN_PACK_WEIGHTS=0 and the default), then, interleaved, per batch
size: the prefill of the prompts and the cost of one decode step ((T(N tokens) - T(1 token)) /
(N - 1), EOS suppressed), for greedy decoding and, with --adapter, for CoLD. Prints medians of
--repeats runs and each packed figure as a share of torch's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

PROMPTS = [
    "Explain how a bicycle stays upright.", "Write a short poem about rain on a tin roof.",
    "What should I pack for a weekend hike?", "Summarise the plot of Hamlet in three sentences.",
    "How do vaccines train the immune system?", "Give me three tips for learning to cook.",
    "Why is the sky blue?", "Describe a busy market in the morning.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None, help="a LoRA folder: CoLD is timed too")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}")
    if min(sizes) < 1 or args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("batch sizes, --repeats and --threads must be >= 1, --new-tokens >= 2")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from decalign import generate
    from decalign.engine import Engine

    engines = {}
    for name, flag in (("torch", "0"), ("packed", "1")):
        os.environ["DECALIGN_PACK_WEIGHTS"] = flag
        engines[name] = Engine.load(args.model, args.adapter)
    methods = ["greedy"] + (["cold"] if args.adapter else [])
    prompts = (PROMPTS * (max(sizes) // len(PROMPTS) + 1))[: max(sizes)]

    def seconds(engine, method: str, batch: int, tokens: int) -> float:
        start = time.perf_counter()
        generate(prompts[:batch], method=method, model=engine, max_new_tokens=tokens, min_new_tokens=tokens)
        return time.perf_counter() - start

    for engine in engines.values():  # warm-up: kernels chosen, weights paged in
        for method in methods:
            seconds(engine, method, 2, 2)
    prefill: dict[tuple, list[float]] = {}
    step: dict[tuple, list[float]] = {}
    for _ in range(args.repeats):
        for batch in sizes:
            for method in methods:
                for name, engine in engines.items():
                    one = seconds(engine, method, batch, 1)
                    many = seconds(engine, method, batch, args.new_tokens)
                    prefill.setdefault((batch, method, name), []).append(one)
                    step.setdefault((batch, method, name), []).append((many - one) / (args.new_tokens - 1))
    print(f"packed oneDNN weights vs torch matmul · model {engines['torch'].name} · {args.threads} thread(s) · "
          f"{args.new_tokens} new tokens · median of {args.repeats} · torch {torch.__version__}\n")
    print("| batch | method | prefill ms (torch / packed) | decode ms per step (torch / packed) | packed / torch step |")
    print("|---|---|---|---|---|")
    for batch in sizes:
        for method in methods:
            pre = [statistics.median(prefill[(batch, method, n)]) * 1000 for n in engines]
            dec = [statistics.median(step[(batch, method, n)]) * 1000 for n in engines]
            print(f"| {batch} | {method} | {pre[0]:.0f} / {pre[1]:.0f} | {dec[0]:.1f} / {dec[1]:.1f} | "
                  f"{dec[1] / dec[0]:.2f} |")


if __name__ == "__main__":
    main()
