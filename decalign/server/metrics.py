"""The server's Prometheus series, served at /metrics in the text exposition format."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..result import Result

if TYPE_CHECKING:
    import torch

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))


class Metrics:
    """One app's series, in a registry of its own rather than prometheus_client's global one, so
    two apps in one process (tests, an embedding program) neither collide nor share counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("decalign_requests_total", "Answered /v1/ requests, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("decalign_request_seconds", "Seconds from a /v1/ request's arrival to its response.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("decalign_generated_tokens_total",
                                        "Tokens the engine generated, candidates discarded by a method included, by "
                                        "the served model or adapter that generated them.", ["model"],
                                        registry=self.registry)
        self.answered = Counter("decalign_answered_requests_total",
                                "Requests the engine answered, by the served model or adapter that answered them.",
                                ["model"], registry=self.registry)
        self.reward_calls = Counter("decalign_reward_calls_total", "Items the rewards scored.", registry=self.registry)
        self.value_calls = Counter("decalign_value_calls_total", "Partial answers the prefix values scored.",
                                   registry=self.registry)
        self.steps = Histogram("decalign_step_seconds", "Seconds per engine step (one forward pass for every running "
                               "request, and what their methods do with it).", buckets=STEP_BUCKETS,
                               registry=self.registry)
        self.first_token = Histogram("decalign_time_to_first_token_seconds",
                                     "Seconds from a streamed request's arrival to its first text, by method.",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("decalign_request_queue_seconds",
                                    "Seconds a request waited in the queue before it joined the running batch, "
                                    "by method.", ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("decalign_queue_depth", "Requests waiting to join the running batch.",
                                 registry=self.registry)
        self.running = Gauge("decalign_running_requests", "Requests in the running batch.", registry=self.registry)
        self.rows = Gauge("decalign_live_rows", "Rows (candidates, particles, ...) in the running batch.",
                          registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.observe(seconds)

    def count_answer(self, model: str, results: list[Result]) -> None:
        """A request answered by `model` (the served model or one of its adapters), one result per choice."""
        self.answered.labels(model=model).inc()
        for result in results:
            self.generated_tokens.labels(model=model).inc(result.stats["generated_tokens"])
            self.reward_calls.inc(result.stats["reward_calls"])
            self.value_calls.inc(result.stats["value_calls"])

    def step(self, seconds: float) -> None:
        self.steps.observe(seconds)

    def watch(self, *, waiting: Callable[[], int], running: Callable[[], int], rows: Callable[[], int]) -> None:
        """Read the scheduler's queue, running requests and live rows at each scrape."""
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)
        self.rows.set_function(rows)

    def watch_device(self, device: torch.device) -> None:
        """On a CUDA engine, the device memory torch's allocator uses (`allocated`), holds (`reserved`:
        what it would hand back when the server is idle) and held at most (`peak_reserved`), read at
        each scrape."""
        import torch

        memory = Gauge("decalign_device_memory_bytes", "GPU memory of torch's CUDA allocator, by kind: allocated, "
                       "reserved, peak_reserved.", ["kind"], registry=self.registry)
        for kind, read in (("allocated", torch.cuda.memory_allocated), ("reserved", torch.cuda.memory_reserved),
                           ("peak_reserved", torch.cuda.max_memory_reserved)):
            memory.labels(kind=kind).set_function(lambda read=read: read(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
