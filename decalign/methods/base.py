"""What every decoding method is made of, and the driver that runs them.

A method is a *step machine* over rows of a shared batch. The driver opens one batch for every
method it runs (each method says which prompts it needs and how many rows each), then repeats:

    moves = every live method's moves()      what its rows do this step (sample a token, write one)
    batch.advance(moves)                     one forward pass for all of them
    every live method's react()              score, crop, fork, accept, finish

until each method has a Result per prompt. Rows of finished work leave the batch when they pile up.
A method's parameters are its config's fields (with help text in their metadata); the same names
serve the Python API, the CLI (`--param n=8`), inline specs (`bon:n=8`) and the server.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..engine import Batch, BatchPrompt, Engine, Move, Prompt, Sample
from ..errors import DecalignError
from ..options import parse_options
from ..result import Candidate, Result
from ..rewards import Reward
from ..sampling import Sampling
from ..values import ValueHead


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type
    machine: type["Method"]
    needs_reward: bool
    summary: str
    needs_adapter: bool = False

    def parameters(self) -> dict[str, Any]:
        """Parameter names with their defaults."""
        return {f.name: f.default for f in dataclasses.fields(self.config)}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each parameter's default, type and help text (from the config's field metadata): what
        `decalign methods`, `--param` and the server's /v1/methods show."""
        hints = typing.get_type_hints(self.config)
        return {f.name: {"default": f.default, "type": _type_name(hints[f.name]), "help": f.metadata.get("help", "")}
                for f in dataclasses.fields(self.config)}

    def run(self, job: "Job", config: Any) -> list[Result]:
        """Decode one job alone."""
        return drive(job.engine, [self.machine(job, config)])[0]


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type, *, needs_reward: bool = False, needs_adapter: bool = False, summary: str = ""):
    """Class decorator: make a Method available under `name` with its config."""
    def wrap(machine: type["Method"]) -> type["Method"]:
        METHODS[name] = MethodSpec(name, config, machine, needs_reward, summary or (machine.__doc__ or "").strip(),
                                   needs_adapter)
        return machine

    return wrap


def param(default: Any, help: str) -> Any:
    """A method parameter: its default and the help text every front end shows."""
    return field(default=default, metadata={"help": help})


def _type_name(kind: Any) -> str:
    options = [o for o in typing.get_args(kind) if o is not type(None)] or [kind]
    name = " | ".join(getattr(o, "__name__", str(o)) for o in options)
    return name + (" | None" if type(None) in typing.get_args(kind) else "")


def missing_adapter(method: str) -> DecalignError:
    return DecalignError(f"method {method} needs a LoRA adapter: pass --adapter PATH (adapter=PATH in Python)")


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise DecalignError(f"unknown method {name!r}; choose from: {', '.join(method_names())}")
    return METHODS[name]


def _convert(method: str, name: str, kind: Any, value: Any) -> Any:
    """A parameter in its field's type: given as text (CLI, inline spec; 'none' for optional ones), or
    as a Python or JSON value of that type (an int for a float; a whole float such as 8.0 for an int)."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)
    optional = type(None) in options
    kind = next(option for option in options if option is not type(None))
    if optional and isinstance(value, str) and value.strip().lower() == "none":
        return None
    if not isinstance(value, str) or kind is str:
        return _typed(method, name, kind, value, optional)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise DecalignError(f"method {method}: parameter {name} must be {kind.__name__}, got {value!r}") from None


def _typed(method: str, name: str, kind: Any, value: Any, optional: bool) -> Any:
    """A parameter given as a value, checked against (and for numbers converted to) its field's type."""
    if value is None and optional or kind not in (int, float, bool, str):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise DecalignError(f"method {method}: parameter {name} must be {kind.__name__}, got {value!r}")
    return value


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
    for name, value in values.items():  # nan slips through every "must be > x" check; inf makes nonsense
        if isinstance(value, float) and not math.isfinite(value):
            raise DecalignError(f"method {method}: parameter {name} must be a finite number, got {value}")
    try:
        return spec.config(**values)
    except (TypeError, ValueError) as exc:
        raise DecalignError(f"method {method}: {exc}") from exc


def parse_method_spec(text: str) -> tuple[str, dict[str, str]]:
    """'bon:n=8:temperature=0.7' -> ('bon', {'n': '8', 'temperature': '0.7'})."""
    name, *parts = text.strip().split(":")  # a method name never holds ':'
    params = parse_options(parts, what=f"method {name}", example="bon:n=8", strip=True)
    make_config(name, params)  # validate now, with the method's own error messages
    return name, params


@dataclass
class SamplingParams:
    """The sampling knobs shared by every sampling method."""

    temperature: float = param(1.0, "sampling temperature (>= 0; 0 = the most likely token)")
    top_k: int = param(0, "keep the k most likely tokens (0 = off)")
    top_p: float = param(1.0, "nucleus: keep the most likely tokens up to this probability mass (1 = off)")

    def __post_init__(self) -> None:
        self.sampling  # validates

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


@dataclass
class SearchParams(SamplingParams):
    """What every search method takes: the sampling knobs, a budget (the candidates it may keep alive
    per prompt: one axis for the compute frontier) and a prefix value for partial answers."""

    budget: int = param(8, "candidates kept alive per prompt")
    value: str | None = param(None, "prefix value (shipped name or folder) scoring partial answers; the reward "
                                    "scores finished ones")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_counts("budget")

    def require_counts(self, *names: str) -> None:
        """Each named parameter is a count: at least 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise DecalignError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Job:
    """One method's prompts with their budgets, reward and per-prompt counters.

    In a batch shared with other jobs, the job's prompts start at batch prompt `prompt_base`: the
    job speaks of its own prompt numbers (0..P-1), `prompt_of` and `work` translate."""

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
    value_items: list[int] = field(default_factory=list)  # partial answers the value scored
    started: float = field(default_factory=time.perf_counter)
    listener: Callable[[int, str], None] | None = None  # (prompt, text that will not change): streaming
    cancelled: Callable[[int], bool] | None = None  # prompt -> stop its work (its client has gone)
    value: ValueHead | None = None  # scores partial answers from the policy's states (methods with value=)
    prompt_base: int = 0  # the batch prompt number of the job's prompt 0
    adapter: str | None = None  # the loaded adapter its rows run with (BASE: none; None: the model as loaded)

    def __post_init__(self) -> None:
        self.reward_items = [0] * len(self.prompts)
        self.value_items = [0] * len(self.prompts)

    def batch_prompt(self, prompt_ids: list[int], seed: int, rows: int, adapter: str | None = None) -> BatchPrompt:
        """A prompt of the shared batch under this job's limits (and tracked states, for its value),
        its rows run with `adapter` (default: the job's)."""
        return BatchPrompt(ids=prompt_ids, seed=seed, rows=rows, adapter=self.adapter if adapter is None else adapter,
                           max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                           stop_strings=tuple(self.stop),
                           state_layers=tuple(self.value.layers) if self.value is not None else ())

    def prompt_of(self, batch: Batch, row: int) -> int:
        """The job's prompt number of a batch row."""
        return batch.prompt_of[row] - self.prompt_base

    def is_cancelled(self, prompt: int) -> bool:
        return self.cancelled is not None and self.cancelled(prompt)

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
            scores.update(zip(finished, self.score([self.prompt_of(batch, r) for r in finished],
                                                   [batch.text(r) for r in finished])))
        if partial and self.value is not None:
            scores.update(zip(partial, self.value.score_rows(batch, partial)))
            for r in partial:
                self.value_items[self.prompt_of(batch, r)] += 1
        elif partial:
            scores.update(zip(partial, self.score([self.prompt_of(batch, r) for r in partial],
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
        work = batch.work[self.prompt_base + p]
        stats = {
            "wall_time": time.perf_counter() - self.started,
            "batch_size": len(self.prompts),
            "forward_passes": work.forward_passes,
            "prefill_tokens": work.prefill_tokens,
            "decode_tokens": work.decode_tokens,
            "generated_tokens": work.generated_tokens,
            "discarded_tokens": work.generated_tokens - len(answer.tokens),
            "reward_calls": self.reward_items[p],
            "value_calls": self.value_items[p],
            **(extra_stats or {}),
        }
        return Result(text=answer.text, tokens=answer.tokens, reward=answer.reward, stats=stats,
                      method=self.method, params=dict(self.params), finish_reason=answer.finish_reason or "length",
                      candidates=candidates, trace=trace, logprobs=list(logprobs))


class Method:
    """A decoding method as a step machine over its rows of a (shared) batch.

    Subclasses say which prompts they need (`batch_prompts`, default: each job prompt with
    `rows_per_prompt` rows), take their rows in `begin`, and then at every step return their
    `moves` and `react` to what the step wrote. `results[p]` is set when prompt p is answered."""

    streams_tokens = False  # every token it writes is final: publish the text as each one is written

    def __init__(self, job: Job, config: Any) -> None:
        self.job, self.config = job, config
        self.batch: Batch | None = None
        self.results: list[Result | None] = [None] * len(job.prompts)
        self.closed = False  # close() has run (the Driver calls it once)

    def rows_per_prompt(self) -> int:
        return 1

    def batch_prompts(self) -> list[BatchPrompt]:
        rows = self.rows_per_prompt()
        return [self.job.batch_prompt(ids, seed, rows) for ids, seed in zip(self.job.prompt_ids, self.job.seeds)]

    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        """Take the rows of each of its batch prompts (in `batch_prompts` order)."""
        raise NotImplementedError

    def moves(self) -> list[Move]:
        """What its rows do at this step."""
        raise NotImplementedError

    def react(self) -> None:
        """After the step: score, crop, fork, accept, finish."""
        raise NotImplementedError

    def live_rows(self) -> list[int]:
        """Rows it still needs (the others may leave the batch)."""
        raise NotImplementedError

    def remap(self, new_row: dict[int, int]) -> None:
        """Rows were renumbered (old -> new) when finished rows left the batch."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what `batch_prompts` or `begin` took (e.g. a loaded adapter); called once, always."""

    def cancelled(self, prompt: int) -> bool:
        """Whether batch prompt `prompt` (numbered from the job's base) has lost its client."""
        return self.job.is_cancelled(prompt % len(self.job.prompts))

    @property
    def done(self) -> bool:
        return all(result is not None for result in self.results)


class Search(Method):
    """A search method (config: SearchParams): `budget` rows per prompt, each writing stretches
    (`open`) that are scored and kept or dropped, never cropped."""

    def rows_per_prompt(self) -> int:
        return self.config.budget

    def open(self, rows: list[int]) -> None:
        """A new stretch on each row, in `self.segments` (row -> Segment)."""
        self.segments.update(zip(rows, self.batch.open_segments(rows, croppable=False)))

    def stretch(self, rows: Iterable[int], tokens: int) -> list[Move]:
        """The move that writes up to `tokens` more on each row whose stretch is still open."""
        running = [self.segments[r] for r in rows if not self.segments[r].reason]
        return [Sample(running, self.config.sampling, max_tokens=tokens)] if running else []

    def stretched(self, rows: Iterable[int]) -> bool:
        """Whether every row's stretch has ended (it reached its length, or the answer ended)."""
        return all(self.segments[r].reason for r in rows)

    def branch(self, copies: dict[int, int]) -> dict[int, int]:
        """Repeat each row r of a group copies[r] times (0: drop it), in place: a kept row stays where it
        is and its extra copies take dropped rows' places, so the group never grows. Returns the rows
        in use, each mapped to the row it copies (itself for the originals)."""
        if sum(copies.values()) > len(copies):
            raise DecalignError(f"{sum(copies.values())} copies do not fit in {len(copies)} rows")
        free = [r for r, count in copies.items() if count == 0]
        source: dict[int, int] = {}
        for row, count in copies.items():
            if count:
                extra = [free.pop() for _ in range(count - 1)]
                self.batch.copy_row(row, extra)
                source.update({row: row, **{r: row for r in extra}})
        return dict(sorted(source.items()))

    def move_segments(self, new_row: dict[int, int]) -> None:
        """Renumber the kept rows' segments after finished rows left the batch (see `remap`)."""
        self.segments = {new_row[r]: s for r, s in self.segments.items() if r in new_row}
        for row, segment in self.segments.items():
            segment.row = row


class Driver:
    """Runs methods side by side on one batch, one forward pass per step. Methods may join between
    steps (continuous batching): their prompts are checked when they are added, encoded in the next
    step's forward pass (beside the running rows' tokens), and their rows join the batch there.

    A method whose own code fails (its reward raises, say) leaves with the error in `failed`; the
    others go on. Rows of finished methods leave the batch once a quarter of the rows are idle (and
    their prompts with them), and the batch itself is let go when no method is left."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batch: Batch | None = None
        self.owners: list[Method | None] = []  # batch prompt -> its method (None once released)
        self.live: list[Method] = []
        self.failed: dict[Method, Exception] = {}
        self._planned: dict[Method, list[BatchPrompt]] = {}  # batch prompts of methods that failed to join
        self.joining: dict[Method, list[BatchPrompt]] = {}  # added since the last step, with their batch prompts

    def add(self, methods: Sequence[Method], *, now: bool = False) -> None:
        """Start methods: with no batch running, at once; otherwise their rows join at the next step,
        their prompts encoded in its pass, or with `now` at once, in a pass of their own (so that
        their first tokens come at the next step's draw rather than a step later). If their prompts
        cannot join, nothing changes and a later `add` of the same methods reuses their batch prompts
        (asking a method twice could, e.g., load its adapters twice)."""
        wanted = [self._planned.pop(m) if m in self._planned else m.batch_prompts() for m in methods]
        prompts = [prompt for batch_prompts in wanted for prompt in batch_prompts]
        opening = self.batch is None
        try:
            if opening:
                batch, first_row = self.engine.open(prompts), 0
            elif now:
                batch, first_row = self.batch, self.batch.admit(prompts)
            else:
                Batch.check_prompts(self.engine, prompts)  # a prompt that cannot join fails here, alone
                self.joining.update(zip(methods, wanted))
                return
        except BaseException:
            self._planned.update(zip(methods, wanted))
            raise
        if opening:
            self.owners = []
            batch.on_token = lambda row, _: _stream(self.owners[batch.prompt_of[row]], batch, row)
            self.batch = batch
        self._begin(methods, wanted, first_row)
        for m in methods:
            if m.done or m in self.failed:
                self.release(m)
            else:
                self.live.append(m)

    def is_running(self, method: Method) -> bool:
        """Whether `method` decodes in the batch or joins it at the next step."""
        return method in self.live or method in self.joining

    def _begin(self, methods: Sequence[Method], wanted: list[list[BatchPrompt]], first_row: int) -> None:
        """Hand joined methods their rows (their batch prompts' rows follow on from `first_row`)."""
        if self.batch.cancelled is None and any(m.job.cancelled is not None for m in methods):
            # asked per row at every step, so only once some method can be cancelled
            self.batch.cancelled = self._cancelled
        for m, batch_prompts in zip(methods, wanted):
            m.job.prompt_base, m.batch = len(self.owners), self.batch
            self.owners += [m] * len(batch_prompts)
            rows = []
            for prompt in batch_prompts:
                rows.append(list(range(first_row, first_row + prompt.rows)))
                first_row += prompt.rows
            self._guarded(m, m.begin, self.batch, rows)

    def step(self) -> list[Method]:
        """One forward pass for every live method and the prompts of methods added since the last
        step, then each live method reacts and the added ones begin; returns those that left (done or
        failed), closed."""
        moves = []
        for m in self.live:
            moves += self._guarded(m, m.moves) or []
        methods, wanted = list(self.joining), list(self.joining.values())
        self.joining = {}
        prompts = [prompt for batch_prompts in wanted for prompt in batch_prompts]
        first_row = self.batch.advance(moves, joining=self.batch.prepare_join(prompts) if prompts else None)
        for m in self.live:
            if m not in self.failed:
                self._guarded(m, m.react)
        if methods:
            self._begin(methods, wanted, first_row)
            self.live += methods
        left = [m for m in self.live if m.done or m in self.failed]
        self.live = [m for m in self.live if m not in left]
        for m in left:
            self.release(m)
        if not self.live:
            self.batch.close()  # nothing left to decode: its cache goes now, not at a later collection
            self.batch = None
        else:
            self._drop_idle_rows()
        return left

    def _guarded(self, method: Method, call: Callable, *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - one method's failure is its own, not the batch's
            self.failed[method] = exc
            return None

    def _drop_idle_rows(self) -> None:
        needed = [r for m in self.live for r in m.live_rows()]
        if needed and 4 * (self.batch.size - len(needed)) >= self.batch.size:  # a quarter idle
            new_row = {old: new for new, old in enumerate(needed)}
            self.batch.select(needed)
            for m in self.live:
                m.remap(new_row)
            owned = [q for q, owner in enumerate(self.owners) if owner is not None]  # released methods' go
            new_prompt = self.batch.keep_prompts(owned)
            self.owners = [self.owners[q] for q in owned]
            for m in self.live:
                m.job.prompt_base = new_prompt[m.job.prompt_base]

    def _cancelled(self, prompt: int) -> bool:
        owner = self.owners[prompt]
        return owner is not None and owner.cancelled(prompt - owner.job.prompt_base)

    def release(self, method: Method) -> None:
        """Close a method once (it frees what it took, e.g. a loaded adapter) and let go of it: a
        long-running batch (a busy server's) must not keep every answered method, its results and the
        batches it ran in alive."""
        self._planned.pop(method, None)
        self.joining.pop(method, None)
        prompt = method.job.prompt_base  # its batch prompts follow on from there (none if it never joined)
        while prompt < len(self.owners) and self.owners[prompt] is method:
            self.owners[prompt] = None
            prompt += 1
        if not method.closed:
            method.closed = True
            method.close()


def drive(engine: Engine, methods: Sequence[Method]) -> list[list[Result]]:
    """Run methods side by side on one batch until all are answered; their Results, in order. The
    first method's error, if one fails, is raised."""
    driver = Driver(engine)
    try:
        driver.add(methods)
        while driver.live:
            driver.step()
    finally:
        for m in methods:
            driver.release(m)
    for m in methods:
        if m in driver.failed:
            raise driver.failed[m]
    return [list(m.results) for m in methods]


def _stream(method: Method, batch: Batch, row: int) -> None:
    if method.streams_tokens and method.job.listener is not None:
        method.job.publish(method.job.prompt_of(batch, row) % len(method.job.prompts), batch.text(row))
