"""How a request asks for its decoding: the `alignment` field, OpenAI's sampling fields and the
server's defaults become one decalign `Request`, validated by the same code as the CLI's and the
Python API's (only the field names are spelled the server's way)."""

from __future__ import annotations

import functools
import re
import uuid

from ..engine import Engine, Prompt
from ..errors import DecalignError
from ..methods import get_method
from ..request import Request, RequestError
from ..rewards import Reward, load_reward
from ..sampling import derive_seed
from .config import ServerConfig
from .schemas import ApiError, GenerationOptions

OPENAI_SAMPLING = ("temperature", "top_p")
FIELD_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "reward": "alignment.reward",
               "value": "alignment.value", "seed": "seed", "stop": "stop"}


@functools.lru_cache(maxsize=8)
def shared_reward(spec: str) -> Reward | None:
    """Each reward spec is loaded once per process: requests share the loaded scorer."""
    return load_reward(spec)


def decoding_request(body: GenerationOptions, config: ServerConfig, engine: Engine, prompts: list[Prompt],
                     chat: bool) -> Request:
    """The decoding `body` asks for on `prompts` (n answers each, in OpenAI's choice order: prompt by
    prompt), checked before it is queued: ApiError (400) for a malformed `alignment` field or any
    invalid request, with decalign's own message. Each prompt's answers are the ones it would get
    alone with the same seed."""
    extra = dict(body.alignment)
    method = extra.pop("method", config.method)
    if method is None:  # OpenAI's meaning: temperature 0 is greedy; any other samples (at 1 unless given)
        method = "greedy" if body.temperature == 0 else "sample"
    reward = extra.pop("reward", config.reward)
    value = extra.pop("value", None)
    if not isinstance(method, str):
        raise ApiError(400, "alignment.method must be a string", param="alignment")
    if reward is not None and not isinstance(reward, str):
        raise ApiError(400, "alignment.reward must be a reward spec string", param="alignment")
    params = dict(config.method_params) if method == config.method else {}
    params.update(extra)
    accepted = get_method(method).parameters()
    for name in OPENAI_SAMPLING:  # OpenAI's sampling fields apply where the method has them
        if getattr(body, name) is not None and name in accepted and name not in extra:
            params[name] = getattr(body, name)
    adapter_name = served_adapter(body.model, config, engine)
    seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**62
    seeds = [seed] + [derive_seed(seed, "choice", i) for i in range(1, body.n)]  # choice 0 is the n = 1 answer
    try:
        return Request.build(prompts=[p for p in prompts for _ in range(body.n)], method=method, params=params,
                             reward=shared_reward(reward) if reward is not None else None, value=value,
                             max_new_tokens=body.max_tokens, min_new_tokens=body.min_tokens,
                             seed=seeds * len(prompts), chat=chat, stop=list(body.stop),
                             model=engine, adapter_name=adapter_name)
    except RequestError as exc:
        raise ApiError(400, str(exc.spelled(FIELD_NAMES)), param=FIELD_NAMES.get(exc.field or "")) from None
    except DecalignError as exc:  # a method's own check of its parameters, e.g. "top_p must be in (0, 1]"
        raise ApiError(400, str(exc), param=_parameter_field(str(exc), params, extra)) from None


def served_adapter(model: object, config: ServerConfig, engine: Engine) -> str | None:
    """The adapter a request's `model` names: None for the served model itself (as loaded), else one
    of the adapters loaded by name (`--adapter NAME=PATH`, or at run time); 404 for any other name
    where there are such adapters or may be (a misspelt adapter must not be answered by another
    model). A server without them serves one model under any name, as clients send whatever name
    they were configured with."""
    named = engine.named_adapters or config.allow_adapter_loading
    if not named or model is None or model == config.model_name:
        return None
    if model in engine.named_adapters:
        return str(model)
    served = ", ".join([config.model_name, *engine.named_adapters])
    raise ApiError(404, f"model {model!r} is not served here; ask for one of: {served}", param="model",
                   code="model_not_found")


def _parameter_field(message: str, params: dict, extra: dict) -> str | None:
    """The request field of the first parameter the message names: OpenAI's own field for its sampling
    fields given there, else alignment.NAME."""
    named = next((word for word in re.findall(r"\w+", message) if word in params), None)
    if named is None:
        return None
    return named if named in OPENAI_SAMPLING and named not in extra else f"alignment.{named}"
