"""The engine's only user: one worker thread that runs continuous batching. Requests join the
running batch at the next step whatever method, reward or limits each asked for, and leave it when
they are done (`Driver`: one forward pass per step for all of them)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..api import start
from ..engine import Engine, Prompt
from ..errors import DecalignError
from ..memory import release_memory
from ..methods import Driver, Method
from ..request import Request
from .config import ServerConfig
from .metrics import Metrics
from .schemas import ApiError


@dataclass
class PendingRequest:
    """One request waiting for, or in, the engine."""

    decoding: Request  # validated, with its one prompt
    chat: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    updates: asyncio.Queue | None = None  # streaming: (choice, committed text) as it grows
    cancelled: threading.Event = field(default_factory=threading.Event)
    alternatives: int = 0  # top_logprobs: the most likely tokens to list at each answer position
    top_tokens: list[list[list[tuple[int, float]]]] | None = None  # per choice, per token: (id, logprob)

    @property
    def prompt(self) -> Prompt:
        return self.decoding.prompts[0]

    def publish(self, choice: int, text: str) -> None:
        if self.updates is not None:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (choice, text))

    def settle(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value)


class Scheduler:
    """Continuous batching on the engine's own thread. Before every step the requests waiting in the
    queue join the running batch, in arrival order, while it holds fewer than `max_rows` rows and
    `max_batch` requests (so a big request waits its turn but is never overtaken); one forward pass
    then serves every running request, whatever it asked for, and each one leaves with its answer at
    the step it is done. A cancelled or timed-out request's rows stop at the next step."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.pending: queue.Queue[PendingRequest] = queue.Queue(maxsize=config.queue_size)
        self.driver = Driver(engine)
        self.running: dict[Method, PendingRequest] = {}
        metrics.watch(waiting=self.depth, running=lambda: len(self.running),
                      rows=lambda: self.driver.batch.size if self.driver.batch is not None else 0)
        self.thread = threading.Thread(target=self._run, name="decalign-engine", daemon=True)
        self.thread.start()

    def submit(self, request: PendingRequest) -> None:
        try:
            self.pending.put_nowait(request)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.config.queue_size} requests are queued; retry later",
                           "rate_limit_exceeded") from None

    def depth(self) -> int:
        return self.pending.qsize()

    def _run(self) -> None:
        while True:
            first = None
            if not self.running:
                if self.pending.empty():
                    release_memory()  # idle: hand the last batch's memory back
                first = self.pending.get()
            self._admit(first)
            if self.running:
                self._step()

    def _admit(self, first: PendingRequest | None = None) -> None:
        """Take requests from the queue (after `first`, already taken) while the running batch has
        room; the others stay queued, so the queue's bound, and its 429, hold while the engine is busy."""
        if self.config.batching == "static" and self.running:
            return  # static batching: the next wave starts when this one is done
        joining: dict[Method, PendingRequest] = {}
        rows = self.driver.batch.size if self.driver.batch is not None else 0
        while len(self.running) + len(joining) < self.config.max_batch and (
                rows < self.config.max_rows or not (self.running or joining)):
            if first is not None:
                request, first = first, None
            else:
                try:
                    request = self.pending.get_nowait()
                except queue.Empty:
                    break
            if request.cancelled.is_set():
                continue
            try:
                method = start(request.decoding, request.publish, lambda _, r=request: r.cancelled.is_set())
            except Exception as exc:
                request.settle(_api_error(exc))
                continue
            joining[method] = request
            rows += method.rows_per_prompt() * len(method.job.prompts)
        if not joining:
            return
        try:
            self.driver.add(list(joining))
        except Exception:  # one request's prompts could not join: each on its own, so it fails alone
            for method, request in list(joining.items()):
                try:
                    self.driver.add([method])
                except Exception as exc:
                    self.driver.release(method)
                    request.settle(_api_error(exc))
                    del joining[method]
        for method, request in joining.items():
            if method in self.driver.live:
                self.running[method] = request
            else:  # answered or failed as it joined
                self._answer(method, request)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            left = self.driver.step()
        except Exception as exc:  # the forward pass itself failed: every running request fails with it
            for method, request in self.running.items():
                self.driver.release(method)
                request.settle(_api_error(exc))
            self.running, self.driver = {}, Driver(self.engine)
            return
        self.metrics.step(time.perf_counter() - started)
        for method in left:
            self._answer(method, self.running.pop(method))

    def _answer(self, method: Method, request: PendingRequest) -> None:
        if method in self.driver.failed:
            request.settle(_api_error(self.driver.failed.pop(method)))
            return
        for result in method.results:
            self.metrics.count_answer(result)
        if request.alternatives:  # one teacher-forced pass per choice, on this thread (the engine's)
            try:  # over the prompt ids the answers were decoded from (one per choice)
                request.top_tokens = [self.engine.top_tokens(ids, result.tokens, request.alternatives)
                                      for ids, result in zip(method.job.prompt_ids, method.results)]
            except Exception as exc:
                request.settle(_api_error(exc))
                return
        request.settle(list(method.results))  # one Result per choice


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, DecalignError):
        return ApiError(400, str(exc))
    return ApiError(500, f"decoding failed: {type(exc).__name__}", "server_error")  # without a trace


def _settle(future: asyncio.Future, value: Any) -> None:
    """Resolve `future` with a result or an exception, unless its waiter already gave up on it."""
    if not future.done():
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
