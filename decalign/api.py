"""`generate`: the one call most users need."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from .engine import Engine, Prompt
from .errors import DecalignError
from .methods import Job, get_method, make_config, missing_adapter
from .result import Result
from .rewards import Reward, load_reward
from .sampling import derive_seed

_ENGINES: dict[tuple, Engine] = {}


def get_engine(model: "str | Engine | None" = None, adapter: str | None = None, *,
               trust_remote_code: bool = False) -> Engine:
    """The engine for a model spec, loaded once per process (the last one is kept)."""
    if isinstance(model, Engine):
        if adapter is not None:
            raise DecalignError("pass the adapter when loading the Engine, not with an Engine instance")
        return model
    key = (model, adapter, trust_remote_code)
    if key not in _ENGINES:
        _ENGINES.clear()  # one policy in memory at a time
        _ENGINES[key] = Engine.load(model, adapter, trust_remote_code=trust_remote_code)
    return _ENGINES[key]


def _as_prompt_list(prompts: "Prompt | Sequence[Prompt]") -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts):
        return [prompts]  # one conversation
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise DecalignError("prompts must be a string, a message list, or a non-empty list of them")
    return list(prompts)


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
    **method_params: Any,
) -> list[Result]:
    """Decode every prompt with `method` and return one Result per prompt, in order.

    prompts: a string, a list of chat messages, or a list of either. Strings go through the chat
        template when the model has one (chat=None); chat=False encodes them as raw text.
    model: a Hugging Face id or local path, an Engine, or None for the embedded default.
    reward: a reward spec ('sentiment', 'python:mod:fn'), a Reward, or fn(prompts, responses).
    seed: one seed (prompt i then draws from a stream derived from seed and i) or one per prompt.
    batch_size: prompts decoded together; each has its method's rows (Best-of-N: n rows).
    progress: called with the number of prompts finished after each batch.
    listener: called as listener(i, text) whenever prompt i's answer grows by text that is final
        (every token for token methods, each accepted segment for CARDS): for streaming.
    cancelled: cancelled(i) -> True stops prompt i's work early (the server's disconnects).
    method_params: the method's parameters (see `decalign methods`), e.g. n=8, temperature=0.7.
    """
    spec = get_method(method)
    config = make_config(method, method_params)
    if max_new_tokens < 1:
        raise DecalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise DecalignError(f"batch_size must be >= 1, got {batch_size}")
    prompt_list = _as_prompt_list(prompts)
    scorer = load_reward(reward)
    if spec.needs_reward and scorer is None:
        raise DecalignError(f"method {method} needs a reward (--reward), e.g. sentiment")
    if spec.needs_adapter and adapter is None and not (isinstance(model, Engine) and model.adapter_names()):
        raise missing_adapter(method)
    if seed is None or isinstance(seed, int):
        base = random.randrange(2**62) if seed is None else seed
        seeds = [derive_seed(base, i) for i in range(len(prompt_list))]
    else:
        seeds = list(seed)
        if len(seeds) != len(prompt_list):
            raise DecalignError(f"{len(seeds)} seeds for {len(prompt_list)} prompts")
    engine = get_engine(model, adapter, trust_remote_code=trust_remote_code)
    value = None
    if getattr(config, "value", None) is not None:
        from .values import load_value

        value = load_value(config.value)
        value.check_engine(engine)
    encoded = [engine.render(p, system=system, chat=chat) for p in prompt_list]
    results: list[Result] = []
    for start in range(0, len(prompt_list), batch_size):
        chunk = slice(start, start + batch_size)
        job = Job(engine=engine, method=method, params=dict(method_params), prompts=prompt_list[chunk],
                  prompt_ids=encoded[chunk], seeds=seeds[chunk], reward=scorer,
                  max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stop=tuple(stop),
                  listener=_shifted(listener, start), cancelled=_shifted(cancelled, start), value=value)
        results.extend(spec.run(job, config))
        if progress is not None:
            progress(len(results))
    return results
