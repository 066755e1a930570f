"""What a request joining a running batch costs (continuous batching), side by side in one process:
a decode step of the running rows alone; the joiners encoded in a forward pass of their own
(`Batch.admit`) and then the step; the joiners encoded in the step's own pass
(`Batch.advance(moves, joining=)`, as `decalign serve` does).

    python scripts/join_speed.py [--rows 16] [--fill 20] [--joiners 1] [--repeats 9] [--threads 2]
                                 [--model SPEC]

Each repeat opens a fresh batch of `rows` rows of one prompt, writes `fill` tokens, lets one prompt
join (which gives the cache its spare rows, as in a busy server), and times the three variants in
turn. Prints medians of `repeats` in ms, and what a join adds to a step either way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = "How do I make friends in a new city? I moved last month and know nobody here yet."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--fill", type=int, default=20)
    parser.add_argument("--joiners", type=int, default=1, help="prompts joining at once")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from decalign import Engine
    from decalign.engine import BatchPrompt
    from decalign.engine.batch import Sample
    from decalign.sampling import Sampling

    engine = Engine.load(args.model)
    on_gpu = engine.device.type == "cuda"
    sampling = Sampling(temperature=1.0)
    prompt = engine.render(PROMPT)
    joining = [BatchPrompt(ids=prompt, seed=10 + i, max_new_tokens=50) for i in range(args.joiners)]

    def running():
        batch = engine.start([prompt], n=args.rows, seeds=[1], max_new_tokens=200)
        batch.extend(sampling, max_tokens=args.fill)
        batch.admit([BatchPrompt(ids=prompt, seed=2, max_new_tokens=50)])
        batch.extend(sampling, max_tokens=2)
        return batch

    def step(batch, joiners=None):
        move = Sample(batch.open_segments(batch.live_rows(), croppable=False), sampling)
        batch.advance([move], joining=joiners)

    variants = {
        "step": lambda batch: step(batch),
        "admit, then step": lambda batch: (batch.admit(joining), step(batch)),
        "step with the joiners in its pass": lambda batch: step(batch, batch.prepare_join(joining)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            batch = running()
            if on_gpu:
                torch.cuda.synchronize()
            began = time.perf_counter()
            variant(batch)
            if on_gpu:  # kernels run after the call returns: wait for them
                torch.cuda.synchronize()
            times[name].append(1000 * (time.perf_counter() - began))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.rows + 1} running rows, {args.joiners} joining prompt(s) of {len(prompt)} tokens, "
          f"median of {args.repeats}:")
    for name, value in medians.items():
        print(f"  {name}: {value:.1f} ms")
    for name in list(variants)[1:]:
        print(f"  a join adds ({name}): {medians[name] - medians['step']:.1f} ms")


if __name__ == "__main__":
    main()
