"""The host work of a server-like decode step: many requests of mixed methods sharing one batch
(`decalign.methods.Driver`, as `decalign serve` runs them) on a 2-layer test model, whose forward
pass is nearly free, so what a step costs beyond the model shows (as on a GPU).

    python scripts/host_step.py [--requests 60] [--repeats 3] [--answers OUT.json]

Prints ms per step (median of repeats); --answers writes every answer's tokens, to check that a
change to the engine leaves them as they were (compare two files with `cmp`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

MIX = [("greedy", {}), ("sample", {"temperature": 0.8}), ("bon", {"n": 4}), ("sample", {"top_p": 0.9}),
       ("cards", {"tau_u": 2.0, "proposals": 2}), ("smc", {"budget": 4, "block": 8})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--answers", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from decalign.api import start
    from decalign.methods import Driver
    from decalign.request import Request
    from decalign.testing import make_tiny_model

    model = make_tiny_model(Path(tempfile.mkdtemp()) / "model")
    requests = [Request.build(prompts=[f"question number {i} about bread"], method=MIX[i % len(MIX)][0],
                              params=MIX[i % len(MIX)][1], max_new_tokens=24, seed=i, model=str(model),
                              reward="sentiment" if MIX[i % len(MIX)][0] in ("bon", "cards", "smc") else None)
                for i in range(args.requests)]
    times, answers, steps = [], [], 0
    for _ in range(args.repeats):
        methods = [start(request) for request in requests]
        driver = Driver(methods[0].job.engine)
        driver.add(methods)
        steps, began = 0, time.perf_counter()
        while driver.live:
            driver.step()
            steps += 1
        times.append((time.perf_counter() - began) / steps * 1000)
        answers = [[result.tokens for result in method.results] for method in methods]
    print(f"{args.requests} requests: {statistics.median(times):.1f} ms per step "
          f"({', '.join(f'{t:.1f}' for t in times)}), {steps} steps")
    if args.answers:
        args.answers.write_text(json.dumps(answers))


if __name__ == "__main__":
    main()
