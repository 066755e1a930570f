"""`decalign train-value`: distil a reward into a prefix value for one policy (CD-FUDGE).

    sample n answers per prompt from the policy; score each finished answer with the reward
    for every prefix of every answer (a grid of lengths): features x = f(policy states of the prefix)
    fit v(x) = w . x + b by ridge regression onto the answer's final reward (L2), on training prompts
    choose the layers and the ridge penalty by the validation prompts' within-prompt correlation
    write value.safetensors and value.json (policy, layers, reward, data, validation figures)

Prompts are split into training and validation sets before anything is fitted, so the reported
figures are on prompts the head never saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .. import __version__
from ..engine import get_engine
from ..errors import DecalignError
from ..records import load_output
from ..rewards import Reward, load_reward
from . import ValueHead, policy_signature, teacher_forced_features
from .sampling import read_prompts, sample_answers

CHECK_LENGTHS = (4, 8, 16, 32, 64)  # where values are judged (value-check uses the same)
PENALTIES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # ridge penalty, times the training rows


def check_state_widths(engine) -> None:
    """A value reads every layer's states as the model's hidden size wide; refuse, before any sampling,
    a model whose layers report other widths (OPT's last layer, projected to its embedding width)."""
    with torch.no_grad():
        out = engine.model(input_ids=torch.tensor([[engine.pad_id]], device=engine.device), output_hidden_states=True,
                           logits_to_keep=1)
    widths = sorted({state.shape[-1] for state in out.hidden_states})
    if widths != [engine.hidden_size]:
        raise DecalignError(f"model {engine.name} reports hidden states {widths} wide; a value needs every "
                            f"layer's {engine.hidden_size} wide")


def length_grid(answer_tokens: int) -> list[int]:
    """Prefix lengths a training answer contributes: dense early, sparser later, and the whole answer."""
    grid = [0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512]
    return sorted({g for g in grid if g < answer_tokens} | {answer_tokens})


def answer_ids(engine, tokens: Sequence[int]) -> list[int]:
    """The tokens the engine feeds for an answer: all but a final end-of-sequence token."""
    tokens = list(tokens)
    return tokens[:-1] if tokens and tokens[-1] in engine.eos_ids else tokens


def candidate_layers(num_layers: int, count: int = 5) -> list[int]:
    """Evenly spaced layers ending at the last (normed) one, e.g. 6, 12, 18, 24, 30 of 30."""
    return sorted({max(1, round(num_layers * (i + 1) / count)) for i in range(count)})


def layer_sets(layers: list[int]) -> list[list[int]]:
    """The layer subsets tried: the last; a middle one and the last; thirds."""
    last, middle = layers[-1], layers[len(layers) // 2]
    thirds = sorted({layers[len(layers) // 3], layers[2 * len(layers) // 3], last})
    sets = [[last], sorted({middle, last}), thirds]
    return [list(s) for s in dict.fromkeys(tuple(s) for s in sets)]


@dataclass
class PrefixTable:
    """One row per (answer, prefix length): features over the candidate layers, and labels."""

    features: torch.Tensor  # rows x (2 * len(layers) * hidden + 1)
    target: torch.Tensor  # the answer's final reward
    prompt: list[int]  # index of the prompt
    answer: list[int]  # index of the answer (global)
    length: list[int]  # prefix length in tokens
    layers: list[int]
    hidden: int

    def columns(self, subset: Sequence[int]) -> torch.Tensor:
        """Column indices of a layer subset's features (means, lasts, length), in prefix_features' order."""
        position = {layer: i for i, layer in enumerate(self.layers)}
        h, k = self.hidden, len(self.layers)
        means = [torch.arange(position[l] * h, (position[l] + 1) * h) for l in subset]
        lasts = [torch.arange((k + position[l]) * h, (k + position[l] + 1) * h) for l in subset]
        return torch.cat(means + lasts + [torch.tensor([2 * k * h])])

    def save(self, path: Path, answers: str) -> None:
        """Kept beside the samples, so that refitting does not run the policy again; `answers` is the
        fingerprint of the prompts and answers it was computed from (`answers_fingerprint`)."""

        partial = path.with_name(path.name + ".partial")  # renamed when whole: a killed save leaves no table
        save_file({"features": self.features, "target": self.target, "prompt": torch.tensor(self.prompt),
                   "answer": torch.tensor(self.answer), "length": torch.tensor(self.length)}, str(partial),
                  metadata={"layers": ",".join(map(str, self.layers)), "hidden": str(self.hidden),
                            "answers": answers})
        partial.replace(path)

    @classmethod
    def load(cls, path: Path, layers: list[int], answers: str) -> "PrefixTable | None":
        """The saved table, if it holds these layers for exactly these prompts and answers (a rerun
        on other prompts into the same folder must not fit the old ones' features); else None."""

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("layers") != ",".join(map(str, layers)) or meta.get("answers") != answers:
                    return None
                t = {name: handle.get_tensor(name) for name in handle.keys()}
        except SafetensorError:  # damaged (cut short by a disk that filled, say): computed again
            return None
        return cls(t["features"], t["target"], t["prompt"].tolist(), t["answer"].tolist(),
                   t["length"].tolist(), list(layers), int(meta["hidden"]))


def answers_fingerprint(records: list[dict]) -> str:
    """A digest of the prompts and answer tokens (not the rewards: a table copied from another
    reward's run of the same answers is still valid, its targets are read from the samples)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record["prompt"], [a["tokens"] for a in record["answers"]]]).encode())
    return digest.hexdigest()


def featurize(engine, records: list[dict], layers: list[int], *, progress: bool = True) -> PrefixTable:
    """Teacher-forced features of every grid prefix of every sampled answer."""

    features, target, prompt, answer, length = [], [], [], [], []
    count = 0
    for p, record in enumerate(tqdm(records, unit="prompt", desc="features", disable=not progress)):
        answers = [answer_ids(engine, a["tokens"]) for a in record["answers"]]
        grids = [length_grid(len(a)) for a in answers]
        features.append(teacher_forced_features(engine, engine.render(record["prompt"]), answers, layers,
                                                grids).cpu())  # the fit runs on the CPU in float64
        for a, grid in zip(record["answers"], grids):
            target += [a["reward"]] * len(grid)
            prompt += [p] * len(grid)
            answer += [count] * len(grid)
            length += grid
            count += 1
    return PrefixTable(torch.cat(features), torch.tensor(target, dtype=torch.float64), prompt, answer, length,
                       list(layers), engine.hidden_size)


class RidgePath:
    """Ridge regressions of y on standardised columns of x, for any column subset and penalty, from
    one Gram matrix: argmin |Z w - (y - mean y)|^2 + penalty * n * |w|^2, mapped back to raw x.

    With `groups`, x and y are first centred within each group (a fixed-effects regression): the fit
    then learns only differences between rows of the same group, e.g. answers to the same prompt at
    the same length, which is what a search compares."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, groups: Sequence[int] | None = None,
                 chunk: int = 4096) -> None:
        y = y.double()
        if groups is not None:
            index = torch.as_tensor(list(groups))
            count = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, torch.ones(len(y),
                                                                                                   dtype=torch.float64))
            x_means = torch.zeros((len(count), x.shape[1]), dtype=torch.float64).index_add_(0, index, x.double())
            x_means /= count[:, None]
            y = y - (torch.zeros(len(count), dtype=torch.float64).index_add_(0, index, y) / count)[index]
            shift = lambda rows: x_means[index[rows]]  # noqa: E731
        else:
            shift = lambda rows: 0.0  # noqa: E731
        self.mean = torch.zeros(x.shape[1], dtype=torch.float64)
        for start in range(0, len(y), chunk):
            rows = slice(start, start + chunk)
            self.mean += (x[rows].double() - shift(rows)).sum(0)
        self.mean /= len(y)
        square = torch.zeros(x.shape[1], dtype=torch.float64)
        self.gram = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float64)
        for start in range(0, len(y), chunk):  # float32 products, float64 sums: fast and exact enough
            rows = slice(start, start + chunk)
            centred = x[rows].double() - shift(rows) - self.mean
            square += (centred ** 2).sum(0)
            z = centred.float()
            self.gram += (z.T @ z).double()
        self.sd = (square / max(1, len(y) - 1)).sqrt().clamp(min=1e-6)
        self.gram /= self.sd[:, None] * self.sd[None, :]
        self.y_mean = float(y.mean())
        self.rows = len(y)
        self.zy = torch.zeros(x.shape[1], dtype=torch.float64)
        for start in range(0, len(y), chunk):
            rows = slice(start, start + chunk)
            z = (x[rows].double() - shift(rows) - self.mean) / self.sd
            self.zy += z.T @ (y[rows] - self.y_mean)

    def fits(self, columns: torch.Tensor, penalties: Sequence[float], *,
             minus: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, float]]:
        """(weight over `columns` of raw x, bias) for each penalty, from one eigendecomposition.
        minus: one weight per penalty, whose predictions are first taken off y (fit the residual)."""
        gram = self.gram[columns][:, columns]
        values, vectors = torch.linalg.eigh(gram)
        mean, sd = self.mean[columns], self.sd[columns]
        out = []
        for i, penalty in enumerate(penalties):
            zy, y_mean = self.zy[columns], self.y_mean
            if minus is not None:  # Z^T (y - X w) = Z^T y - gram (sd * w), as Z's columns are centred
                scaled = sd * minus[i].double()
                zy, y_mean = zy - gram @ scaled, y_mean - float((mean * minus[i].double()).sum())
            weight = (vectors @ ((vectors.T @ zy) / (values.clamp(min=0) + penalty * self.rows))) / sd
            out.append((weight.float(), y_mean - float((mean * weight).sum())))
        return out


def fit_ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> tuple[torch.Tensor, float]:
    """One ridge regression on all columns (see RidgePath)."""
    return RidgePath(x, y).fits(torch.arange(x.shape[1]), [penalty])[0]


def within_prompt_correlation(scores: Sequence[float], finals: Sequence[float], groups: Sequence) -> float:
    """Mean over groups (prompts) of the Pearson correlation of scores with final rewards; groups
    with fewer than 3 items or no spread are skipped."""
    by_group: dict = {}
    for s, f, g in zip(scores, finals, groups):
        by_group.setdefault(g, []).append((s, f))
    values = []
    for pairs in by_group.values():
        if len(pairs) < 3:
            continue
        xs, ys = zip(*pairs)
        if statistics.pstdev(xs) < 1e-12 or statistics.pstdev(ys) < 1e-12:
            continue
        values.append(statistics.correlation(xs, ys))
    return statistics.fmean(values) if values else math.nan


def judge(scores: Sequence[float], finals: Sequence[float], groups: Sequence, lengths: Sequence[int],
          final_sd: float) -> dict[int, dict]:
    """Per check length: within-prompt correlation with the final reward, and drift (mean score minus
    mean final reward of the same answers, in final-reward standard deviations)."""
    report = {}
    for length in CHECK_LENGTHS:
        picked = [i for i, l in enumerate(lengths) if l == length]
        if not picked:
            continue
        s = [scores[i] for i in picked]
        f = [finals[i] for i in picked]
        report[length] = {"n": len(picked),
                          "correlation": within_prompt_correlation(s, f, [groups[i] for i in picked]),
                          "drift_sd": (statistics.fmean(s) - statistics.fmean(f)) / final_sd}
    return report


def split_prompts(count: int, validation: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    cut = max(1, round(count * validation))
    if cut >= count:
        raise DecalignError(f"need at least 2 prompts to split into training and validation, got {count}")
    return sorted(order[cut:]), sorted(order[:cut])


def select_and_fit(table: PrefixTable, train: list[int], val: list[int], subsets: list[list[int]], *,
                   log=print) -> tuple[dict, torch.Tensor, float, list[dict]]:
    """Try each layer subset and penalty on the training prompts; keep the best by the validation
    prompts' mean within-prompt correlation over the check lengths (by validation error when the
    reward does not vary within a prompt, so no correlation is defined)."""
    train_set = set(train)
    is_train = torch.tensor([p in train_set for p in table.prompt])
    y = table.target
    val_rows = (~is_train).nonzero().flatten().tolist()
    finals = y[val_rows].tolist()
    final_sd = statistics.pstdev({table.answer[i]: y[i].item() for i in val_rows}.values()) or 1.0
    trials, best = [], None
    x_train = table.features[is_train]
    train_rows = is_train.nonzero().flatten().tolist()
    pooled = RidgePath(x_train, y[is_train])
    groups: dict[tuple[int, int], int] = {}
    within = RidgePath(x_train, y[is_train], groups=[groups.setdefault((table.prompt[i], table.length[i]), len(groups))
                                                     for i in train_rows])
    x_val = table.features[val_rows]
    for subset in subsets:
        columns = table.columns(subset)
        inside = within.fits(columns, PENALTIES)
        fits = [("pooled", p, f) for p, f in zip(PENALTIES, pooled.fits(columns, PENALTIES))]
        levels = pooled.fits(columns, PENALTIES, minus=[w for w, _ in inside])
        fits += [("within+level", p, (w + w_level, b_level)) for p, (w, _), (w_level, b_level)
                 in zip(PENALTIES, inside, levels)]
        for kind, penalty, (weight, bias) in fits:
            scores = (x_val[:, columns] @ weight + bias).tolist()
            report = judge(scores, finals, [table.prompt[i] for i in val_rows], [table.length[i] for i in val_rows],
                           final_sd)
            correlations = [r["correlation"] for r in report.values() if not math.isnan(r["correlation"])]
            error = statistics.fmean((s - f) ** 2 for s, f in zip(scores, finals))
            quality = (statistics.fmean(correlations), -error) if correlations else (-math.inf, -error)
            trials.append({"layers": subset, "fit": kind, "penalty": penalty,
                           "mean_correlation": quality[0] if correlations else None, "mse": error,
                           "by_length": {str(k): v for k, v in report.items()}})
            log(f"layers {subset} {kind} penalty {penalty:g}: validation within-prompt correlation "
                f"{quality[0]:.3f}, squared error {error:.4f}")
            if best is None or quality > best[0]:
                best = (quality, len(trials) - 1, weight, bias)
    _, chosen, weight, bias = best
    return trials[chosen], weight, bias, trials


def train_value(*, prompts: Path, reward_spec: "str | Reward", out: Path, model: str | None = None, adapter: str | None = None,
                exclude: Path | None = None, limit: int | None = None, offset: int = 0, n: int = 8,
                max_new_tokens: int = 96, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                validation: float = 0.2, batch_size: int = 16, samples: Path | None = None,
                samples_from: Path | None = None, ray: dict | None = None, progress: bool = True,
                log=print) -> ValueHead:
    """The whole recipe; samples are kept in `samples` (default OUT/samples.jsonl) so a rerun resumes.
    `samples_from`: another run's folder whose answers are reused, rescored by this reward (and its
    teacher-forced features too, which depend on the answers' tokens only, when it used the same prompts).
    `ray`: {"replicas": N, "address": A} samples the answers on a Ray actor pool (same answers)."""

    if not 0 < validation < 1:
        raise DecalignError(f"--validation must be in (0, 1), got {validation}")
    reward = load_reward(reward_spec)
    items = read_prompts(prompts, exclude=exclude, limit=limit, offset=offset)
    engine = get_engine(model, adapter)
    check_state_widths(engine)
    samples = samples or out / "samples.jsonl"
    started = time.perf_counter()
    records = sample_answers(engine, reward, items, samples, n=n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size,
                             progress=progress, samples_from=samples_from, ray=ray,
                             ray_reward=reward_spec if isinstance(reward_spec, str) else None)
    subsets = layer_sets(candidate_layers(engine.num_layers))
    layers = sorted({layer for s in subsets for layer in s})
    cached = out / "features.safetensors"
    if samples_from is not None and not cached.exists() and (samples_from / cached.name).is_file():
        _, source = load_output(samples_from / "samples.jsonl")
        if [r["id"] for r in source] == [r["id"] for r in records]:  # the same answers in the same order
            shutil.copyfile(samples_from / cached.name, cached)
    fingerprint = answers_fingerprint(records)
    table = PrefixTable.load(cached, layers, fingerprint)
    if table is None:
        table = featurize(engine, records, layers, progress=progress)
        table.save(cached, fingerprint)
    # the targets are read from the samples, not the cache: a cache copied from another reward's run
    # holds that reward's scores
    finals = [a["reward"] for r in records for a in r["answers"]]
    table.target = torch.tensor([finals[a] for a in table.answer], dtype=torch.float64)
    train, val = split_prompts(len(records), validation, seed)
    chosen, weight, bias, trials = select_and_fit(table, train, val, subsets, log=log)
    card = {
        "name": out.name,
        "policy": policy_signature(engine),
        "features": "per layer: mean state over the answer's tokens, state at the last token read; log(1 + tokens)",
        "reward": reward.name,
        "data": {"prompts": str(prompts), "exclude": str(exclude) if exclude else None, "offset": offset,
                 "limit": limit, "prompts_used": len(records), "train_prompts": len(train),
                 "validation_prompts": len(val), "answers_per_prompt": n, "max_new_tokens": max_new_tokens,
                 "temperature": temperature, "top_k": top_k, "seed": seed, "prefix_rows": len(table.target)},
        "validation": {"fit": chosen["fit"], "penalty": chosen["penalty"],
                       "mean_correlation": chosen["mean_correlation"], "mse": chosen["mse"],
                       "by_length": chosen["by_length"]},
        "trials": trials,
        "seconds": round(time.perf_counter() - started, 1),
        "decalign": __version__,
    }
    head = ValueHead(name=out.name, layers=chosen["layers"], weight=weight, bias=bias, card=card)
    head.save(out)
    return head
