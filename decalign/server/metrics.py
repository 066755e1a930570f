"""The server's Prometheus series, served at /metrics in the text exposition format."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..result import Result

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


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
                                        "Tokens the engine generated, candidates discarded by a method included.",
                                        registry=self.registry)
        self.reward_calls = Counter("decalign_reward_calls_total", "Items the rewards scored.", registry=self.registry)
        self.batches = Counter("decalign_batches_total", "Batches of companion requests decoded together.",
                               registry=self.registry)
        self.queue_depth = Gauge("decalign_queue_depth", "Requests waiting for the engine.", registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.observe(seconds)

    def count_batch(self, results: Sequence[Result]) -> None:
        self.batches.inc()
        self.generated_tokens.inc(sum(result.stats["generated_tokens"] for result in results))
        self.reward_calls.inc(sum(result.stats["reward_calls"] for result in results))

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from `depth()` at each scrape."""
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
