"""`decalign serve`: an OpenAI-compatible HTTP server that aligns at decoding time.

Requests choose their method, parameters and reward in one extra body field, `alignment`
(the OpenAI client sends it with extra_body={"alignment": {"method": "bon", "n": 4}}).
A single worker thread owns the engine; requests that arrive together and ask for the same
decoding are batched into one `generate` call. The queue is bounded (429 when full), each request
has a deadline, and a client that disconnects stops its own rows.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import DecalignError

OPENAI_SAMPLING = ("temperature", "top_p")
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


@dataclass
class ServerConfig:
    model_name: str = "smollm2"
    method: str = "greedy"
    reward: str | None = None
    method_params: dict = field(default_factory=dict)
    api_key: str | None = None
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_request_bytes: int = 1_000_000
    queue_size: int = 64
    timeout: float = 300.0  # seconds from arrival to answer
    batch_window: float = 0.02  # seconds to wait for companions before decoding
    max_batch: int = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Job:
    """One request waiting for, or in, the engine."""

    prompt: Any
    chat: bool
    method: str
    params: dict
    reward: str | None
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    updates: asyncio.Queue | None = None  # streaming: committed text as it grows
    cancelled: threading.Event = field(default_factory=threading.Event)

    def key(self) -> str:
        return json.dumps([self.chat, self.method, self.params, self.reward, self.max_tokens, self.stop],
                          sort_keys=True, default=str)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.tokens = 0
        self.reward_calls = 0
        self.batches = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_buckets[i] += 1

    def render(self, queue_depth: int) -> str:
        with self.lock:
            lines = ["# TYPE decalign_requests_total counter"]
            lines += [f'decalign_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines.append("# TYPE decalign_request_seconds histogram")
            for bound, count in zip(LATENCY_BUCKETS, self.latency_buckets):
                label = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'decalign_request_seconds_bucket{{le="{label}"}} {count}')
            lines += [f"decalign_request_seconds_sum {self.latency_sum:.6f}",
                      f"decalign_request_seconds_count {self.latency_count}",
                      "# TYPE decalign_generated_tokens_total counter", f"decalign_generated_tokens_total {self.tokens}",
                      "# TYPE decalign_reward_calls_total counter", f"decalign_reward_calls_total {self.reward_calls}",
                      "# TYPE decalign_batches_total counter", f"decalign_batches_total {self.batches}",
                      "# TYPE decalign_queue_depth gauge", f"decalign_queue_depth {queue_depth}"]
        return "\n".join(lines) + "\n"


class Scheduler:
    """The engine's only user: takes jobs from a bounded queue and decodes companions together."""

    def __init__(self, engine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=config.queue_size)
        self.rewards: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="decalign-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.config.queue_size} requests are queued; retry later",
                           "rate_limit_exceeded") from None

    def depth(self) -> int:
        return self.jobs.qsize()

    def _reward(self, spec: str | None):
        from .rewards import load_reward

        if spec is None:
            return None
        if spec not in self.rewards:
            self.rewards[spec] = load_reward(spec)
        return self.rewards[spec]

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            batch = [first]
            deadline = time.monotonic() + self.config.batch_window
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[str, list[Job]] = defaultdict(list)
            for job in batch:
                if not job.cancelled.is_set():
                    groups[job.key()].append(job)
            for jobs in groups.values():
                self._decode(jobs)
            if self.jobs.empty():
                _release_memory()

    def _decode(self, jobs: list[Job]) -> None:
        from .api import generate

        head = jobs[0]

        def listener(i: int, text: str) -> None:
            if jobs[i].updates is not None:
                jobs[i].loop.call_soon_threadsafe(jobs[i].updates.put_nowait, text)

        try:
            results = generate([j.prompt for j in jobs], method=head.method, model=self.engine,
                               reward=self._reward(head.reward), max_new_tokens=head.max_tokens,
                               seed=[j.seed if j.seed is not None else int(uuid.uuid4().int % 2**62) for j in jobs],
                               chat=head.chat, stop=head.stop, batch_size=len(jobs), listener=listener,
                               cancelled=lambda i: jobs[i].cancelled.is_set(), **head.params)
        except DecalignError as exc:
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, ApiError(400, str(exc)))
            return
        except Exception as exc:  # reported to the client without a trace
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future,
                                              ApiError(500, f"decoding failed: {type(exc).__name__}", "server_error"))
            return
        with self.metrics.lock:
            self.metrics.batches += 1
            for result in results:
                self.metrics.tokens += result.stats["generated_tokens"]
                self.metrics.reward_calls += result.stats["reward_calls"]
        for job, result in zip(jobs, results):
            job.loop.call_soon_threadsafe(_settle, job.future, result)


def _release_memory() -> None:
    """Hand memory freed by finished batches back to the OS once the queue is idle (glibc keeps it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _settle(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)


def _alignment(body: dict, config: ServerConfig) -> tuple[str, dict, str | None]:
    """(method, params, reward) from the request's `alignment` field and the server defaults."""
    from .methods import get_method, make_config

    extra = body.get("alignment") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "alignment must be an object, e.g. {\"method\": \"bon\", \"n\": 4}", param="alignment")
    extra = dict(extra)
    method = extra.pop("method", config.method)
    reward = extra.pop("reward", config.reward)
    spec = get_method(method) if isinstance(method, str) else None
    if spec is None:
        raise ApiError(400, "alignment.method must be a string", param="alignment")
    params = dict(config.method_params) if method == config.method else {}
    params.update(extra)
    accepted = spec.parameters()
    for name in OPENAI_SAMPLING:  # OpenAI's sampling fields apply where the method has them
        if body.get(name) is not None and name in accepted and name not in extra:
            params[name] = body[name]
    make_config(method, params)  # unknown or bad parameters fail now, with the method's own message
    if spec.needs_reward and reward is None:
        raise ApiError(400, f"method {method} needs a reward: set alignment.reward, e.g. \"sentiment\"",
                       param="alignment")
    if reward is not None:
        from .rewards import load_reward  # validate the spec before queueing

        if not isinstance(reward, str):
            raise ApiError(400, "alignment.reward must be a reward spec string", param="alignment")
        if reward != config.reward:
            load_reward(reward)
    return method, params, reward


def create_app(engine, config: ServerConfig):
    """The FastAPI application serving `engine`."""
    app = FastAPI(title="decalign", version="0.1.0", docs_url=None, redoc_url=None)
    metrics = Metrics()
    scheduler = Scheduler(engine, config, metrics)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        try:
            if request.url.path.startswith("/v1/"):
                if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
                    raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
                size = request.headers.get("content-length")
                if size and size.isdigit() and int(size) > config.max_request_bytes:
                    raise ApiError(413, f"request body over {config.max_request_bytes} bytes")
            response = await call_next(request)
        except ApiError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status)
        if request.url.path.startswith("/v1/"):
            metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > config.max_request_bytes:
            raise ApiError(413, f"request body over {config.max_request_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def make_job(body: dict, prompt: Any, chat: bool, loop, stream: bool) -> Job:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or config.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {config.max_tokens_limit}",
                           param="max_tokens")
        if body.get("n", 1) != 1:
            raise ApiError(400, "n > 1 is not supported; use alignment {\"method\": \"bon\", \"n\": N}", param="n")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ApiError(400, "seed must be an integer", param="seed")
        try:
            method, params, reward = _alignment(body, config)
            engine.render(prompt, chat=chat)  # empty or malformed prompts fail here, before queueing
        except DecalignError as exc:
            raise ApiError(400, str(exc)) from None
        return Job(prompt=prompt, chat=chat, method=method, params=params, reward=reward, max_tokens=max_tokens,
                   seed=seed, stop=stop, loop=loop, future=loop.create_future(),
                   updates=asyncio.Queue() if stream else None)

    async def wait(job: Job, request: Request):
        deadline = time.monotonic() + config.timeout
        while not job.future.done():
            if await request.is_disconnected():
                job.cancelled.set()
                raise ApiError(499, "client closed the request")
            if time.monotonic() > deadline:
                job.cancelled.set()
                raise ApiError(504, f"no answer within {config.timeout:g} s", "timeout")
            await asyncio.wait([job.future], timeout=0.1)
        return job.future.result()

    def usage(result, job: Job) -> dict:
        prompt_tokens = len(engine.render(job.prompt, chat=job.chat))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.tokens),
                "total_tokens": prompt_tokens + len(result.tokens)}

    def alignment_info(result) -> dict:
        return {"method": result.method, "params": result.params, "reward": result.reward, "stats": result.stats}

    def finish(result) -> str:
        return "length" if result.finish_reason == "length" else "stop"

    async def respond(request: Request, prompt: Any, chat: bool, body: dict):
        loop = asyncio.get_running_loop()
        stream = bool(body.get("stream"))
        job = make_job(body, prompt, chat, loop, stream)
        scheduler.submit(job)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(stream_events(job, request, ident, created, chat),
                                     media_type="text/event-stream")
        result = await wait(job, request)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": finish(result)}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish(result)}
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": config.model_name, "choices": [choice], "usage": usage(result, job),
                "alignment": alignment_info(result)}

    async def stream_events(job: Job, request: Request, ident: str, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, **extra) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            payload = {"id": ident, "object": kind, "created": created, "model": config.model_name,
                       "choices": [choice], **extra}
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            yield (f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': config.model_name, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n")
        sent = ""
        deadline = time.monotonic() + config.timeout
        try:
            while not job.future.done():
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
                if time.monotonic() > deadline:
                    job.cancelled.set()
                    yield f"data: {json.dumps(ApiError(504, 'timed out', 'timeout').body())}\n\n"
                    return
                try:
                    text = await asyncio.wait_for(job.updates.get(), timeout=0.1)
                except asyncio.TimeoutError:
                    continue
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk(text[len(sent):])
                    sent = text
            try:
                result = job.future.result()
            except ApiError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
                return
            if result.text.startswith(sent) and len(result.text) > len(sent):
                yield chunk(result.text[len(sent):])
            yield chunk(None, finish(result), usage=usage(result, job), alignment=alignment_info(result))
            yield "data: [DONE]\n\n"
        finally:
            if not job.future.done():
                job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        return await respond(request, messages, True, body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        return await respond(request, prompt, False, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "decalign"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queue_depth": scheduler.depth()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(scheduler.depth()), media_type="text/plain; version=0.0.4")

    return app
