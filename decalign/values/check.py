"""`decalign value-check`: how well prefix scorers predict the final reward, side by side.

For each check length L (4, 8, 16, 32, 64 tokens) and each scorer, over the policy's own answers
that run longer than L: the within-prompt correlation of the prefix's score with the answer's final
reward (does it rank a prompt's partial answers as the reward will rank the finished ones?), and the
drift (mean prefix score minus mean final reward, in final-reward standard deviations: is it on the
reward's scale at that length?). The reward itself, scored on the prefixes, is always a column.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..engine import get_engine
from ..errors import DecalignError
from ..rewards import load_reward
from . import load_value, teacher_forced_features
from .sampling import read_prompts, sample_answers
from .train import CHECK_LENGTHS, answer_ids, judge


def _check_lengths(ids: list[int]) -> list[int]:
    return [length for length in CHECK_LENGTHS if len(ids) > length]


def _prefixes(engine, records: list[dict]) -> list[tuple[int, int, list[int], float]]:
    """(prompt index, L, answer ids, final reward) for every answer longer than each check length,
    in the order value features are computed (prompt, answer, length)."""
    items = []
    for p, record in enumerate(records):
        for answer in record["answers"]:
            ids = answer_ids(engine, answer["tokens"])
            items += [(p, length, ids, answer["reward"]) for length in _check_lengths(ids)]
    return items


def check_values(*, prompts: Path, reward_spec: str, out: Path, values: Sequence[str] = (),
                 scorers: Sequence[str] = (), model: str | None = None, adapter: str | None = None,
                 exclude: Path | None = None, limit: int | None = None, offset: int = 0, n: int = 8,
                 max_new_tokens: int = 96, temperature: float = 1.0, top_k: int = 0, seed: int = 1,
                 batch_size: int = 16, progress: bool = True) -> str:
    """Sample (resumable, in OUT/samples.jsonl), score every prefix with every scorer, write
    value_check.md / .json into OUT and return the markdown table."""


    reward = load_reward(reward_spec)
    heads = [load_value(v) for v in values]
    extra = [load_reward(s) for s in scorers]
    engine = get_engine(model, adapter)
    for head in heads:
        head.check_engine(engine)
    items = read_prompts(prompts, exclude=exclude, limit=limit, offset=offset)
    records = sample_answers(engine, reward, items, out / "samples.jsonl", n=n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size,
                             progress=progress)
    prefixes = _prefixes(engine, records)
    if not prefixes:
        raise DecalignError("no answer is longer than 4 tokens; nothing to check")
    groups = [p for p, _, _, _ in prefixes]
    lengths = [length for _, length, _, _ in prefixes]
    finals = [final for _, _, _, final in prefixes]
    all_finals = [a["reward"] for r in records for a in r["answers"]]
    final_sd = statistics.pstdev(all_finals) or 1.0
    texts = [engine.decode(ids[:length]) for _, length, ids, _ in prefixes]
    owners = [records[p]["prompt"] for p in groups]
    columns: dict[str, list[float]] = {}
    for name, scorer in [(f"{reward.name} (reward on prefixes)", reward)] + [(s.name, s) for s in extra]:
        scores = []
        for start in tqdm(range(0, len(texts), 64), desc=f"scoring {name}", disable=not progress):
            scores += scorer.score_prefix(owners[start:start + 64], texts[start:start + 64])
        columns[name] = scores
    for head in heads:  # one forward pass per prompt gives every prefix of its answers
        scores = []
        for record in tqdm(records, desc=f"value {head.name}", disable=not progress):
            answers = [answer_ids(engine, a["tokens"]) for a in record["answers"]]
            cuts = [_check_lengths(ids) for ids in answers]
            if any(cuts):
                features = teacher_forced_features(engine, engine.render(record["prompt"]), answers, head.layers,
                                                   cuts)
                scores += head.score_features(features).tolist()
        columns[f"value {head.name}"] = scores
    reports = {name: judge(scores, finals, groups, lengths, final_sd) for name, scores in columns.items()}
    summary = {"prompts": len(records), "answers_per_prompt": n, "final_reward_mean": statistics.fmean(all_finals),
               "final_reward_sd": final_sd, "scorers": {k: {str(l): v for l, v in r.items()} for k, r in reports.items()}}
    table = _markdown(summary, reports)
    out.mkdir(parents=True, exist_ok=True)
    (out / "value_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "value_check.md").write_text(table + "\n")
    return table


def _markdown(summary: dict, reports: dict[str, dict]) -> str:
    names = list(reports)
    lines = [f"{summary['prompts']} prompts x {summary['answers_per_prompt']} answers; final reward mean "
             f"{summary['final_reward_mean']:.3f}, sd {summary['final_reward_sd']:.3f}", "",
             "| tokens | answers | " + " | ".join(f"{n}: correlation | {n}: drift (sd)" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for length in CHECK_LENGTHS:
        cells = [reports[n].get(length) for n in names]
        if not any(cells):
            continue
        count = next(c["n"] for c in cells if c)
        body = " | ".join("— | —" if c is None else f"{_num(c['correlation'])} | {c['drift_sd']:+.2f}" for c in cells)
        lines.append(f"| {length} | {count} | {body} |")
    lines += ["", "correlation: mean over prompts of the within-prompt Pearson correlation with the final reward; "
              "drift: mean score minus mean final reward of the same answers, in final-reward sds."]
    return "\n".join(lines)


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"
