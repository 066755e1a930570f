"""The cost of a decode step that feeds only some of a batch's rows: over those rows alone (the
engine's row-subset step) against over every row, side by side in one process.

    python scripts/step_speed.py [--prompts 24] [--rows-per-prompt 4] [--fill 60] [--share 0.65]
                                 [--steps 8] [--repeats 5] [--threads 2]
    python scripts/step_speed.py --rows-sweep 1,5,10,20,40,80,160,320 [--fill 8] [--steps 24]

Opens `prompts` x `rows-per-prompt` rows of the embedded model (the benchmark prompts of `decalign bench-cold`), samples `fill`
tokens so the cache has some width, then times, interleaved, `steps` decode steps of: every live
row; a `share` of them over all rows; the same share over those rows alone; a sampled step of
every live row (the draw included). Prints medians of
`repeats` in ms per step. The cache widens by one position per step, so later repeats cost a
little more for every variant alike.

`--rows-sweep`: instead, the cost of a sampled step of every row against the batch's row count (a
batch of each size in turn, `fill` tokens first): what a step costs whatever it computes, and what
each row adds. docs/cards.md reads CARDS' time against Best-of-N's from it. With `--decoders`, each
repeat times the same batch's steps through the engine's decoder and through transformers' forward,
interleaved (the README's "A decoder without transformers' per-call machinery").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--rows-per-prompt", type=int, default=4)
    parser.add_argument("--fill", type=int, default=60)
    parser.add_argument("--share", type=float, default=0.65)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    parser.add_argument("--rows-sweep", default=None, help="comma-separated row counts: step cost against rows")
    parser.add_argument("--decoders", action="store_true",
                        help="with --rows-sweep: the engine's decoder against transformers' forward, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from decalign.bench_cold import PROMPTS
    from decalign.engine import get_engine
    from decalign.sampling import Sampling

    engine = get_engine(args.model)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def rendered(count: int) -> list[list[int]]:
        return [engine.render(PROMPTS[i % len(PROMPTS)]) for i in range(count)]

    if args.rows_sweep:
        decoders = {"decoder": engine.decoder, "transformers": None} if args.decoders else {"": engine.decoder}
        steps = args.steps * args.repeats * len(decoders)
        for rows in (int(r) for r in args.rows_sweep.split(",")):
            batch = engine.start(rendered(rows), seeds=list(range(rows)), max_new_tokens=args.fill + steps + 1,
                                 min_new_tokens=args.fill + steps)
            batch.extend(Sampling(temperature=1.0), max_tokens=args.fill)
            costs: dict[str, list[float]] = {name: [] for name in decoders}
            for _ in range(args.repeats):
                for name, decoder in decoders.items():
                    engine.decoder = decoder
                    sync()
                    start = time.perf_counter()
                    batch.extend(Sampling(temperature=1.0), max_tokens=args.steps)
                    sync()
                    costs[name].append((time.perf_counter() - start) / args.steps * 1000)
            engine.decoder = decoders[next(iter(decoders))]
            line = "  ".join(f"{name} {statistics.median(c):8.1f} ms / step {statistics.median(c) / rows:7.2f} ms / row"
                             for name, c in costs.items())
            print(f"{rows:5d} rows  {line}", flush=True)
        return
    batch = engine.start(rendered(args.prompts), n=args.rows_per_prompt, seeds=list(range(args.prompts)),
                         max_new_tokens=args.fill + args.steps * args.repeats * 4 + 1,
                         min_new_tokens=args.fill + args.steps * args.repeats * 4)  # no row ends early
    batch.extend(Sampling(temperature=1.0), max_tokens=args.fill)
    live = batch.live_rows()
    part = live[:max(1, round(args.share * len(live)))]
    print(f"{batch.size} rows, {len(live)} live, cache {batch.mask.shape[1]} positions wide; "
          f"the partial steps feed {len(part)}")
    token = engine.tokenizer.encode(" the", add_special_tokens=False)[0]
    variants = (("every live row", live, 0.0), (f"{len(part)} rows, step over all", part, 0.0),
                (f"{len(part)} rows, step over them alone", part, 2.0))
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    times["every live row, sampled"] = []
    shared = engine.subset_share
    try:
        for _ in range(args.repeats):
            for name, rows, subset_share in variants:
                engine.subset_share = subset_share
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    batch.append({r: token for r in rows})
                sync()
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
            engine.subset_share = 0.0
            sync()
            start = time.perf_counter()
            batch.extend(Sampling(temperature=1.0), max_tokens=args.steps)  # draws too, as methods do
            sync()
            times["every live row, sampled"].append((time.perf_counter() - start) / args.steps * 1000)
    finally:
        engine.subset_share = shared
    for name, values in times.items():
        print(f"{name:40s} {statistics.median(values):7.1f} ms / step   ({', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
