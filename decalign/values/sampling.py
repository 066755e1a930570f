"""The policy's own answers, sampled and scored once, for training and checking prefix values.

A samples file holds one JSON line per prompt: {id, prompt, answers: [{tokens, text, reward}]}.
Lines are written as batches finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, TextIO

from tqdm import tqdm

from ..errors import DecalignError
from ..records import FINGERPRINT, append_record, check_run_config, held_output, load_output, prompt_key, read_records
from ..sampling import Sampling, derive_seed


def read_prompts(path: Path, *, exclude: Path | None = None, limit: int | None = None,
                 offset: int = 0) -> list[tuple[Any, Any]]:
    """(id, prompt) pairs of a JSONL file, first-user-turn duplicates and `exclude`'s prompts dropped,
    then `offset` skipped and `limit` kept."""
    if limit is not None and limit < 1:
        raise DecalignError(f"--limit must be >= 1, got {limit}")
    if offset < 0:
        raise DecalignError(f"--offset must be >= 0, got {offset}")
    banned = {prompt_key(p) for _, _, p, _ in read_records(exclude)} if exclude is not None else set()
    items, seen = [], set()
    for _, record_id, prompt, _ in read_records(path):
        key = prompt_key(prompt)
        if key in banned or key in seen:
            continue
        seen.add(key)
        items.append((record_id, prompt))
    items = items[offset:]
    items = items[:limit] if limit is not None else items
    if not items:
        raise DecalignError(f"{path} holds no prompts (after --exclude / --offset)")
    return items


def rescore_samples(source: Path, reward, items: Sequence[tuple[Any, Any]], out: Path, handle: TextIO, config: dict,
                    *, batch_size: int = 32, progress: bool = True) -> None:
    """Copy the answers another run sampled (same policy and sampling, any reward) into `out` (open
    to append as `handle`), each scored anew by `reward`: a new reward needs no new sampling."""
    source_config = source / "config.json"
    if not (source / "samples.jsonl").is_file() or not source_config.is_file():
        raise DecalignError(f"--samples-from {source}: no samples.jsonl and config.json there")
    old = json.loads(source_config.read_text())
    changed = [k for k in config if not k.startswith("reward") and old.get(k) != config[k]]
    if changed:
        raise DecalignError(f"--samples-from {source}: its answers were sampled with another {', '.join(changed)}")
    _, sampled = load_output(source / "samples.jsonl")
    done, _ = load_output(out)
    wanted = {i for i, _ in items} - done
    todo = [r for r in sampled if r["id"] in wanted]
    for start in tqdm(range(0, len(todo), batch_size), unit="batch", desc="rescoring", disable=not progress):
        chunk = todo[start:start + batch_size]
        pairs = [(r["prompt"], a["text"]) for r in chunk for a in r["answers"]]
        scores = iter(reward.score([p for p, _ in pairs], [t for _, t in pairs]))
        for record in chunk:
            append_record(handle, {**record, "answers": [{**a, "reward": next(scores)} for a in record["answers"]]})


def sample_chunk(engine, reward, chunk: Sequence[tuple[Any, Any]], *, n: int, max_new_tokens: int, temperature: float,
                 top_k: int, seed: int) -> list[dict]:
    """Records {id, prompt, answers} of n scored answers for each (id, prompt); each prompt's seed
    derives from `seed` and its id, so a record does not depend on the chunk it was sampled in."""
    batch = engine.start([engine.render(p) for _, p in chunk], n=n,
                         seeds=[derive_seed(seed, str(i)) for i, _ in chunk], max_new_tokens=max_new_tokens)
    batch.extend(Sampling(temperature, top_k=top_k))
    texts = [batch.text(r) for r in range(batch.size)]
    rewards = reward.score([chunk[batch.prompt_of[r]][1] for r in range(batch.size)], texts)
    return [{"id": record_id, "prompt": prompt,
             "answers": [{"tokens": batch.tokens[r], "text": texts[r], "reward": rewards[r], "finish": batch.finish[r]}
                         for r in range(p * n, (p + 1) * n)]}
            for p, (record_id, prompt) in enumerate(chunk)]


def sample_answers(engine, reward, items: Sequence[tuple[Any, Any]], out: Path, *, n: int, max_new_tokens: int,
                   temperature: float, top_k: int, seed: int, batch_size: int, progress: bool = True,
                   samples_from: Path | None = None, ray: dict | None = None, ray_reward: Any = None) -> list[dict]:
    """n answers per prompt from the policy, scored by the reward; appended to `out` per batch (resumes).
    A folder holding samples of another policy, reward or sampling is refused, never mixed in.
    `samples_from`: a run folder whose answers to these prompts are reused, rescored (`rescore_samples`).
    `ray`: {"replicas": N, "address": A} samples on a Ray actor pool instead (`ray_reward`: the reward
    spec the replicas load, default the reward itself), with the same answers."""
    if n < 3:  # within-prompt correlations skip prompts of fewer answers: with 2, nothing would be judged
        raise DecalignError(f"--n must be >= 3 (values are judged by correlations within a prompt), got {n}")
    if not temperature > 0:
        raise DecalignError(f"--temperature must be > 0: a prompt's answers must differ for a value to be judged "
                            f"within it, got {temperature}")
    if batch_size < 1:
        raise DecalignError(f"--batch-size must be >= 1, got {batch_size}")
    config = {"model": engine.name, "adapter": engine.adapter, "reward": reward.name,
              "reward" + FINGERPRINT: reward.fingerprint(), "n": n,
              "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    with held_output(out) as handle:  # a second run on the same samples is refused
        check_run_config(out.parent, config, records=out, paths=("model", "adapter"))
        if samples_from is not None:
            rescore_samples(samples_from, reward, items, out, handle, config, progress=progress)
        done, records = load_output(out)
        pending = [(i, p) for i, p in items if i not in done]
        bar = tqdm(total=len(items), initial=len(items) - len(pending), unit="prompt", desc="sampling",
                   disable=not progress)
        if ray is not None:  # the same chunks, answered by a pool of replicas (decalign.ray_job)
            from ..ray_job import sample_on_ray

            answered = sample_on_ray(pending, model=engine.name, adapter=engine.adapter, reward=ray_reward or reward,
                                     n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     seed=seed, batch_size=batch_size, **ray)
        else:
            answered = (record for start in range(0, len(pending), batch_size)
                        for record in sample_chunk(engine, reward, pending[start:start + batch_size], n=n,
                                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                                   top_k=top_k, seed=seed))
        for record in answered:
            append_record(handle, record)
            records.append(record)
            bar.update(1)
        bar.close()
    wanted = {i for i, _ in items}
    return [r for r in records if r["id"] in wanted]
