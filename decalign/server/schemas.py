"""The OpenAI-compatible bodies: requests, answers, stream chunks, model list and errors.

Requests carry one extension field, `alignment` (the OpenAI client sends it with
extra_body={"alignment": {"method": "bon", "n": 4}}); answers carry its outcome under the same name.
Request fields are checked in the order the server has always reported them, the first wrong one
answering 400 with its own message and `param`.
"""

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (BaseModel, Field, SerializerFunctionWrapHandler, ValidationError, ValidationInfo, field_validator,
                      model_serializer, model_validator)

from .config import ServerConfig

FinishReason = Literal["stop", "length"]
MAX_CHOICES = 16  # independent answers per request (OpenAI's n)
MAX_PROMPTS = 32  # prompts in one /v1/completions request (each gets n answers)


class ApiError(Exception):
    """An error answered as OpenAI's error body, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.kind, param=self.param,
                                               code=self.code)).model_dump()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Requests. Each endpoint's model lists its prompt mixin last among its bases: pydantic orders fields
# from the last base to the first, so the prompt is checked (and its error reported) before the options.

class ChatPrompt(BaseModel):
    # a default, so that a missing field gets this message too; each message is checked by the chat template
    messages: list[Any] = Field(None, validate_default=True)

    @field_validator("messages", mode="before")
    @classmethod
    def non_empty_list(cls, messages: Any) -> Any:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        return [_joined_text_parts(i, m) for i, m in enumerate(messages)]


def _joined_text_parts(index: int, message: Any) -> Any:
    """A message whose content is OpenAI's list of content parts, as one string (its text parts one
    per line, as vLLM joins them); a part of another kind (an image, audio) is refused."""
    if not (isinstance(message, dict) and isinstance(message.get("content"), list)):
        return message  # strings, and malformed messages for the chat template's own check
    texts = []
    for part in message["content"]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}: only text content parts are supported, got {kind or repr(part)}")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


class TextPrompt(BaseModel):
    prompt: list[str] = Field(None, validate_default=True)  # OpenAI's completions take a list (a batch)

    @field_validator("prompt", mode="before")
    @classmethod
    def strings(cls, prompt: Any) -> Any:
        prompt = [prompt] if isinstance(prompt, str) else prompt
        strings = isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)
        if not (strings and 1 <= len(prompt) <= MAX_PROMPTS):
            raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings (token ids are not "
                             "taken)")
        return prompt


class GenerationOptions(BaseModel):
    """The fields both generation endpoints share; other OpenAI fields (user, ...) are ignored. `model`
    chooses among the adapters the server was started with (`--adapter NAME=PATH`); any name is the
    served model when it has none.

    Validate with `parse_request`: max_tokens needs the ServerConfig as validation context.
    """

    max_tokens: int
    model: Any = None
    min_tokens: int = 0  # vLLM's field: no end-of-text, and no stop string matched, before this many tokens
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    alignment: dict[str, Any] = {}
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: usage in a last chunk of its own, as OpenAI's
    # handed to methods that take them, whose configs check them with their own messages
    temperature: Any = None
    top_p: Any = None

    @model_validator(mode="before")
    @classmethod
    def read_openai_fields(cls, body: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """OpenAI's newer max_completion_tokens, when given, wins over max_tokens; null, 0 or neither
        means the server's default (never above its limit). An OpenAI field this server does not
        honour is refused when it asks for something (an answer that ignored it would be wrong
        silently); left at its default it is accepted, as clients send defaults."""
        for name, (asks, why) in UNSUPPORTED.items():
            if name in body and asks(body[name]):
                raise ApiError(400, f"{name} is not supported by decalign serve{why}", param=name)
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict)
                                        and isinstance(options.get("include_usage") or False, bool)):
            raise ApiError(400, 'stream_options must be an object such as {"include_usage": true}',
                           param="stream_options")
        if options is not None and body.get("stream") is not True:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        config: ServerConfig = info.context
        if body.get("max_completion_tokens"):  # checked under its own name (0 or null: not given)
            problem = _token_limit_problem(body["max_completion_tokens"], config, "max_completion_tokens")
            if problem:
                raise ApiError(400, problem, param="max_completion_tokens")
        chosen = body.get("max_completion_tokens") or body.get("max_tokens") \
            or min(config.default_max_tokens, config.max_tokens_limit)
        return {**body, "max_tokens": chosen, "include_usage": bool((options or {}).get("include_usage"))}

    @field_validator("max_tokens", mode="before")
    @classmethod
    def within_limit(cls, max_tokens: Any, info: ValidationInfo) -> Any:
        problem = _token_limit_problem(max_tokens, info.context, "max_tokens")
        if problem:
            raise ValueError(problem)
        return max_tokens

    @field_validator("min_tokens", mode="before")
    @classmethod
    def whole_tokens(cls, min_tokens: Any) -> Any:
        min_tokens = 0 if min_tokens is None else min_tokens
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
            raise ValueError("min_tokens must be a non-negative integer")
        return min_tokens

    @field_validator("n", mode="before")
    @classmethod
    def choices(cls, n: Any) -> Any:
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be an integer from 1 to {MAX_CHOICES}")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def stop_strings(cls, stop: Any) -> tuple[str, ...]:
        stop = stop or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        return tuple(stop)

    @field_validator("temperature", mode="before")
    @classmethod
    def openai_temperature(cls, temperature: Any) -> Any:
        """OpenAI's range, 0 to 2 (a method's own checks come later; `alignment.temperature` may go higher
        where the method allows)."""
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 2:
            raise ValueError(f"temperature must be between 0 and 2, got {temperature} (alignment.temperature "
                             "takes what the method accepts)")
        return temperature

    @field_validator("seed", mode="before")
    @classmethod
    def integer_seed(cls, seed: Any) -> Any:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError("seed must be an integer")
        return seed

    @field_validator("alignment", mode="before")
    @classmethod
    def an_object(cls, alignment: Any) -> Any:
        alignment = alignment or {}
        if not isinstance(alignment, dict):
            raise ValueError("alignment must be an object, e.g. {\"method\": \"bon\", \"n\": 4}")
        return alignment

    @field_validator("stream", mode="before")
    @classmethod
    def truthy(cls, stream: Any) -> bool:
        if stream is not None and not isinstance(stream, bool):  # "false" is a true string
            raise ValueError("stream must be true or false")
        return bool(stream)


def _token_limit_problem(value: Any, config: ServerConfig, name: str) -> str | None:
    """What is wrong with `value` as an answer's token limit named `name`, or None."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return f"{name} must be a positive integer"
    if value > config.max_tokens_limit:
        return f"{name} {value} is over this server's limit of {config.max_tokens_limit}"
    return None


def _given(value: Any) -> bool:
    return value not in (None, 0, "", [], {}) and value is not False


# OpenAI fields decalign does not honour: (whether a value asks for something, a hint)
UNSUPPORTED = {
    "tools": (_given, " (no function calling)"),
    "functions": (_given, " (no function calling)"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"), " (no function calling)"),
    "function_call": (lambda v: v not in (None, "none", "auto"), " (no function calling)"),
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                        " (no constrained output): only {\"type\": \"text\"}"),
    "logit_bias": (_given, ""),
    "presence_penalty": (_given, ": leave it 0"),
    "frequency_penalty": (_given, ": leave it 0"),
    "best_of": (lambda v: v not in (None, 1),
                ': for the best of n answers by a reward, send "alignment": {"method": "bon", "n": n}'),
    "echo": (_given, ""),
    "suffix": (_given, ""),
}


class ChatCompletionRequest(GenerationOptions, ChatPrompt):
    """POST /v1/chat/completions."""

    logprobs: bool = False  # each answer token with the policy's log-probability of it
    top_logprobs: int | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def a_flag(cls, logprobs: Any) -> Any:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ValueError("logprobs must be true or false")
        return bool(logprobs)

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def up_to_20(cls, top_logprobs: Any) -> Any:
        return _count_or_none(top_logprobs, 20, "top_logprobs must be an integer from 0 to 20")

    @model_validator(mode="after")
    def top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def alternatives(self) -> int:
        """How many most likely tokens to list at each answer position."""
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(GenerationOptions, TextPrompt):
    """POST /v1/completions."""

    logprobs: int | None = None  # the legacy field: the most likely tokens to list per position (0-5)

    @field_validator("logprobs", mode="before")
    @classmethod
    def up_to_5(cls, logprobs: Any) -> Any:
        return _count_or_none(logprobs, 5, "logprobs must be an integer from 0 to 5 on /v1/completions")

    @property
    def alternatives(self) -> int:
        return self.logprobs or 0


def _count_or_none(value: Any, most: int, message: str) -> Any:
    """`value` when it is None or an integer from 0 to `most` (not a bool); else ValueError(message)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most):
        raise ValueError(message)
    return value


RequestModel = TypeVar("RequestModel", bound=GenerationOptions)


def parse_request(model: type[RequestModel], body: dict[str, Any], config: ServerConfig) -> RequestModel:
    """`body` as `model`, or an ApiError(400) with the first wrong field's message and name."""
    try:
        return model.model_validate(body, context=config)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        cause = (error.get("ctx") or {}).get("error")
        raise ApiError(400, str(cause) if cause is not None else error["msg"],
                       param=str(error["loc"][0]) if error["loc"] else None) from None


# Answers

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AlignmentInfo(BaseModel):
    """The `alignment` extension of an answer: how it was decoded, its reward and what it cost."""

    method: str
    params: dict[str, Any]
    reward: float | None
    stats: dict[str, Any]


class OmitsNone(BaseModel):
    """A body that leaves out the fields named in `omitted_when_none` while they are None, as OpenAI's
    do, rather than sending null (Field(exclude_if=...) would do it too, but needs pydantic 2.12)."""

    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def leave_out_none(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {name: value for name, value in serialize(self).items()
                if value is not None or name not in self.omitted_when_none}


class Envelope(BaseModel):
    """What every answer and stream chunk starts with; subclasses fix `object`."""

    id: str
    object: str
    created: int
    model: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    alignment: AlignmentInfo


class ChatDelta(OmitsNone):
    """What a chat stream chunk adds: the role once, at the start, then pieces of content."""

    omitted_when_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class Chunk(Envelope, OmitsNone):
    """A stream chunk: usage and alignment come with the last one only."""

    omitted_when_none = ("usage", "alignment")
    usage: Usage | None = None
    alignment: AlignmentInfo | None = None


class ChatCompletionChunk(Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists over the answer's tokens; text_offset counts
    characters from the start of the prompt."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None  # None in stream chunks before the last


class Completion(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage
    alignment: AlignmentInfo


class CompletionChunk(Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "decalign"
    parent: str | None = None  # an adapter's base model, as vLLM lists LoRA modules


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
