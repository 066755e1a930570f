"""The FastAPI application: the OpenAI-compatible routes, the key and size guard, and error bodies.

Requests choose their method, parameters and reward in one extra body field, `alignment`.
A single worker thread (the Scheduler) owns the engine and batches companions; the queue is bounded
(429 when full), each request has a deadline, and a client that disconnects stops its own rows.
"""

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, Prompt
from ..errors import DecalignError
from ..methods import METHODS
from ..result import Result
from .alignment import decoding_request
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import PendingRequest, Scheduler
from .schemas import (AlignmentInfo, ApiError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                      ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs, Completion,
                      CompletionChunk, CompletionRequest, GenerationOptions, ModelCard, ModelList, TextChoice,
                      CompletionLogprobs, TokenLogprob, TopLogprob, Usage, parse_request)


@dataclass
class ServerState:
    """What the routes share, kept on app.state.server."""

    engine: Engine
    config: ServerConfig
    scheduler: Scheduler
    metrics: Metrics
    routes: set[str] = field(default_factory=set)  # the app's paths (metric labels; anything else is "other")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]
router = APIRouter()
LOG = logging.getLogger("decalign.server")


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving `engine`; its engine thread starts now."""
    app = FastAPI(title="decalign", version="0.1.0", docs_url=None, redoc_url=None)
    metrics = Metrics()
    app.state.server = ServerState(engine, config, Scheduler(engine, config, metrics), metrics)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(Guard)
    app.include_router(router)
    app.state.server.routes = {route.path for route in router.routes}
    return app


async def api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


OUTCOME = "decalign.status"  # the scope key of the status a request is counted under


class Guard:
    """Checks the API key and the declared body size before a /v1/ route runs, counts /v1/ requests
    by route and status (unknown paths under one label), and answers any unexpected error with a 500
    in OpenAI's shape and one log line, never a traceback. Plain ASGI, not Starlette's BaseHTTPMiddleware,
    which hides a client's disconnect from the route (a non-streaming request then ran to its end)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: ServerState = scope["app"].state.server
        config, started, status, api = state.config, time.perf_counter(), [0], scope["path"].startswith("/v1/")
        scope[OUTCOME] = status  # a stream that ends in an error event is counted under that error's status

        async def sent(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        size = headers.get("content-length", "")
        try:
            if api and config.api_key and headers.get("authorization") != f"Bearer {config.api_key}":
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            if api and size.isdigit() and int(size) > config.max_request_bytes:
                raise ApiError(413, f"request body over {config.max_request_bytes} bytes")
            await self.app(scope, receive, sent)
        except ApiError as exc:
            await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, sent)
        except asyncio.CancelledError:  # only a shutdown cancels a request: a response its client stopped reading
            LOG.warning("dropped a response still unsent at shutdown: %s %s", scope["method"], scope["path"])
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and leaves one log line, not a traceback
            LOG.error("internal error on %s %s: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc)
            if not status[0]:
                body = ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body()
                await JSONResponse(body, status_code=500)(scope, receive, sent)
        finally:
            if api:
                route = scope["path"] if scope["path"] in state.routes else "other"
                state.metrics.observe(route, status[0] or 500, time.perf_counter() - started)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State):
    body = parse_request(ChatCompletionRequest, await read_body(request, state.config), state.config)
    return await respond(request, state, body, [body.messages], chat=True)


@router.post("/v1/completions")
async def completions(request: Request, state: State):
    body = parse_request(CompletionRequest, await read_body(request, state.config), state.config)
    return await respond(request, state, body, body.prompt, chat=False)


@router.get("/v1/models")
async def models(state: State) -> ModelList:
    """The served model, then each adapter loaded by name (a request's `model` picks one)."""
    name = state.config.model_name
    return ModelList(data=[ModelCard(id=name)] + [ModelCard(id=adapter, parent=name)
                                                  for adapter in state.engine.named_adapters])


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request, state: State) -> dict:
    """Load a LoRA adapter under a name (vLLM's endpoint and fields): requests may then ask for it as
    their `model`. Only with `--allow-adapter-loading`."""
    name, folder = adapter_fields(await read_body(request, state.config), state.config, "lora_name", "lora_path")
    if name == state.config.model_name:
        raise ApiError(400, f"{name} is the served model's name: choose another", param="lora_name")
    if name in state.engine.adapter_names():
        raise ApiError(409, f"an adapter named {name} is loaded already", param="lora_name")
    await on_engine(state, lambda: state.engine.add_adapter(name, folder))
    LOG.info("loaded adapter %s", name)
    return {"object": "adapter", "id": name, "status": "loaded"}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request, state: State) -> dict:
    """Unload an adapter loaded by name, once no waiting or running request asks for it (409 until
    then). Only with `--allow-adapter-loading`."""
    (name,) = adapter_fields(await read_body(request, state.config), state.config, "lora_name")
    if name not in state.engine.named_adapters:
        raise ApiError(404, f"no adapter named {name} is loaded by name", param="lora_name", code="model_not_found")

    def unload() -> None:
        users = state.scheduler.users_of(name)
        if users:
            raise ApiError(409, f"adapter {name} is in use by {users} request(s); unload it once they are answered")
        state.engine.remove_adapter(name)

    await on_engine(state, unload)
    LOG.info("unloaded adapter %s", name)
    return {"object": "adapter", "id": name, "status": "unloaded"}


def adapter_fields(body: dict, config: ServerConfig, *names: str) -> list[str]:
    """The string fields `names` of an adapter request, or a 4xx naming what is wrong."""
    if not config.allow_adapter_loading:
        raise ApiError(404, "loading adapters at run time is off: start the server with --allow-adapter-loading",
                       "not_found_error")
    for name in names:
        if not isinstance(body.get(name), str) or not body[name]:
            raise ApiError(400, f"{name} must be a non-empty string", param=name)
    return [body[name] for name in names]


async def on_engine(state: ServerState, chore) -> None:
    """Run `chore` on the engine's thread between steps; a DecalignError it raises is a 400."""
    try:
        await asyncio.wrap_future(state.scheduler.call(chore))
    except DecalignError as exc:
        raise ApiError(400, str(exc)) from None


@router.get("/v1/methods")
async def methods(state: State) -> dict:
    """The decoding methods a request's `alignment.method` may name, each with its parameters'
    defaults, types and help text (the same text `decalign methods -v` prints), and the defaults."""
    return {"default": {"method": state.config.method, "reward": state.config.reward,
                        **state.config.method_params},
            "methods": {name: {"summary": spec.summary, "needs_reward": spec.needs_reward,
                               "needs_adapter": spec.needs_adapter, "parameters": spec.describe()}
                        for name, spec in sorted(METHODS.items())}}


@router.get("/health")
async def health(state: State) -> dict:
    return {"status": "ok", "model": state.config.model_name, "queue_depth": state.scheduler.depth()}


@router.get("/metrics")
async def prometheus(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def read_body(request: Request, config: ServerConfig) -> dict:
    """The JSON object sent (the guard only saw the declared length; chunked bodies are measured here)."""
    raw = await request.body()
    if len(raw) > config.max_request_bytes:
        raise ApiError(413, f"request body over {config.max_request_bytes} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def pending_request(state: ServerState, body: GenerationOptions, prompts: list[Prompt],
                    chat: bool) -> PendingRequest:
    """The request to queue; its decoding and prompts are checked first, so bad ones never wait in line."""
    try:
        decoding = decoding_request(body, state.config, state.engine, prompts, chat)
        for number, prompt in enumerate(prompts):  # empty, malformed and too long prompts fail here,
            try:  # before a streamed answer has begun
                state.engine.check_fits(state.engine.render(prompt, chat=chat))
            except DecalignError as exc:
                raise DecalignError(f"prompt {number}: {exc}" if len(prompts) > 1 else str(exc)) from None
    except DecalignError as exc:
        raise ApiError(400, str(exc)) from None
    loop = asyncio.get_running_loop()
    return PendingRequest(decoding=decoding, chat=chat, loop=loop, future=loop.create_future(),
                          updates=asyncio.Queue() if body.stream else None, alternatives=body.alternatives,
                          answers_per_prompt=body.n)


async def respond(request: Request, state: ServerState, body: GenerationOptions, prompts: list[Prompt],
                  chat: bool):
    pending = pending_request(state, body, prompts, chat)
    state.scheduler.submit(pending)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    wants_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    deadline = time.monotonic() + state.config.timeout
    if body.stream:  # the status is sent with the first text: an error before it gets its own
        first = await first_update(request, pending, deadline)
        return StreamingResponse(stream_events(request, state, pending, ident, created, deadline, first,
                                               logprobs=wants_logprobs, include_usage=body.include_usage),
                                 media_type="text/event-stream")
    results = await wait(request, pending, deadline)
    head = dict(id=ident, created=created, model=state.config.served_name(pending.decoding.adapter_name))
    usage, alignment = answer_usage(state.engine, pending, results), alignment_info(results[0])
    scores = choice_logprobs(state.engine, pending, results) if wants_logprobs else [None] * len(results)
    if chat:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=result.text), logprobs=logprobs,
                              finish_reason=finish_reason(result)) for i, (result, logprobs) in enumerate(zip(results, scores))]
        return ChatCompletion(**head, choices=choices, usage=usage, alignment=alignment)
    choices = [TextChoice(index=i, text=result.text, finish_reason=finish_reason(result), logprobs=logprobs)
               for i, (result, logprobs) in enumerate(zip(results, scores))]
    return Completion(**head, choices=choices, usage=usage, alignment=alignment)


async def wait(request: Request, pending: PendingRequest, deadline: float) -> list[Result]:
    """The results (one per choice), or 499 once the client hangs up, or 504 past the deadline."""
    while not pending.future.done():
        await give_up_if_gone(request, pending, deadline)
        await asyncio.wait([pending.future], timeout=0.1)
    return pending.future.result()


async def first_update(request: Request, pending: PendingRequest, deadline: float) -> tuple[int, str] | None:
    """A stream's first (choice, text), or None once its answer is settled without one; a request
    that fails, times out or is abandoned before it raises its error here, before any byte is sent."""
    while not pending.future.done():
        await give_up_if_gone(request, pending, deadline)
        update = asyncio.ensure_future(pending.updates.get())
        await asyncio.wait([pending.future, update], timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
        if not update.cancel():  # it had its item (a cancelled get leaves the item in the queue)
            return update.result()
    pending.future.result()  # raises the request's error
    return None


async def give_up_if_gone(request: Request, pending: PendingRequest, deadline: float) -> None:
    """499 once the client hangs up, 504 past the deadline; either stops the request's rows at the next step."""
    if await request.is_disconnected():
        pending.cancelled.set()
        raise ApiError(499, "client closed the request")
    if time.monotonic() > deadline:
        pending.cancelled.set()
        raise ApiError(504, "no answer within the server's timeout (--timeout)", "timeout")


async def stream_events(request: Request, state: ServerState, pending: PendingRequest, ident: str, created: int,
                        deadline: float, first: tuple[int, str] | None, *, logprobs: bool = False,
                        include_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events: the committed text as it grows, then the finish reason, usage and alignment.
    With `include_usage` (OpenAI's stream_options), usage comes last, in a chunk with no choices.

    With `logprobs`, each choice's token log-probabilities come in one chunk of their own once its
    answer is final (empty text): a streamed method such as CARDS or SMC may still replace the
    tokens behind text it has not committed, so per-piece figures could name tokens that never stand."""
    head = dict(id=ident, created=created, model=state.config.served_name(pending.decoding.adapter_name))

    def chunk(index: int, delta: str | None, reason: str | None = None, scores: Any = None, **last: Any) -> str:
        if pending.chat:
            choice = ChatChunkChoice(index=index, delta=ChatDelta(content=delta), logprobs=scores, finish_reason=reason)
            return event(ChatCompletionChunk(**head, choices=[choice], **last).model_dump(mode="json"))
        choice = TextChoice(index=index, text=delta or "", logprobs=scores, finish_reason=reason)
        return event(CompletionChunk(**head, choices=[choice], **last).model_dump(mode="json"))

    choices = len(pending.decoding.prompts)
    if pending.chat:
        for index in range(choices):
            opening = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            yield event(ChatCompletionChunk(**head, choices=[opening]).model_dump(mode="json"))
    sent = [""] * choices
    arrived = deadline - state.config.timeout

    def grown(index: int, text: str, final: bool = False) -> str | None:
        """The chunk adding what `text` holds beyond what choice `index` was sent (None if nothing);
        of a text still growing, only what no later token can change is sent."""
        if not final:
            text = committed(text, pending.decoding.stop)
        if not (text.startswith(sent[index]) and len(text) > len(sent[index])):
            return None
        if not any(sent):
            state.metrics.first_token.labels(method=pending.decoding.method).observe(time.monotonic() - arrived)
        piece, sent[index] = text[len(sent[index]):], text
        return chunk(index, piece)

    def failed(error: ApiError) -> str:
        request.scope[OUTCOME][0] = error.status  # counted as the error it ended in, not as the 200 it began as
        return event(error.body())  # (one a client that hung up never reads)

    try:
        if first is not None and (piece := grown(*first)) is not None:
            yield piece
        while not pending.future.done():
            try:
                await give_up_if_gone(request, pending, deadline)
            except ApiError as exc:
                yield failed(exc)
                return
            try:
                index, text = await asyncio.wait_for(pending.updates.get(), timeout=0.1)
            except asyncio.TimeoutError:
                continue
            if (piece := grown(index, text)) is not None:
                yield piece
        try:
            results = pending.future.result()
        except ApiError as exc:
            yield failed(exc)
            return
        for index, result in enumerate(results):
            if (piece := grown(index, result.text, final=True)) is not None:
                yield piece
        if logprobs:
            for index, scores in enumerate(choice_logprobs(state.engine, pending, results)):
                yield chunk(index, "", scores=scores)
        usage = answer_usage(state.engine, pending, results)
        for index, result in enumerate(results):
            last = dict(alignment=alignment_info(results[0])) | ({} if include_usage else dict(usage=usage)) \
                if index == len(results) - 1 else {}
            yield chunk(index, None, finish_reason(result), **last)
        if include_usage:
            kind = ChatCompletionChunk if pending.chat else CompletionChunk
            yield event(kind(**head, choices=[], usage=usage).model_dump(mode="json"))
        yield "data: [DONE]\n\n"
    finally:
        if not pending.future.done():
            pending.cancelled.set()


def committed(text: str, stops: Sequence[str]) -> str:
    """The part of a growing answer that later tokens cannot change: without a trailing incomplete
    character (a multi-byte character decodes as U+FFFD until its last byte comes) and without an
    ending that may still grow into a stop string (which would cut the answer before it)."""
    text = text.rstrip("\ufffd")
    hold = max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1)
                if text.endswith(stop[:k])), default=0)
    return text[:len(text) - hold]


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def answer_usage(engine: Engine, pending: PendingRequest, results: list[Result]) -> Usage:
    """OpenAI's count: each prompt once, the tokens of every choice."""
    prompt_tokens = sum(len(engine.render(prompt, chat=pending.chat)) for prompt in pending.prompts)
    completion_tokens = sum(len(result.tokens) for result in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def token_bytes(engine: Engine, token: int) -> bytes:
    """A token's own bytes (OpenAI's `bytes`: a character split over tokens is rebuilt by joining
    them, where each token's text shows only U+FFFD): byte-level BPE maps each byte to one character,
    SentencePiece names a lone byte <0xNN>; other tokens give their text's UTF-8."""
    piece = engine.tokenizer.convert_ids_to_tokens(token)
    backend = getattr(engine.tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel" and all(c in BYTE_OF_CHAR for c in piece):
        return bytes(BYTE_OF_CHAR[c] for c in piece)
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    return token_text(engine, token).encode("utf-8")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable bytes stand for themselves, the others for
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


BYTE_OF_CHAR = _byte_level_alphabet()


def token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.convert_tokens_to_string([engine.tokenizer.convert_ids_to_tokens(token)])


def choice_logprobs(engine: Engine, pending: PendingRequest,
                    results: list[Result]) -> list[ChoiceLogprobs] | list[CompletionLogprobs]:
    """Each choice's logprobs in its route's shape: chat's token list, or the legacy completions form
    whose text offsets start at the end of the choice's prompt."""
    tops = pending.top_tokens or [None] * len(results)
    if pending.chat:
        return [token_logprobs(engine, result, top) for result, top in zip(results, tops)]
    return [completion_logprobs(engine, result, top, offset=len(prompt))
            for result, top, prompt in zip(results, tops, pending.decoding.prompts)]


def token_logprobs(engine: Engine, result: Result, top: list[list[tuple[int, float]]] | None) -> ChoiceLogprobs:
    """OpenAI's `logprobs.content`: each answer token, its text and bytes, and the policy's
    log-probability of it (the model's own distribution, before temperature or top-k), with the
    most likely tokens at its position when top_logprobs asked for them."""
    def entry(token: int, logprob: float) -> dict:
        return dict(token=token_text(engine, token), logprob=logprob, bytes=list(token_bytes(engine, token)))

    tokens, logprobs, top = _text_tokens(engine, result, top)
    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(token, logprob), top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in alternatives])
        for token, logprob, alternatives in zip(tokens, logprobs, top or [[] for _ in tokens])])


def completion_logprobs(engine: Engine, result: Result, top: list[list[tuple[int, float]]] | None, *,
                        offset: int) -> CompletionLogprobs:
    """The legacy completions `logprobs`: tokens, their log-probabilities, the most likely tokens at
    each position (as {text: logprob}), and each token's character offset from the prompt's start."""
    ids, logprobs, top = _text_tokens(engine, result, top)
    tokens = [token_text(engine, token) for token in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs,
                              top_logprobs=[_by_text(engine, alternatives) for alternatives in top] if top else None,
                              text_offset=offsets)


def _text_tokens(engine: Engine, result: Result, top: list | None) -> tuple[list[int], list[float], list | None]:
    """The answer's tokens, their logprobs and alternatives, without the end-of-text token that ended
    it (OpenAI lists the tokens of the text; the end token has no text). A stop string that ends
    inside a token keeps that token: its logprob is the one the policy paid."""
    shown = len(result.tokens) - bool(result.tokens and result.tokens[-1] in engine.eos_ids)
    return result.tokens[:shown], list(result.logprobs or [])[:shown], top[:shown] if top else top


def _by_text(engine: Engine, alternatives: list[tuple[int, float]]) -> dict[str, float]:
    """{text: logprob}, most likely first; of tokens that decode to the same text, the likeliest."""
    listed: dict[str, float] = {}
    for token, logprob in alternatives:
        listed.setdefault(token_text(engine, token), logprob)
    return listed


def alignment_info(result: Result) -> AlignmentInfo:
    return AlignmentInfo(method=result.method, params=result.params, reward=result.reward, stats=result.stats)


def finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"
