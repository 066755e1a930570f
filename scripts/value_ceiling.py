"""How well could any prefix value rank partial answers? A Monte Carlo estimate of the ceiling.

    python scripts/value_ceiling.py RUN [--prompts 28] [--rollouts 6] [--lengths 8,16] [--reward harmless]

RUN is a `decalign value-check` folder (its samples.jsonl and config.json: prompts, answers, final
rewards, the sampling used). For each answer longer than L tokens, the policy writes --rollouts
continuations of its first L tokens with the same sampling, and the reward scores each. The mean
of a prefix's rollouts estimates V*(prefix) = E[final reward | prefix], the best any prefix value
can do. Printed per L, within each prompt (as value-check measures):
- the correlation of the rollout mean with the answer's own final reward, mean over prompts and
  pooled;
- the share of the rollout mean's variance that is rollout noise, and the pooled correlation of V*
  itself with the final reward once that noise is taken out (the ceiling).
Rollouts are appended to RUN/rollouts.jsonl as each prompt finishes; a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--prompts", type=int, default=28)
    parser.add_argument("--rollouts", type=int, default=6)
    parser.add_argument("--lengths", default="8,16")
    parser.add_argument("--reward", default="harmless")
    args = parser.parse_args()
    if not (args.run / "samples.jsonl").is_file() or not (args.run / "config.json").is_file():
        parser.error(f"{args.run} holds no samples.jsonl and config.json (a `decalign value-check --out` folder)")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be integers separated by commas, got {args.lengths!r}")
    if args.rollouts < 2 or args.prompts < 1 or min(lengths) < 1:
        parser.error("--rollouts must be >= 2, --prompts and every length >= 1")
    warnings.filterwarnings("ignore")
    from decalign.engine import get_engine
    from decalign.rewards import load_reward
    from decalign.sampling import Sampling

    config = json.loads((args.run / "config.json").read_text())
    records = [json.loads(line) for line in (args.run / "samples.jsonl").open()][: args.prompts]
    out = args.run / "rollouts.jsonl"
    done = {(r["id"], r["length"]) for r in map(json.loads, out.open())} if out.exists() else set()
    engine, reward = get_engine(config["model"], config["adapter"]), load_reward(args.reward)
    sampling = Sampling(config["temperature"], top_k=config["top_k"])
    with out.open("a") as handle:
        for record in records:
            for length in lengths:
                answers = [a for a in record["answers"] if len(a["tokens"]) > length]
                if (record["id"], length) in done or not answers:
                    continue
                prompt = engine.render(record["prompt"])
                batch = engine.start([prompt + a["tokens"][:length] for a in answers], n=args.rollouts,
                                     seeds=[1000 + 17 * i + length for i in range(len(answers))],
                                     max_new_tokens=config["max_new_tokens"] - length)
                batch.extend(sampling)
                texts = [engine.decode(answers[batch.prompt_of[r]]["tokens"][:length] + batch.tokens[r])
                         for r in range(batch.size)]
                scores = reward.score([record["prompt"]] * len(texts), texts)
                handle.write(json.dumps({"id": record["id"], "length": length, "final": [a["reward"] for a in answers],
                                         "rollouts": [scores[i * args.rollouts:(i + 1) * args.rollouts]
                                                      for i in range(len(answers))]}) + "\n")
                handle.flush()
                print(f"prompt {record['id']}, {length} tokens: {len(answers)} prefixes", flush=True)
    rows = [json.loads(line) for line in out.open()]
    print("\n| prefix tokens | prompts | rollout mean: correlation (mean over prompts) | pooled | "
          "rollout noise share | ceiling: V* correlation (pooled) |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        cov = var_mean = var_final = noise = 0.0
        per_prompt = []
        for row in (r for r in rows if r["length"] == length and len(r["final"]) >= 3):
            final = torch.tensor(row["final"], dtype=torch.float64)
            rollouts = torch.tensor(row["rollouts"], dtype=torch.float64)
            mean = rollouts.mean(1)
            f, m = final - final.mean(), mean - mean.mean()
            cov += float((f * m).sum())
            var_mean += float((m * m).sum())
            var_final += float((f * f).sum())
            count = len(final)
            noise += float(rollouts.var(1).sum()) / rollouts.shape[1] * (count - 1) / count
            if f.norm() > 0 and m.norm() > 0:
                per_prompt.append(float((f * m).sum() / (f.norm() * m.norm())))
        if not per_prompt:
            continue
        ceiling = cov / math.sqrt(max(var_mean - noise, 1e-12) * var_final)
        print(f"| {length} | {len(per_prompt)} | {statistics.fmean(per_prompt):.3f} | "
              f"{cov / math.sqrt(var_mean * var_final):.3f} | {noise / var_mean:.2f} | {ceiling:.3f} |")


if __name__ == "__main__":
    main()
