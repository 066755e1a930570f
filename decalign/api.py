"""`generate`: the one call most users need."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from .engine import Engine, Prompt, get_engine
from .errors import DecalignError
from .methods import Job, Method, drive
from .request import Request
from .result import Result
from .rewards import Reward
from .sampling import derive_seed
from .values import load_value


def _shifted(callback: Callable | None, offset: int) -> Callable | None:
    """A per-batch callback taking the batch's prompt index, calling `callback` with the global one."""
    if callback is None:
        return None
    return lambda prompt, *args: callback(offset + prompt, *args)


def generate(
    prompts: "Prompt | Sequence[Prompt]",
    method: str = "greedy",
    model: "str | Engine | None" = None,
    adapter: str | None = None,
    reward: "str | Reward | Callable | None" = None,
    max_new_tokens: int = 128,
    min_new_tokens: int = 0,
    seed: "int | Sequence[int] | None" = None,
    *,
    system: str | None = None,
    chat: bool | None = None,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    listener: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    trust_remote_code: bool = False,
    adapter_name: str | None = None,
    **method_params: Any,
) -> list[Result]:
    """Decode every prompt with `method` and return one Result per prompt, in order.

    prompts: a string, a list of chat messages, or a list of either. Strings go through the chat
        template when the model has one (chat=None); chat=False encodes them as raw text.
    model: a Hugging Face id or local path, an Engine, or None for the embedded default.
    adapter_name: decode with this adapter of an Engine loaded with several (`Engine.load(adapters=)`);
        "__base__" for none. None: the model as loaded.
    reward: a reward spec ('sentiment', 'python:mod:fn'), a Reward, or fn(prompts, responses).
    seed: one seed (prompt i then draws from a stream derived from seed and i) or one per prompt.
    batch_size: prompts decoded together; each has its method's rows (Best-of-N: n rows).
    progress: called with the number of prompts finished after each batch.
    listener: called as listener(i, text) whenever prompt i's answer grows by text that is final
        (every token for token methods, each accepted segment for CARDS): for streaming.
    cancelled: cancelled(i) -> True stops prompt i's work early (the server's disconnects).
    method_params: the method's parameters (see `decalign methods`), e.g. n=8, temperature=0.7.
    """
    request = Request.build(
        prompts=prompts, method=method, params=method_params, reward=reward, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, seed=seed if seed is None or isinstance(seed, int) else list(seed),
        system=system, chat=chat, stop=list(stop), batch_size=batch_size, model=model, adapter=adapter,
        adapter_name=adapter_name, trust_remote_code=trust_remote_code)
    return run(request, progress=progress, listener=listener, cancelled=cancelled)


def run(
    request: Request,
    *,
    progress: Callable[[int], None] | None = None,
    listener: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> list[Result]:
    """Decode a validated request with prompts, `batch_size` prompts at a time; see `generate` for
    the callbacks. Calls on one model from several threads run one after another (each answers as
    alone); `decalign serve` is the way to decode concurrent requests together."""
    plan = _Plan(request)
    results: list[Result] = []
    with plan.engine.lock:  # calls from other threads on this model wait for this one
        for start in range(0, len(plan.prompts), request.batch_size):
            job = plan.job(slice(start, start + request.batch_size), _shifted(listener, start),
                           _shifted(cancelled, start))
            results.extend(request.spec.run(job, request.config))
            if progress is not None:
                progress(len(results))
    return results


def run_together(
    requests: Sequence[Request],
    *,
    listeners: Sequence[Callable[[int, str], None] | None] | None = None,
    cancelled: Sequence[Callable[[int], bool] | None] | None = None,
) -> list[list[Result]]:
    """Decode several requests side by side in one batch, whatever their methods, rewards, values
    and limits: every step is one forward pass for all of them. They must share a model.
    listeners / cancelled: one callback (or None) per request, as `generate` takes them."""
    listeners = listeners or [None] * len(requests)
    cancelled = cancelled or [None] * len(requests)
    methods = [start(request, listener, cancel) for request, listener, cancel in zip(requests, listeners, cancelled)]
    if len({id(m.job.engine) for m in methods}) > 1:
        raise DecalignError("requests decoded together must use the same model and adapter")
    with methods[0].job.engine.lock:
        return drive(methods[0].job.engine, methods)


def start(
    request: Request,
    listener: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> Method:
    """A request's step machine, all its prompts in one job, ready to join a `Driver` (a server's
    running batch) or `drive`."""
    plan = _Plan(request)
    return request.spec.machine(plan.job(slice(None), listener, cancelled), request.config)


class _Plan:
    """A request resolved against its engine: prompts encoded, seeds drawn, value loaded."""

    def __init__(self, request: Request) -> None:
        if request.prompts is None:
            raise DecalignError("the request has no prompts")
        self.request, self.prompts = request, request.prompts
        if request.seed is None or isinstance(request.seed, int):
            base = random.randrange(2**62) if request.seed is None else request.seed
            self.seeds = [derive_seed(base, i) for i in range(len(self.prompts))]
        else:
            self.seeds = list(request.seed)
        self.engine = get_engine(request.model, request.adapter, trust_remote_code=request.trust_remote_code)
        self.value = None
        if getattr(request.config, "value", None) is not None:
            self.value = load_value(request.config.value)
            self.value.check_engine(self.engine)
        self.encoded = [self.engine.render(p, system=request.system, chat=request.chat) for p in self.prompts]

    def job(self, part: slice, listener: Callable | None = None, cancelled: Callable | None = None) -> Job:
        request = self.request
        params = {name: getattr(request.config, name) for name in request.params}  # typed, as the method read them
        return Job(engine=self.engine, method=request.method, params=params,
                   prompts=self.prompts[part], prompt_ids=self.encoded[part], seeds=self.seeds[part],
                   reward=request.scorer, max_new_tokens=request.max_new_tokens,
                   min_new_tokens=request.min_new_tokens, stop=tuple(request.stop), listener=listener,
                   cancelled=cancelled, value=self.value, adapter=request.adapter_name)
