"""Scoring speed of harmless heads on the first 200 dev pairs (400 items as they are), side by side.

    python scripts/reward_speed.py ../shared/data/hh-rlhf-harmless/pairs.jsonl [OTHER_HEAD ...]

Scores the pairs with the shipped head (embedder in float32 and in the default dtype) and with any
other head folders given, interleaved, and prints the median of --runs runs in pairs per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

from decalign.rewards.harmless import HarmlessReward, embedder_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", help="a {messages, chosen, rejected} JSONL")
    parser.add_argument("heads", nargs="*", help="other head folders (written by train-reward) to time beside it")
    parser.add_argument("--pairs-used", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with open(args.pairs, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][: args.pairs_used]
    prompts = [r["messages"] for r in rows] * 2
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    default = str(embedder_dtype("auto")).removeprefix("torch.")
    rewards = {"shipped, float32": HarmlessReward(dtype="float32"), f"shipped, auto ({default})": HarmlessReward()}
    for head in args.heads:
        rewards[f"{head}, float32"] = HarmlessReward(head, dtype="float32")
        rewards[f"{head}, auto ({default})"] = HarmlessReward(head)
    for reward in rewards.values():  # warm-up: the embedder loads, kernels are chosen
        reward.score(prompts[:8], answers[:8])
    rates: dict[str, list[float]] = {name: [] for name in rewards}
    for _ in range(args.runs):
        for name, reward in rewards.items():
            started = time.perf_counter()
            reward.score(prompts, answers)
            rates[name].append(len(rows) / (time.perf_counter() - started))
    print("| reward | pairs/s (median) | runs |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
