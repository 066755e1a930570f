"""One request type for decoding: what to decode and how, validated once.

The CLI, the Python API, the server, bench and eval-task all build a `Request`; its validation is
the only place a request is checked, so a bad request gets the same one-line message everywhere
(each front end only spells the field its own way: `max_new_tokens` in Python, `--max-new-tokens`
on the command line, `max_tokens` on the server).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .engine import BASE, Prompt
from .errors import DecalignError
from .methods import MethodSpec, get_method, make_config, missing_adapter
from .models import resolve_model_path
from .rewards import Reward, load_reward

class RequestError(DecalignError):
    """A wrong request field. The message is a template naming the field as `{field}`, so each front
    end can spell it its own way and still say the same thing."""

    def __init__(self, field: str | None, template: str) -> None:
        self.field, self.template = field, template
        super().__init__(template.format(field=field))

    def spelled(self, names: dict[str, str]) -> DecalignError:
        """The same message with the field named as a front end calls it (e.g. --max-new-tokens)."""
        if self.field is None or self.field not in names:
            return self
        return DecalignError(self.template.format(field=names[self.field]))


def option_names() -> dict[str, str]:
    """Request fields as command-line options spell them (max_new_tokens -> --max-new-tokens)."""
    return {name: "--" + name.replace("_", "-") for name in Request.model_fields}


def as_prompt_list(prompts: Any) -> list[Prompt]:
    """A string, one conversation (a list of messages), or a list of either, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts):
        return [prompts]  # one conversation
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise DecalignError("prompts must be a string, a message list, or a non-empty list of them")
    return list(prompts)


class Request(BaseModel):
    """What to decode (prompts) and how (method, parameters, reward, value, limits, seed)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    prompts: list[Any] | None = Field(None, description="Prompts: strings or chat message lists (None: given later).")
    method: str = Field("greedy", description="Decoding method (see `decalign methods`).")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's parameters, e.g. {'n': 8}.")
    reward: Any = Field(None, description="Reward spec ('harmless', 'a + 0.5*b'), a Reward, or fn(prompts, answers).")
    value: str | None = Field(None, description="Prefix value (shipped name or folder) for methods that take one.")
    max_new_tokens: int = Field(128, description="Most tokens per answer.")
    min_new_tokens: int = Field(0, description="End-of-text is refused, and stop strings are not matched, "
                                               "before this many tokens (vLLM's min_tokens).")
    seed: int | list[int] | None = Field(None, description="One seed, or one per prompt; None draws one.")
    system: str | None = Field(None, description="System message (chat models).")
    chat: bool | None = Field(None, description="Use the chat template (None: when the model has one).")
    stop: list[str] = Field(default_factory=list, description="Stop strings: the answer ends before them.")
    batch_size: int = Field(8, description="Prompts decoded together.")
    model: Any = Field(None, description="HF model id or folder, an Engine, or None for the embedded default.")
    adapter: str | None = Field(None, description="PEFT LoRA adapter folder.")
    adapter_name: str | None = Field(None, description="The name of an adapter loaded on the model (an Engine's "
                                                       "`adapters`) that the answers are decoded with; '__base__': "
                                                       "none. None: the model as loaded.")
    trust_remote_code: bool = Field(False, description="Allow the model's own code.")

    _spec: MethodSpec = PrivateAttr()
    _config: Any = PrivateAttr()
    _scorer: Reward | None = PrivateAttr(None)

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompt_list(cls, prompts: Any) -> list[Prompt] | None:
        return None if prompts is None else as_prompt_list(prompts)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):  # it would end every answer at its first token
            raise ValueError("must not hold an empty string")
        return stop

    @field_validator("max_new_tokens", "batch_size")
    @classmethod
    def _positive(cls, number: int) -> int:
        if number < 1:
            raise ValueError(f"must be >= 1, got {number}")
        return number

    @model_validator(mode="after")
    def _resolve(self) -> "Request":
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise RequestError("min_new_tokens",
                               f"{{field}} must be from 0 to the answer's maximum length ({self.max_new_tokens} "
                               f"tokens), got {self.min_new_tokens}")
        self._spec = get_method(self.method)
        params = dict(self.params)
        if self.value is not None:
            params["value"] = self.value
        self._config = make_config(self.method, params)
        self._scorer = load_reward(self.reward)
        if self._spec.needs_reward and self._scorer is None:
            raise RequestError("reward", f"method {self.method} needs a reward: set {{field}}, e.g. sentiment")
        if self.adapter_name is not None:
            names = getattr(self.model, "adapter_names", None)
            loaded = names() if callable(names) else None
            if loaded is not None and self.adapter_name not in [*loaded, BASE]:
                problem = f"no adapter named {self.adapter_name} on the model (loaded: {', '.join(loaded) or 'none'})"
                raise RequestError("adapter_name", "{field}: " + problem.replace("{", "{{").replace("}", "}}"))
        if self._spec.needs_adapter and self.adapter is None and not self._model_has_adapter():
            raise missing_adapter(self.method)
        if isinstance(self.model, str):
            resolve_model_path(self.model)
        if self.prompts is not None and isinstance(self.seed, list) and len(self.seed) != len(self.prompts):
            raise RequestError("seed", f"{len(self.seed)} seeds for {len(self.prompts)} prompts")
        return self

    def _model_has_adapter(self) -> bool:
        """Whether the answers are decoded with an adapter: the one named, else the model's as loaded."""
        if self.adapter_name is not None:
            return self.adapter_name != BASE
        active = getattr(self.model, "active_adapter", None)
        return callable(active) and active() != BASE

    @classmethod
    def build(cls, **fields: Any) -> "Request":
        """A validated request, or a one-line RequestError naming the first wrong field."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise _first_problem(exc) from None

    @classmethod
    def from_options(cls, **fields: Any) -> "Request":
        """`build` for a command line: a wrong field is named as its option (--max-new-tokens)."""
        try:
            return cls.build(**fields)
        except RequestError as exc:
            raise exc.spelled(option_names()) from None

    @property
    def spec(self) -> MethodSpec:
        return self._spec

    @property
    def config(self) -> Any:
        """The method's config, built from `params` (and `value`)."""
        return self._config

    @property
    def scorer(self) -> Reward | None:
        """The loaded reward."""
        return self._scorer

    def with_prompts(self, prompts: Any, seed: int | list[int] | None = None, **changes: Any) -> "Request":
        """The same decoding (with `changes`) for other prompts and seeds, checked again; the loaded
        reward is reused."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return Request.build(**{**fields, "prompts": prompts, "seed": seed, "reward": self._scorer, **changes})


def _first_problem(exc: ValidationError) -> DecalignError:
    """pydantic's first error as our one-line message."""
    error = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in error["loc"]) or None
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, DecalignError):
        return cause
    if error["type"] == "value_error" and cause is not None:
        return RequestError(field, "{field} " + str(cause))
    if error["type"] == "extra_forbidden":
        return RequestError(field, "unknown request field {field}")
    message = error["msg"][0].lower() + error["msg"][1:]
    return RequestError(field, "{field}: " + f"{message}, got {error.get('input')!r}".replace("{", "{{").replace("}", "}}"))

