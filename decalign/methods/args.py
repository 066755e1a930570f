"""ARGS, reward-guided search (Khanov et al., arXiv:2402.01694): a reward look-ahead at every token.

    at each step: take the k most likely next tokens;
                  score prompt + answer-so-far + token with the reward, for each of the k;
                  pick argmax of logprob + w * reward   (mode=greedy)
                  or sample from softmax((logprob + w * reward) / temperature)   (mode=sample)

Defaults k = 40, w = 1.5 as in the CARDS paper's baseline. Costs k reward items per token. With
`value=`, the k look-ahead prefixes are scored by the value instead: each row forks k copies that read
their candidate token in one forward pass (k policy rows per token instead of k reward items), and a
candidate that ends the answer is scored by the reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import Batch, Move, Write
from ..errors import DecalignError
from ..sampling import Sampling, choose_tokens
from .base import Method, param, register


@dataclass
class ArgsConfig:
    k: int = param(40, "candidate next tokens scored per step")
    w: float = param(1.5, "reward weight: pick by logprob + w * reward")
    mode: str = param("greedy", "greedy: the best candidate; sample: draw from softmax(score / temperature)")
    temperature: float = param(1.0, "temperature of mode=sample")
    value: str | None = param(None, "prefix value (shipped name or folder) scoring the look-ahead; the reward "
                                    "scores finished answers")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DecalignError(f"k must be >= 1, got {self.k}")
        if self.mode not in ("greedy", "sample"):
            raise DecalignError(f"mode must be greedy or sample, got {self.mode!r}")
        if not self.temperature > 0:
            raise DecalignError(f"temperature must be > 0, got {self.temperature}")


@register("args", ArgsConfig, needs_reward=True,
          summary="token-level search: top-k next tokens re-ranked by logprob + w * reward")
class Args(Method):
    streams_tokens = True

    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.rows = [row for group in rows for row in group]
        self.answer_reward: dict[int, float] = {}  # the reward of each row's text as it stands

    def moves(self) -> list[Move]:
        job, batch, config = self.job, self.batch, self.config
        live = [r for r in self.rows if batch.finish[r] is None]
        if not live:
            return []
        logprobs = batch.mask_early_eos(live, batch.next_logits(live)).log_softmax(-1)
        top_logprobs, top_tokens = logprobs.topk(min(config.k, logprobs.shape[-1]), dim=-1)
        top_logprobs, top_tokens = top_logprobs.tolist(), top_tokens.tolist()
        if job.value is not None:
            flat = self._look_ahead(live, top_tokens)
        else:
            owners, texts = [], []
            for row, tokens in zip(live, top_tokens):
                owners += [job.prompt_of(batch, row)] * len(tokens)
                texts += [job.engine.decode(batch.tokens[row] + [token]) for token in tokens]
            flat = job.score(owners, texts)
        width = len(top_tokens[0])
        rewards = [flat[i * width:(i + 1) * width] for i in range(len(live))]
        # in float64, as the reward gave them: float32 rounded them (0.1 came back 0.10000000149) and
        # made a finite reward above 3.4e38 infinite
        scores = (torch.tensor(top_logprobs, dtype=torch.float64, device=logprobs.device)
                  + config.w * torch.tensor(rewards, dtype=torch.float64, device=logprobs.device))
        sampling = Sampling(0.0 if config.mode == "greedy" else config.temperature)
        picks = choose_tokens(scores, sampling, [batch.generators[r] for r in live]).tolist()
        self.answer_reward.update({row: rewards[i][pick] for i, (row, pick) in enumerate(zip(live, picks))})
        return [Write({row: top_tokens[i][pick] for i, (row, pick) in enumerate(zip(live, picks))})]

    def react(self) -> None:
        if all(self.batch.finish[r] is not None for r in self.rows):
            self.results[:] = self.job.results(self.batch, self.rows,
                                               rewards=[self.answer_reward[r] for r in self.rows])

    def live_rows(self) -> list[int]:
        return list(self.rows)

    def remap(self, new_row: dict[int, int]) -> None:
        self.rows = [new_row[r] for r in self.rows]
        self.answer_reward = {new_row[r]: v for r, v in self.answer_reward.items()}

    def _look_ahead(self, live: list[int], top_tokens: list[list[int]]) -> list[float]:
        """Scores of each live row's answer extended by each of its candidate tokens: forked copies
        (appended after every row of the batch) read the candidates in one forward pass, are scored,
        and leave the batch; the rows keep their streams."""
        batch = self.batch
        size = batch.size
        forks = [row for row, tokens in zip(live, top_tokens) for _ in tokens]
        listener, batch.on_token = batch.on_token, None  # look-ahead tokens are not the answer's
        try:
            batch.select(list(range(size)) + forks)
            batch.append({size + i: token for i, token in enumerate(t for tokens in top_tokens for t in tokens)})
            scores = self.job.evaluate(batch, range(size, size + len(forks)))
            batch.select(list(range(size)))
        finally:
            batch.on_token = listener
        return scores
