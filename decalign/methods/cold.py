"""The contrastive family as configurations of one logit-arithmetic step; CoLD is one of them.

At every step each prompt has a few *branches*: rows that hold the same tokens but see them through
different weights (the model with its LoRA adapter, the same weights without it, another model).
The step combines their raw next-token logits s_k with fixed weights w_k,

    score[i] = sum_k w_k * s_k[i]     on the plausible set {i : s_h[i] >= log(alpha) + max s_h}

of a head branch h (-inf elsewhere), picks argmax(score) (or draws from softmax(score / T) when
temperature > 0), and appends the chosen token to every branch's row. Per-row constants (log Z)
cancel in the argmax and the softmax, so raw logits and log-probabilities give the same tokens.

Configurations (all registered methods):
- cold:        expert = model + LoRA, amateur = the same weights without it, in one batched forward;
               score = (1 + beta) * s_e - (beta / tau) * s_a, mask on the expert.
- contrastive: expert = the model (with its adapter if one is loaded), amateur = a separate, smaller
               model with the same tokenizer (O'Brien & Lewis 2023); same score and mask.
- dexperts:    s_base + beta * (s_expert - s_anti) (DExperts, proxy-tuning's form): expert = the loaded
               adapter, anti-expert = a second adapter (anti_adapter) or the base itself; mask on the base.

beta = 0 or alpha = 1 reduces cold and contrastive exactly to greedy decoding of the expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..engine import BASE, Batch, Engine
from ..errors import DecalignError
from ..result import Result
from ..sampling import Sampling, choose_tokens
from . import Job, missing_adapter, register


# ----- the shared step --------------------------------------------------------------------------
def contrast_scores(logits: Sequence[torch.Tensor], weights: Sequence[float], *, head: int = 0,
                    alpha: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, plausible) for rows x vocab logits of each branch: the weighted sum of the branches'
    logits on the head branch's plausible set, -inf outside it. Branches with weight 0 are skipped,
    so a zero weight never turns an infinite logit into NaN."""
    target = logits[head].float()
    plausible = target >= math.log(alpha) + target.max(-1, keepdim=True).values
    score = None
    for weight, branch in zip(weights, logits):
        if weight == 0:
            continue
        term = branch.float() if weight == 1 else weight * branch.float()
        score = term if score is None else score + term
    if score is None:
        score = torch.zeros_like(target)
    return score.masked_fill(~plausible, float("-inf")), plausible


@dataclass
class Branch:
    """Rows of one batch that give one branch: prompt p is row `offset + p`."""

    batch: Batch
    offset: int
    weight: float


def _fit(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Match a branch's vocabulary width to the head's: extra ids are dropped, missing ids get the
    row's minimum (a finite floor, never -inf, so -weight * logit cannot become +inf)."""
    if logits.shape[-1] == width:
        return logits
    if logits.shape[-1] > width:
        return logits[:, :width]
    floor = logits.min(-1, keepdim=True).values.expand(-1, width - logits.shape[-1])
    return torch.cat([logits, floor], dim=-1)


def decode_contrast(job: Job, branches: list[Branch], *, head: int, alpha: float, sampling: Sampling) -> list[Result]:
    """Run the step until every prompt finishes; branch 0 (offset 0) holds the answers."""
    prompts = len(job.prompts)
    primary = branches[0]
    steps, flips, plausible_sizes = [0] * prompts, [0] * prompts, [0] * prompts
    live = list(range(prompts))
    while live:
        logits = [b.batch.next_logits([b.offset + p for p in live]) for b in branches]
        width = logits[head].shape[-1]
        logits = [_fit(x, width) for x in logits]
        score, plausible = contrast_scores(logits, [b.weight for b in branches], head=head, alpha=alpha)
        primary_rows = [primary.offset + p for p in live]
        score = primary.batch.mask_early_eos(primary_rows, score)
        chosen = choose_tokens(score, sampling, [primary.batch.generators[r] for r in primary_rows]).tolist()
        own = logits[head].argmax(-1).tolist()
        sizes = plausible.sum(-1).tolist()
        done = set()
        for i, p in enumerate(live):
            steps[p] += 1
            flips[p] += chosen[i] != own[i]
            plausible_sizes[p] += sizes[i]
        writes: dict[int, tuple[Batch, dict[int, int]]] = {}
        for b in branches:  # one append per batch: its rows of every branch go through one forward
            rows = writes.setdefault(id(b.batch), (b.batch, {}))[1]
            rows.update({b.offset + p: chosen[i] for i, p in enumerate(live)})
        for batch, rows in writes.values():
            reasons = batch.append(rows)
            done.update(batch.prompt_of[r] % prompts for r, reason in reasons.items() if reason is not None)
        for p in live:  # every chosen token is final: stream it
            job.publish(p, primary.batch.text(primary.offset + p))
        live = [p for p in live if p not in done]
    results = job.results(primary.batch, [primary.offset + p for p in range(prompts)])
    for p, result in enumerate(results):
        works = [b.batch.work[b.offset + p] for b in branches]
        passes: dict[int, int] = {}
        for b, work in zip(branches, works):  # rows of one batch share its forward passes
            passes[id(b.batch)] = max(passes.get(id(b.batch), 0), work.forward_passes)
        result.stats.update(
            forward_passes=sum(passes.values()),
            prefill_tokens=sum(w.prefill_tokens for w in works),
            decode_tokens=sum(w.decode_tokens for w in works),
            branches=len(branches),
            contrast_flips=flips[p],  # steps whose token differs from the head branch's own argmax
            plausible_mean=plausible_sizes[p] / max(steps[p], 1),
        )
    return results


# ----- configurations ---------------------------------------------------------------------------
@dataclass
class ContrastParams:
    """alpha: plausibility mask (0, 1]; beta >= 0: contrast strength; temperature 0 = greedy."""

    alpha: float = 0.1
    beta: float = 0.5
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise DecalignError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.beta >= 0:
            raise DecalignError(f"beta must be >= 0, got {self.beta}")
        self.sampling  # validates temperature and top_p

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, 0, self.top_p)


@dataclass
class ColdConfig(ContrastParams):
    """CoLD: alpha (mask on the expert), beta, amateur_temperature tau, temperature (0 = greedy), top_p."""

    amateur_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.amateur_temperature > 0:
            raise DecalignError(f"amateur_temperature must be > 0, got {self.amateur_temperature}")


def _start(job: Job, engine: Engine, prompt_ids: list, seeds: list, adapters: list[str] | None = None) -> Batch:
    """A batch whose prompts are the job's, repeated once per branch (row prompt q is job prompt q % P)."""
    batch = engine.start(prompt_ids, seeds=seeds, max_new_tokens=job.max_new_tokens,
                         min_new_tokens=job.min_new_tokens, stop_strings=job.stop, adapters=adapters)
    if job.cancelled is not None:
        batch.cancelled = lambda prompt: job.cancelled(prompt % len(job.prompts))
    return batch


def _active_adapter(job: Job, method: str) -> str:
    names = job.engine.adapter_names()
    if not names:
        raise missing_adapter(method)
    active = getattr(job.engine.model, "active_adapter", names[0])
    return active if isinstance(active, str) else names[0]


@register("cold", ColdConfig, needs_adapter=True, summary="CoLD: LoRA expert contrasted with its own base, in one batch (needs --adapter)")
def cold(job: Job, config: ColdConfig) -> list[Result]:
    adapter = _active_adapter(job, "cold")
    count = len(job.prompts)
    batch = _start(job, job.engine, job.prompt_ids * 2, job.seeds * 2, [adapter] * count + [BASE] * count)
    branches = [Branch(batch, 0, 1 + config.beta), Branch(batch, count, -config.beta / config.amateur_temperature)]
    return decode_contrast(job, branches, head=0, alpha=config.alpha, sampling=config.sampling)


@dataclass
class ContrastiveConfig(ColdConfig):
    """Contrastive decoding with a separate amateur model (same tokenizer): amateur=PATH, alpha, beta, tau."""

    amateur: str = ""


_AMATEURS: dict[str, Engine] = {}


def load_amateur(spec: str, expert: Engine) -> Engine:
    """The amateur engine (kept loaded for the next batch), refused unless its tokenizer is the expert's."""
    if not spec:
        raise DecalignError("method contrastive needs an amateur model: --param amateur=PATH")
    if spec not in _AMATEURS:
        _AMATEURS.clear()
        _AMATEURS[spec] = Engine.load(spec)
    amateur = _AMATEURS[spec]
    if amateur.tokenizer.get_vocab() != expert.tokenizer.get_vocab():
        raise DecalignError(f"amateur {spec} has a different tokenizer from the model {expert.name}; "
                            "contrastive decoding needs the same token ids")
    return amateur


@register("contrastive", ContrastiveConfig,
          summary="contrastive decoding against a smaller amateur model with the same tokenizer (amateur=PATH)")
def contrastive(job: Job, config: ContrastiveConfig) -> list[Result]:
    amateur = load_amateur(config.amateur, job.engine)
    expert = _start(job, job.engine, job.prompt_ids, job.seeds)
    weak = _start(job, amateur, job.prompt_ids, job.seeds)
    branches = [Branch(expert, 0, 1 + config.beta), Branch(weak, 0, -config.beta / config.amateur_temperature)]
    return decode_contrast(job, branches, head=0, alpha=config.alpha, sampling=config.sampling)


@dataclass
class DExpertsConfig(ContrastParams):
    """base + beta * (expert - anti-expert); expert = --adapter, anti_adapter = PATH (default: the base)."""

    beta: float = 1.0
    anti_adapter: str = ""


ANTI = "anti_expert"


@register("dexperts", DExpertsConfig, needs_adapter=True,
          summary="DExperts / proxy-tuning: base + beta * (adapter expert - anti-expert), one batch (needs --adapter)")
def dexperts(job: Job, config: DExpertsConfig) -> list[Result]:
    expert = _active_adapter(job, "dexperts")
    model, count = job.engine.model, len(job.prompts)
    loaded = False
    if config.anti_adapter:
        folder = Path(config.anti_adapter).expanduser()
        if not (folder / "adapter_model.safetensors").is_file():
            raise DecalignError(f"anti_adapter {config.anti_adapter} has no adapter_model.safetensors")
        try:
            model.load_adapter(str(folder), adapter_name=ANTI, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DecalignError(f"anti_adapter {config.anti_adapter} does not fit the model: "
                                f"{str(exc).splitlines()[0]}") from exc
        model.set_adapter(expert)
        loaded = True
    try:
        if loaded:
            names = [BASE] * count + [expert] * count + [ANTI] * count
            batch = _start(job, job.engine, job.prompt_ids * 3, job.seeds * 3, names)
            branches = [Branch(batch, 0, 1.0), Branch(batch, count, config.beta),
                        Branch(batch, 2 * count, -config.beta)]
        else:  # the anti-expert is the base itself: s_base + beta * (s_expert - s_base)
            batch = _start(job, job.engine, job.prompt_ids * 2, job.seeds * 2, [BASE] * count + [expert] * count)
            branches = [Branch(batch, 0, 1.0 - config.beta), Branch(batch, count, config.beta)]
        return decode_contrast(job, branches, head=0, alpha=config.alpha, sampling=config.sampling)
    finally:
        if loaded:
            model.delete_adapter(ANTI)
