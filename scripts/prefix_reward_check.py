"""Does a reward's score of a partial answer predict its score of the whole answer? (CARDS's premise)

Samples N answers per prompt (temperature 0.7, top-k 40), scores each answer's prefixes at fixed token
counts and the whole answer, and prints per cut: the mean and spread of the scores (a drift of the mean
with length means an absolute threshold means different things early and late) and the correlation of
prefix and final scores within a prompt (how much a segment-level choice can steer the final reward).

    python scripts/prefix_reward_check.py PROMPTS.jsonl --reward harmless --limit 20 --n 8
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from decalign import generate
from decalign.api import get_engine
from decalign.records import read_records
from decalign.rewards import load_reward

CUTS = (0, 8, 16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", help="JSONL with 'messages' or 'prompt' per line")
    parser.add_argument("--reward", default="harmless")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--n", type=int, default=8, help="answers per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    prompts = [prompt for _, _, prompt, _ in read_records(Path(args.prompts))][: args.limit]
    reward = load_reward(args.reward)
    results = generate(prompts, method="bon", reward=reward, n=args.n, temperature=0.7, top_k=40,
                       max_new_tokens=args.max_new_tokens, seed=0, batch_size=len(prompts))
    engine = get_engine(None)
    items = [(p, c.tokens) for p, r in zip(prompts, results) for c in r.candidates]
    texts = [engine.decode(tokens[:k]) if k else "" for _, tokens in items for k in CUTS]
    scores = reward.score([p for p, _ in items for _ in CUTS], texts)
    rows = [scores[i * len(CUTS):(i + 1) * len(CUTS)] + [c.reward] for i, c in
            enumerate(c for r in results for c in r.candidates)]
    print("cut (tokens) | mean score | sd | within-prompt correlation with the final score")
    for j, cut in enumerate(list(CUTS) + ["final"]):
        column = [row[j] for row in rows]
        corr = []
        for q in range(len(prompts)):
            block = rows[q * args.n:(q + 1) * args.n]
            a, b = [row[j] for row in block], [row[-1] for row in block]
            if statistics.pstdev(a) > 0 and statistics.pstdev(b) > 0:
                corr.append(statistics.correlation(a, b))
        within = f"{statistics.fmean(corr):.2f}" if corr else "n/a"
        print(f"{cut} | {statistics.fmean(column):.3f} | {statistics.pstdev(column):.3f} | {within}")


if __name__ == "__main__":
    main()
