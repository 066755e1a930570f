"""The engine's only user: one worker thread that runs continuous batching. Requests join the
running batch at the next step whatever method, reward or limits each asked for, and leave it when
they are done (`Driver`: one forward pass per step for all of them)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..api import start
from ..engine import Engine, Prompt
from ..errors import DecalignError
from ..memory import map_large_blocks, release_memory
from ..methods import Driver, Method
from ..request import Request
from .config import ServerConfig
from .metrics import Metrics
from .schemas import ApiError

LOG = logging.getLogger("decalign.server")
# Seconds the engine stays idle before it hands memory back (`release_memory`): a client sending one
# request after another does not pay for it at every answer (on a GPU, the next request would
# allocate its cache on the device again), and an idle server still returns to its starting memory.
IDLE_RELEASE_SECONDS = 1.0


@dataclass(eq=False)  # compared by identity: two requests alike are still two requests
class PendingRequest:
    """One request waiting for, or in, the engine."""

    decoding: Request  # validated: its prompts, each repeated once per answer asked (OpenAI's n)
    chat: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    updates: asyncio.Queue | None = None  # streaming: (choice, committed text) as it grows
    cancelled: threading.Event = field(default_factory=threading.Event)
    alternatives: int = 0  # top_logprobs: the most likely tokens to list at each answer position
    top_tokens: list[list[list[tuple[int, float]]]] | None = None  # per choice, per token: (id, logprob)
    method: Method | None = None  # its step machine, built on the engine's thread while it waits
    overtaken: int = 0  # requests that arrived after it and joined before it
    queued_at: float = field(default_factory=time.monotonic)
    answers_per_prompt: int = 1

    @property
    def prompts(self) -> list[Prompt]:
        """The distinct prompts, in order."""
        return self.decoding.prompts[::self.answers_per_prompt]

    def publish(self, choice: int, text: str) -> None:
        if self.updates is not None:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (choice, text))

    def settle(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value)


class Scheduler:
    """Continuous batching on the engine's own thread. Before every step waiting requests join the
    running batch while it holds fewer than `max_rows` rows and `max_batch` requests, and their
    prompts hold at most `max_join_tokens` tokens (a step that prefills a burst of prompts at once
    holds back every running row and every joiner's first token); one forward
    pass then serves every running request, whatever it asked for, and each one leaves with its
    answer at the step it is done. A cancelled or timed-out request's rows stop at the next step.

    Which waiting request joins first (`admission`): "shortest" takes the cheapest first (rows x
    tokens, so a one-row chat answer is not queued behind searches that decode dozens of rows), but
    a request overtaken `max_batch` times by later ones goes first, in arrival order: a long request
    waits for at most one batch's worth of shorter ones. "arrival" is first come, first served."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        map_large_blocks()  # a long-running process: what a load frees goes back to the OS
        self.waiting: list[PendingRequest] = []  # in arrival order; at most queue_size
        self.arrived = threading.Condition()
        self.driver = Driver(engine)
        self.running: dict[Method, PendingRequest] = {}
        self.chores: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []  # `call`s not yet run
        self.closed = False  # shutting down: what is in flight is answered 503 and the thread ends
        metrics.watch(waiting=self.depth, running=lambda: len(self.running),
                      rows=lambda: self.driver.batch.size if self.driver.batch is not None else 0)
        if engine.device.type == "cuda":
            metrics.watch_device(engine.device)
        self.thread = threading.Thread(target=self._run, name="decalign-engine", daemon=True)
        self.thread.start()

    def submit(self, request: PendingRequest) -> None:
        with self.arrived:
            if self.closed:
                raise _shutting_down()
            if len(self.waiting) >= self.config.queue_size:
                raise ApiError(429, f"the server is busy: {self.config.queue_size} requests are queued; retry later",
                               "rate_limit_exceeded")
            self.waiting.append(request)
            self.arrived.notify()

    def call(self, chore: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `chore` on the engine's thread between two steps (what changes the model, such as
        loading an adapter, must not run beside a forward pass); its future holds the result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.arrived:
            if self.closed:
                raise _shutting_down()
            self.chores.append((chore, future))
            self.arrived.notify()
        return future

    def users_of(self, adapter: str) -> int:
        """Waiting and running requests decoded with `adapter` (call on the engine's thread)."""
        with self.arrived:
            waiting = list(self.waiting)
        return sum(r.decoding.adapter_name == adapter for r in [*waiting, *self.running.values()])

    def depth(self) -> int:
        return len(self.waiting)

    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def close(self) -> None:
        """Shut down: at the next step every waiting and running request is answered 503, later
        ones are refused, and the engine's thread ends. Safe from any thread."""
        with self.arrived:
            self.closed = True
            self.arrived.notify()

    def stop(self, timeout: float = 60.0) -> None:
        """Close, and wait (at most `timeout` seconds) for the engine's thread to end its step, so
        that no forward pass is still running while the interpreter exits."""
        self.close()
        self.thread.join(timeout)

    def _run(self) -> None:
        while not self.closed:
            if not self.running:
                if not self._await_work(IDLE_RELEASE_SECONDS):
                    release_memory()  # idle a while: hand the last batch's memory back
                    self._await_work(None)
                if self.closed:
                    break
            self._run_chores()
            self._admit()
            if self.running:
                self._step()
        self._answer_shutdown()

    def _await_work(self, timeout: float | None) -> bool:
        """Wait (at most `timeout` seconds; None: as long as it takes) for a request, a chore or the
        server to close; whether any came."""
        with self.arrived:
            return self.arrived.wait_for(lambda: self.waiting or self.chores or self.closed, timeout)

    def _run_chores(self) -> None:
        with self.arrived:
            chores, self.chores = self.chores, []
        for chore, future in chores:
            try:
                future.set_result(chore())
            except Exception as exc:  # noqa: BLE001 - the caller answers it
                future.set_exception(exc)

    def _answer_shutdown(self) -> None:
        with self.arrived:
            waiting, self.waiting = self.waiting, []
            chores, self.chores = self.chores, []
        for _, future in chores:
            future.set_exception(_shutting_down())
        for method, request in self.running.items():
            self.driver.release(method)
            request.settle(_shutting_down())
        for request in waiting:
            request.settle(_shutting_down())
        self.running = {}

    def _admit(self) -> None:
        """Let waiting requests join while the running batch has room, in admission order; the
        others stay waiting (and count against the queue's bound, so its 429 holds while the engine
        is busy)."""
        with self.arrived:  # requests given up on (hung up, timed out) leave the queue and its bound
            self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
            waiting = list(self.waiting)  # a snapshot: requests may arrive while these are prepared
        if self.config.batching != "continuous" and self.running:
            return  # static and grouped batching: the next wave starts when this one is done
        gone = [r for r in waiting if not self._prepare(r)]
        candidates = self._admission_order([r for r in waiting if r not in gone])
        if self.config.batching == "grouped" and candidates:  # a wave asks for one decoding, as the first
            candidates = [r for r in candidates if _decoding_key(r) == _decoding_key(candidates[0])]
        joining: dict[Method, PendingRequest] = {}
        rows = self.driver.batch.size if self.driver.batch is not None else 0
        budget = self.config.max_join_tokens if self.config.batching == "continuous" else float("inf")
        for request in candidates:
            if not (len(self.running) + len(joining) < self.config.max_batch and (
                    rows < self.config.max_rows or not (self.running or joining))):
                break
            budget -= _prompt_tokens(request.method)
            if budget < 0 and joining:  # the rest join at later steps: a burst's prefill is spread over them
                break
            joining[request.method] = request
            rows += _rows(request.method)
        admitted = list(joining.values())
        joined = time.monotonic()
        for request in admitted:
            self.metrics.queue_time.labels(method=request.decoding.method).observe(joined - request.queued_at)
        later = len(admitted)
        for request in waiting:  # each admitted request overtook those that arrived before it and still wait
            if request in admitted:
                later -= 1
            elif request not in gone:
                request.overtaken += later
        with self.arrived:
            self.waiting = [r for r in self.waiting if r not in gone and r not in admitted]
        if not joining:
            return
        now = self.config.join == "own-pass"  # encoded at once: first tokens a step sooner, one more pass
        try:
            self.driver.add(list(joining), now=now)
        except Exception:  # one request's prompts could not join: each on its own, so it fails alone
            for method, request in list(joining.items()):
                try:
                    self.driver.add([method], now=now)
                except Exception as exc:
                    self.driver.release(method)
                    request.settle(_api_error(exc))
                    del joining[method]
        for method, request in joining.items():
            if self.driver.is_running(method):
                self.running[method] = request
            else:  # answered or failed as it joined
                self._answer(method, request)

    def _prepare(self, request: PendingRequest) -> bool:
        """Build the request's step machine (once); False, with its error answered, if it cannot be."""
        if request.method is None:
            try:
                request.method = start(request.decoding, request.publish,
                                       lambda _, r=request: r.cancelled.is_set())
            except Exception as exc:
                request.settle(_api_error(exc))
                return False
        return True

    def _admission_order(self, waiting: list[PendingRequest]) -> list[PendingRequest]:
        if self.config.admission == "arrival":
            return waiting
        limit = self.config.max_batch

        def key(request: PendingRequest) -> tuple[int, int]:  # sorted() is stable: ties keep arrival order
            if request.overtaken >= limit:  # overdue: first, by arrival
                return (0, 0)
            return (1, _rows(request.method) * request.method.job.max_new_tokens)
        return sorted(waiting, key=key)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            left = self.driver.step()
        except Exception as exc:  # the forward pass itself failed: every running request fails with it
            LOG.error("decoding step failed: %s: %s", type(exc).__name__, exc)  # one line, no traceback
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
        self.metrics.count_answer(self.config.served_name(request.decoding.adapter_name), method.results)
        if request.alternatives:  # one teacher-forced pass per choice, on this thread (the engine's)
            try:  # over the prompt ids the answers were decoded from (one per choice)
                request.top_tokens = [
                    self.engine.top_tokens(ids, result.tokens, request.alternatives, method.job.adapter)
                    for ids, result in zip(method.job.prompt_ids, method.results)]
            except Exception as exc:
                request.settle(_api_error(exc))
                return
        request.settle(list(method.results))  # one Result per choice


def _rows(method: Method) -> int:
    """The rows a request's method holds in the batch."""
    return method.rows_per_prompt() * len(method.job.prompts)


def _prompt_tokens(method: Method) -> int:
    """The prompt tokens a request's joining step encodes (each prompt once, whatever its rows)."""
    return sum(len(ids) for ids in method.job.prompt_ids)


def _decoding_key(request: PendingRequest) -> str:
    """What the scheduler before continuous batching grouped requests by: everything but the prompt
    and the seed."""
    d = request.decoding
    return json.dumps([request.chat, d.method, d.params, str(d.reward), d.value, d.max_new_tokens,
                       d.min_new_tokens, d.stop, d.system], sort_keys=True, default=str)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another server or once it is back", "server_error")


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
