"""The server's settings (`decalign serve` fills them from its options)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DecalignError

CHOICES = {"batching": ("continuous", "static", "grouped"), "admission": ("shortest", "arrival"),
           "join": ("in-step", "own-pass")}
SERVE_OPTIONS = {"max_tokens_limit", "queue_size", "timeout", "max_batch", "max_rows", "max_join_tokens", "batching",
                 "admission", "join"}
AT_LEAST_ONE = ("max_tokens_limit", "default_max_tokens", "max_request_bytes", "queue_size", "max_batch", "max_rows",
                "max_join_tokens")


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
    max_join_tokens: int = 512  # prompt tokens joining at one step (at least one request joins), continuous batching
    batching: str = "continuous"  # or, to compare against: "static" (requests join only an idle engine, in
    # waves of any mix) or "grouped" (the scheduler before continuous batching: waves of one decoding each)
    admission: str = "shortest"  # cheapest waiting request first, overtaken at most max_batch times; or "arrival"
    join: str = "in-step"  # a joining prompt is encoded in the next step's pass; or "own-pass": at once, alone
    allow_adapter_loading: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter answer

    def __post_init__(self) -> None:
        """Settings are checked here, so the Python API refuses what the CLI refuses (one line each)."""
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise DecalignError(f"{_named(name)} must be >= 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise DecalignError(f"{_named('timeout')} must be > 0, got {self.timeout}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise DecalignError(f"{_named(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def served_name(self, adapter: str | None) -> str:
        """The model an answer decoded with `adapter` (a name loaded by name, or None) names."""
        return adapter or self.model_name


def _named(field_name: str) -> str:
    """A setting as both its users know it: `max_rows (--max-rows)` where `decalign serve` has it."""
    return f"{field_name} (--{field_name.replace('_', '-')})" if field_name in SERVE_OPTIONS else field_name
