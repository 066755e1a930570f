"""What every method returns: the answer, its reward, what it cost, and its candidates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Candidate:
    """One complete answer a method considered (Best-of-N keeps all N)."""

    text: str
    tokens: list[int]
    reward: float | None
    finish_reason: str


@dataclass
class Result:
    """One prompt's answer.

    `stats` always holds: wall_time (seconds of the batch that produced it), batch_size (prompts
    decoded together), forward_passes, prefill_tokens, decode_tokens, generated_tokens,
    discarded_tokens (generated but not in the answer), reward_calls (items scored for this prompt),
    value_calls (partial answers its prefix value scored: a dot product each, no model call).
    """

    text: str
    tokens: list[int]
    reward: float | None
    stats: dict
    method: str
    params: dict = field(default_factory=dict)
    finish_reason: str = ""
    candidates: list[Candidate] | None = None
    trace: list[dict] | None = None
    logprobs: list[float] | None = None  # the policy's log-probability of each answer token

    def to_dict(self) -> dict:
        return asdict(self)
