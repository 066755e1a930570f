"""Decoding methods: one module each, a config dataclass plus a run function, found by name.

A method receives a `Job` (the engine, the prompts, the reward, the budgets) and drives the
engine's batch through propose / score / decide steps. Parameters are the config's fields, and
the same names are used by the Python API, the CLI (`--param n=8`) and inline specs (`bon:n=8`).
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..engine import Batch, Engine, Prompt
from ..errors import DecalignError
from ..result import Candidate, Result
from ..rewards import Reward

if typing.TYPE_CHECKING:
    from ..values import ValueHead


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type
    run: Callable[["Job", Any], list[Result]]
    needs_reward: bool
    summary: str
    needs_adapter: bool = False

    def parameters(self) -> dict[str, Any]:
        """Parameter names with their defaults."""
        return {f.name: f.default for f in dataclasses.fields(self.config)}


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type, *, needs_reward: bool = False, needs_adapter: bool = False, summary: str = ""):
    def wrap(run: Callable[["Job", Any], list[Result]]):
        METHODS[name] = MethodSpec(name, config, run, needs_reward, summary or (run.__doc__ or "").strip(),
                                   needs_adapter)
        return run

    return wrap


def missing_adapter(method: str) -> DecalignError:
    return DecalignError(f"method {method} needs a LoRA adapter: pass --adapter PATH (adapter=PATH in Python)")


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise DecalignError(f"unknown method {name!r}; choose from: {', '.join(method_names())}")
    return METHODS[name]


def _convert(method: str, name: str, kind: Any, value: Any) -> Any:
    """A parameter given as text (CLI, inline spec) in its field's type; 'none' for optional ones."""
    if not isinstance(value, str):
        return value
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)
    if type(None) in options and value.strip().lower() == "none":
        return None
    kind = next(option for option in options if option is not type(None))
    if kind is str:
        return value
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise DecalignError(f"method {method}: parameter {name} must be {kind.__name__}, got {value!r}") from None


def make_config(method: str, params: dict[str, Any]) -> Any:
    """The method's config from user parameters (strings are converted to the field's type)."""
    spec = get_method(method)
    hints = typing.get_type_hints(spec.config)
    valid = spec.parameters()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "none"
        hint = ""
        if "value" in unknown:
            takers = ", ".join(name for name in method_names() if "value" in METHODS[name].parameters())
            hint = f" (a prefix value is taken by: {takers})"
        raise DecalignError(f"method {method} has no parameter {', '.join(unknown)}; its parameters: {choices}{hint}")
    values = {name: _convert(method, name, hints[name], value) for name, value in params.items()}
    try:
        return spec.config(**values)
    except (TypeError, ValueError) as exc:
        raise DecalignError(f"method {method}: {exc}") from exc


def parse_method_spec(text: str) -> tuple[str, dict[str, str]]:
    """'bon:n=8:temperature=0.7' -> ('bon', {'n': '8', 'temperature': '0.7'})."""
    name, *parts = text.strip().split(":")
    params: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise DecalignError(f"bad method parameter {part!r} in {text!r}; write name=value, e.g. bon:n=8")
        params[key.strip()] = value.strip()
    make_config(name, params)  # validate now, with the method's own error messages
    return name, params


@dataclass
class SamplingParams:
    """The sampling knobs shared by every sampling method."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        self.sampling  # validates

    @property
    def sampling(self):
        from ..sampling import Sampling

        return Sampling(self.temperature, self.top_k, self.top_p)


@dataclass
class Job:
    """One batch of prompts for one method: the engine, budgets, reward, and per-prompt counters."""

    engine: Engine
    method: str
    params: dict
    prompts: Sequence[Prompt]
    prompt_ids: list[list[int]]
    seeds: list[int]
    reward: Reward | None = None
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    reward_items: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    listener: Callable[[int, str], None] | None = None  # (prompt, text that will not change): streaming
    cancelled: Callable[[int], bool] | None = None  # prompt -> stop its work (its client has gone)
    value: "ValueHead | None" = None  # scores partial answers from the policy's states (methods with value=)

    def __post_init__(self) -> None:
        self.reward_items = [0] * len(self.prompts)

    def start(self, n: int = 1, *, stream_tokens: bool = False, **options: Any) -> Batch:
        """Open the batch; with stream_tokens every written token is final and is published."""
        if self.value is not None:
            options.setdefault("state_layers", self.value.layers)
        batch = self.engine.start(self.prompt_ids, n=n, seeds=self.seeds, max_new_tokens=self.max_new_tokens,
                                  min_new_tokens=self.min_new_tokens, stop_strings=self.stop, **options)
        batch.cancelled = self.cancelled
        if stream_tokens and self.listener is not None:
            batch.on_token = lambda row, _: self.publish(batch.prompt_of[row], batch.text(row))
        return batch

    def publish(self, prompt: int, text: str) -> None:
        if self.listener is not None:
            self.listener(prompt, text)

    def score(self, prompt_indices: Sequence[int], texts: Sequence[str], *, prefix: bool = False) -> list[float]:
        """Score texts against their prompts with the job's reward (its prefix scorer for partial
        answers), counting items per prompt."""
        if self.reward is None:
            raise DecalignError(f"method {self.method} needs a reward")
        scorer = self.reward.score_prefix if prefix else self.reward.score
        scores = scorer([self.prompts[p] for p in prompt_indices], list(texts))
        for p in prompt_indices:
            self.reward_items[p] += 1
        return scores

    def evaluate(self, batch: Batch, rows: Sequence[int]) -> list[float]:
        """Scores of rows' answers as they stand: finished answers by the reward; partial ones by the
        value when the job has one (a dot product on the batch's states), else by the reward's prefix
        scorer."""
        scores: dict[int, float] = {}
        finished = [r for r in rows if batch.finish[r] is not None]
        partial = [r for r in rows if batch.finish[r] is None]
        if finished:
            scores.update(zip(finished, self.score([batch.prompt_of[r] for r in finished],
                                                   [batch.text(r) for r in finished])))
        if partial and self.value is not None:
            scores.update(zip(partial, self.value.score_rows(batch, partial)))
        elif partial:
            scores.update(zip(partial, self.score([batch.prompt_of[r] for r in partial],
                                                  [batch.text(r) for r in partial], prefix=True)))
        return [scores[r] for r in rows]

    def candidate(self, batch: Batch, row: int, reward: float | None = None) -> Candidate:
        return Candidate(batch.text(row), list(batch.tokens[row]), reward, batch.finish[row] or "")

    def results(
        self,
        batch: Batch,
        rows: Sequence[int],
        *,
        rewards: Sequence[float | None] | None = None,
        candidates: Sequence[list[Candidate] | None] | None = None,
    ) -> list[Result]:
        """One Result per prompt, prompt p answered by row rows[p] of the batch."""
        return [
            self.result(p, batch, self.candidate(batch, row, rewards[p] if rewards is not None else None),
                        batch.logprobs[row], candidates=candidates[p] if candidates is not None else None)
            for p, row in enumerate(rows)
        ]

    def result(self, p: int, batch: Batch, answer: Candidate, logprobs: list[float], *,
               candidates: list[Candidate] | None = None, trace: list[dict] | None = None,
               extra_stats: dict | None = None) -> Result:
        """Prompt p's Result: its answer plus the work the batch did for it."""
        work = batch.work[p]
        stats = {
            "wall_time": time.perf_counter() - self.started,
            "batch_size": len(self.prompts),
            "forward_passes": work.forward_passes,
            "prefill_tokens": work.prefill_tokens,
            "decode_tokens": work.decode_tokens,
            "generated_tokens": work.generated_tokens,
            "discarded_tokens": work.generated_tokens - len(answer.tokens),
            "reward_calls": self.reward_items[p],
            **(extra_stats or {}),
        }
        return Result(text=answer.text, tokens=answer.tokens, reward=answer.reward, stats=stats,
                      method=self.method, params=dict(self.params), finish_reason=answer.finish_reason or "length",
                      candidates=candidates, trace=trace, logprobs=list(logprobs))


# Importing the method modules registers them.
from . import args, bon, cards, greedy, rs, sample  # noqa: E402,F401
from . import cold  # noqa: E402,F401
