"""The engine's only user: one worker thread that takes requests from a bounded queue and decodes
the requests that arrived together in one batch, whatever method, reward or limits each asked for
(`run_together`: one forward pass per step for all of them)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..api import run_together
from ..engine import Engine, Prompt
from ..errors import DecalignError
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
    updates: asyncio.Queue | None = None  # streaming: committed text as it grows
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt(self) -> Prompt:
        return self.decoding.prompts[0]

    def publish(self, _: int, text: str) -> None:
        if self.updates is not None:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, text)

    def settle(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value)


class Scheduler:
    """Takes requests from a bounded queue and decodes those that arrived together in one batch, on its
    own thread."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.pending: queue.Queue[PendingRequest] = queue.Queue(maxsize=config.queue_size)
        metrics.watch_queue(self.depth)
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
            batch = [self.pending.get()]
            deadline = time.monotonic() + self.config.batch_window
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            live = [request for request in batch if not request.cancelled.is_set()]
            if live:
                self._decode(live)
            if self.pending.empty():
                _release_memory()

    def _decode(self, requests: list[PendingRequest]) -> None:
        """Decode requests side by side in one batch, whatever each asked for; if that fails, each
        alone, so that one failing request (a reward that raises) answers for itself only."""
        try:
            results = [answers[0] for answers in run_together(
                [r.decoding for r in requests], listeners=[r.publish for r in requests],
                cancelled=[lambda _, r=r: r.cancelled.is_set() for r in requests])]
        except Exception as exc:
            if len(requests) > 1:
                for request in requests:
                    self._decode([request])
            else:
                requests[0].settle(_api_error(exc))
            return
        self.metrics.count_batch(results)
        for request, result in zip(requests, results):
            request.settle(result)


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, DecalignError):
        return ApiError(400, str(exc))
    return ApiError(500, f"decoding failed: {type(exc).__name__}", "server_error")  # without a trace


def _release_memory() -> None:
    """Hand memory freed by finished batches back to the OS once the queue is idle (glibc keeps it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _settle(future: asyncio.Future, value: Any) -> None:
    """Resolve `future` with a result or an exception, unless its waiter already gave up on it."""
    if not future.done():
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
