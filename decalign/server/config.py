"""The server's settings (`decalign serve` fills them from its options)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    model_name: str = "smollm2"
    method: str | None = None  # None: OpenAI's meaning (sample at the request's temperature, greedy at 0)
    reward: str | None = None
    method_params: dict = field(default_factory=dict)
    api_key: str | None = None
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_request_bytes: int = 1_000_000
    queue_size: int = 64
    timeout: float = 300.0  # seconds from arrival to answer
    max_batch: int = 16  # requests in the running batch
    max_rows: int = 256  # no request joins while the running batch has this many rows
    batching: str = "continuous"  # or "static": requests join only an idle engine (waves; for comparison)
    admission: str = "shortest"  # cheapest waiting request first, overtaken at most max_batch times; or "arrival"
