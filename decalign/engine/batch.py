"""KV-cached rows: one `Batch` holds live candidate continuations of prompts in one cache.

Methods call:
- `extend`: sample a segment on rows, each with its own stop rules;
- `append`: feed chosen tokens (token-level methods pick them from `next_logits`);
- `select`: keep or repeat rows (fork candidates from a shared prefix);
- `crop`: cut rows back to an earlier length, removing the rejected tokens from the cache.

Layout: the cache is left-padded, rows are ragged through the attention mask. A cropped token or an
idle row's step leaves a masked hole; position ids count only unmasked tokens, so a row attends
exactly to its own prompt and tokens. When holes pile up the cache is compacted by a gather, which
moves keys and values but recomputes nothing. A step where few rows take a token runs those rows
alone (`cache.RowLayer`); the others' new position is a hole.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..errors import DecalignError
from ..sampling import Sampling, choose_tokens, derive_seed, make_generator
from .adapters import BASE
from .cache import only_rows, reserve_room, row_cache, window_bias
from .decoder import Part, attention_bias, planless_attention
from .stopping import CutRule, StepView, StopRule, TokenView

if TYPE_CHECKING:
    from .core import Engine


@dataclass
class Work:
    """Policy work done for one prompt, counted the same way for every method."""

    forward_passes: int = 0  # forward calls this prompt's rows took part in
    prefill_tokens: int = 0  # prompt tokens encoded
    decode_tokens: int = 0  # tokens fed through the policy after the prompt
    generated_tokens: int = 0  # tokens sampled or chosen (kept or later thrown away)


@dataclass
class Segment:
    """What one `extend` wrote on one row. `reason` says why the segment ended:
    'eos', 'stop' (stop string), 'length' (token budget or context) finish the row;
    'rule' (stop rule fired before sampling) and 'segment' (segment cap) leave it live."""

    row: int
    start: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    reason: str = ""


FINISHED = ("eos", "stop", "length")


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of a batch: its token ids, how many rows it gets, and the limits of its answers.
    Prompts of different requests (different limits, adapters, tracked layers) share one batch."""

    ids: Sequence[int]
    seed: int | None = None  # its rows draw from streams derived from it (None: a fresh one)
    rows: int = 1  # rows forked from its one encoding
    adapter: str | None = None  # PEFT adapter its rows run with (BASE: without; None: the model as loaded)
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    state_layers: tuple[int, ...] = ()  # layers whose hidden states its rows keep (for a prefix value)


@dataclass
class Sample:
    """A move: sample one token on each running segment (see `Batch.step`)."""

    segments: Sequence[Segment]
    sampling: Sampling
    max_tokens: int | None = None
    stop_rule: StopRule | None = None
    cut_rule: CutRule | None = None


@dataclass
class Write:
    """A move: write chosen tokens (row -> token id), as `Batch.append` does."""

    tokens: dict[int, int]


Move = Sample | Write


class Batch:
    """Live rows of one or more prompts in one KV cache. Row i belongs to prompt `prompt_of[i]`."""

    def __init__(self, engine: Engine, prompts: Sequence[BatchPrompt], *, joins: bool = False) -> None:
        """joins=True: rows to join another batch (`prepare_join`): the prompts are checked now and
        encoded later, in that batch's next pass (`advance(..., joining=)`) or one of their own, and
        no cache room is reserved, since the rows are copied into the other batch's cache."""
        # per-row PEFT adapter names, or None: every row runs the model as loaded
        self.adapters, self.state_layers = self.check_prompts(engine, prompts)
        self.engine = engine
        self.prompts = list(prompts)
        self.prompt_lengths = [len(p.ids) for p in prompts]
        self.work = [Work(prefill_tokens=len(p.ids)) for p in prompts]
        device = engine.device

        width = max(self.prompt_lengths)
        input_ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt.ids):] = torch.tensor(list(prompt.ids), dtype=torch.long)
            mask[i, width - len(prompt.ids):] = 1
        self.cache = row_cache(engine.model.config)
        self.mask = mask[:, :0]
        self.unencoded: tuple[torch.Tensor, torch.Tensor] | None = (input_ids, mask)  # its prompts, until encoded
        self.joins = joins
        if not joins:
            self._encode()

    @staticmethod
    def check_prompts(engine: Engine, prompts: Sequence[BatchPrompt]) -> tuple[list[str] | None, tuple[int, ...]]:
        """Refuse prompts a batch cannot take (bad limits, empty or too long, unknown adapters, state
        layers out of range); return their adapter names (None: all as loaded) and state layers."""
        if not prompts:
            raise DecalignError("no prompts given")
        for i, prompt in enumerate(prompts):
            if prompt.rows < 1:
                raise DecalignError(f"n must be >= 1, got {prompt.rows}")
            if prompt.max_new_tokens < 1:
                raise DecalignError(f"max_new_tokens must be >= 1, got {prompt.max_new_tokens}")
            if not 0 <= prompt.min_new_tokens <= prompt.max_new_tokens:
                raise DecalignError(f"min_new_tokens must be between 0 and max_new_tokens, got {prompt.min_new_tokens}")
            if not prompt.ids:
                raise DecalignError(f"prompt {i} encodes to no tokens")
            engine.check_fits(prompt.ids, "the prompt" if len(prompts) == 1 else f"prompt {i}")
        adapters = None
        if any(prompt.adapter is not None for prompt in prompts):
            adapters = [engine.active_adapter() if p.adapter is None else p.adapter for p in prompts]
            unknown = sorted(set(adapters) - set(engine.adapter_names()) - {BASE})
            if unknown:
                loaded = ", ".join(engine.adapter_names()) or "none"
                raise DecalignError(f"no adapter named {', '.join(unknown)} on the model (loaded: {loaded})")
        layers = tuple(dict.fromkeys(layer for p in prompts for layer in p.state_layers))
        if any(not 0 <= layer <= engine.num_layers for layer in layers):
            raise DecalignError(f"state layers must lie in 0..{engine.num_layers}, got {list(layers)}")
        return adapters, layers

    def _encode(self) -> None:
        """Encode the prompts in a forward pass of their own."""
        self._encoded(*self._forward(*self.unencoded))

    def _prompt_part(self) -> Part:
        """The prompts as a part of another batch's forward pass (see `_forward`)."""
        input_ids, mask = self.unencoded
        return Part(input_ids, *self._inputs(input_ids, mask, None), self.cache, self.state_layers)

    def _encoded(self, logits: torch.Tensor, states: torch.Tensor | None) -> None:
        """Start the rows from the prompts' encoding: fork each prompt's rows, reserve the cache's
        room, set up the per-row state."""
        prompts, device = self.prompts, self.engine.device
        width = self.unencoded[1].shape[1]
        self.unencoded = None
        self.logits = logits
        for work in self.work:
            work.forward_passes += 1
        self.prompt_states = states[:, -1] if states is not None else None
        self.prompt_of = [q for q, prompt in enumerate(prompts) for _ in range(prompt.rows)]
        rows = len(self.prompt_of)
        longest = max(p.max_new_tokens for p in prompts)
        if not self.joins:  # before forking: the forks keep the room, no step grows it
            reserve_room(self.cache, width + longest)
        if rows > len(prompts):  # fork: every candidate shares its prompt's encoding
            index = torch.tensor(self.prompt_of, dtype=torch.long, device=device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            self.logits = self.logits[index]
            self.prompt_states = self.prompt_states[index] if states is not None else None
        if self.adapters is not None:
            self.adapters = [self.adapters[q] for q in self.prompt_of]
        # tracked hidden states: the prompt's last token's, each fed answer token's, and their running sum
        self.answer_states = states.new_zeros((rows, longest, states.shape[-1])) if states is not None else None
        self.state_sums = states.new_zeros((rows, states.shape[-1])) if states is not None else None
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.entropies: list[list[float]] = [[] for _ in range(rows)]
        self.fed = [0] * rows  # generated tokens present in the cache
        self.finish: list[str | None] = [None] * rows
        self.snapshots: list[dict[int, torch.Tensor]] = [{} for _ in range(rows)]
        seeds = [torch.seed() if p.seed is None else p.seed for p in prompts]
        self.seeds = [derive_seed(seeds[q], c) for q, prompt in enumerate(prompts) for c in range(prompt.rows)]
        self.generators = [make_generator(seed) for seed in self.seeds]
        self._forks = 0
        self.on_token: Callable[[int, int], None] | None = None  # (row, token) as each token is written
        self.cancelled: Callable[[int], bool] | None = None  # prompt -> True once its client has gone

    # ----- views ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.prompt_of)

    def live_rows(self) -> list[int]:
        return [r for r in range(self.size) if self.finish[r] is None]

    def is_cancelled(self, prompt: int) -> bool:
        return self.cancelled is not None and self.cancelled(prompt)

    def _drop_cancelled(self, rows: list[int]) -> list[int]:
        """Finish the rows of cancelled prompts (reason 'cancelled'); return the others."""
        if self.cancelled is None:
            return rows
        kept = []
        for r in rows:
            if self.cancelled(self.prompt_of[r]):
                self.finish[r] = "cancelled"
            else:
                kept.append(r)
        return kept

    def next_logits(self, rows: Sequence[int]) -> torch.Tensor:
        """Raw next-token logits of live rows (for token-level methods)."""
        return self.logits[torch.as_tensor(list(rows), dtype=torch.long, device=self.logits.device)]

    def text(self, row: int) -> str:
        text = self.engine.decode(self.tokens[row])
        for stop, start in self._stops(row):
            cut = text.find(stop, start)
            if cut >= 0:
                text = text[:cut]
        return text

    def _stops(self, row: int) -> list[tuple[str, int]]:
        """The row's stop strings, each with where in its text an occurrence may start. With
        min_new_tokens, as vLLM's min_tokens, a stop string counts only if it ends in the text of
        the min_new_tokens-th token or later."""
        limits = self.prompts[self.prompt_of[row]]
        if not limits.stop_strings:
            return []
        held = self.tokens[row][:max(limits.min_new_tokens - 1, 0)]  # tokens a stop string may not end in
        before = len(self.engine.decode(held)) if held else 0
        return [(stop, max(0, before - len(stop) + 1)) for stop in limits.stop_strings]

    def _tracked(self) -> None:
        if not self.state_layers:
            raise DecalignError("this batch keeps no hidden states; open it with state_layers")

    def _columns(self, layers: Sequence[int] | None) -> slice | torch.Tensor:
        """The feature columns of `layers` (in that order) among the tracked ones; all by default."""
        if layers is None or tuple(layers) == self.state_layers:
            return slice(None)
        missing = sorted(set(layers) - set(self.state_layers))
        if missing:
            raise DecalignError(f"this batch keeps no hidden states of layers {missing}")
        width = self.state_sums.shape[-1] // len(self.state_layers)
        return torch.cat([torch.arange(self.state_layers.index(layer) * width, (self.state_layers.index(layer) + 1)
                                       * width) for layer in layers])

    def state_means(self, rows: Sequence[int], layers: Sequence[int] | None = None) -> torch.Tensor:
        """Per row, the mean of the tracked states (of `layers`, default all) over the answer tokens
        read so far (0 for none)."""
        self._tracked()
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        counts = torch.tensor([self.fed[r] for r in rows], dtype=self.state_sums.dtype, device=self.mask.device)
        return self.state_sums[index][:, self._columns(layers)] / counts.clamp(min=1)[:, None]

    def last_states(self, rows: Sequence[int], layers: Sequence[int] | None = None) -> torch.Tensor:
        """Per row, the tracked states (of `layers`, default all) at the last token read (the
        prompt's last token before any)."""
        self._tracked()
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        fed = torch.tensor([self.fed[r] for r in rows], dtype=torch.long, device=self.mask.device)
        latest = self.answer_states[index, (fed - 1).clamp(min=0)]
        columns = self._columns(layers)
        return torch.where((fed > 0)[:, None], latest, self.prompt_states[index])[:, columns]

    # ----- the model call ---------------------------------------------------------------------
    def _inputs(self, input_ids: torch.Tensor, new_mask: torch.Tensor, rows: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions to the mask; the attention mask and position ids of a pass feeding
        `input_ids` on every row or on `rows`."""
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        mask = self.mask if rows is None else self.mask[rows]
        return mask, (mask.cumsum(-1) - 1).clamp_(min=0)[:, -input_ids.shape[1]:]

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, rows: torch.Tensor | None = None,
                 joining: "Batch | None" = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run new tokens through the policy on every row, or on `rows` only (`input_ids` then has
        their tokens; the other rows' new positions are masked holes); return last-position logits
        and, when states are tracked, the tracked layers' states at every new position (rows x new x
        features). `joining`: an unencoded batch whose prompts are encoded in the same pass (one
        read of the weights for both) where the engine's decoder runs and the LoRA row gate covers
        both sides' adapters, in a pass of their own otherwise."""
        mask, positions = self._inputs(input_ids, new_mask, rows)
        adapters = self.adapters if self.adapters is None or rows is None else [self.adapters[r] for r in rows.tolist()]
        context, extra = self.engine.adapter_route(adapters) if adapters is not None else (nullcontext(), {})
        decoder = self.engine.decoder if not extra else None  # extra: PEFT's own per-row route
        if joining is not None:
            shared = self._shared_gate(adapters, input_ids.shape, joining) if decoder is not None else None
            if shared is None:
                joining._encode()
                joining = None
            else:
                context = shared
        with context, planless_attention(), (only_rows(self.cache, rows) if rows is not None else nullcontext()):
            if decoder is not None:
                parts = [Part(input_ids, mask, positions, self.cache, self.state_layers)]
                if joining is not None:
                    parts.append(joining._prompt_part())
                (logits, states), *theirs = decoder.run(parts)
                if joining is not None:
                    joining._encoded(theirs[0][0].float(), theirs[0][1])
                return logits.float(), states
            if self.engine.windows is not None:  # the window counted in tokens, over a cache that keeps every position
                mask = window_bias(attention_bias(mask, input_ids.shape[1], self.engine.model.dtype), mask,
                                   self.engine.windows)
            out = self.engine.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=bool(self.state_layers),
                **extra,
            )
        states = torch.cat([out.hidden_states[layer] for layer in self.state_layers], dim=-1) \
            if self.state_layers else None
        return out.logits[:, -1, :].float(), states

    def _shared_gate(self, adapters: list[str] | None, shape: torch.Size, joining: "Batch"
                     ) -> AbstractContextManager | None:
        """The adapter context of one decoder pass over this batch's new tokens (`shape`: rows x new,
        with `adapters` per row or None) and a joining batch's prompts: none needed without adapters;
        with them, a 0/1 LoRA factor per token (the pass puts every token on one axis); None where the
        row gate cannot serve them (the joiners then get a pass of their own)."""
        if adapters is None and joining.adapters is None:
            return nullcontext()
        loaded = self.engine.active_adapter()
        rows, new = shape
        width = joining.unencoded[0].shape[1]
        tokens = [a for a in adapters or [loaded] * rows for _ in range(new)]
        tokens += [a for a in joining.adapters or [loaded] * len(joining.prompts) for _ in range(width)]
        gates = self.engine.lora_gate.row_gate(tokens)
        return None if gates is None else self.engine.lora_gate.gated(gates, (1, -1, 1))

    def _forward_rows(self, input_ids: torch.Tensor, new_mask: torch.Tensor, rows: torch.Tensor,
                      joining: "Batch | None" = None) -> torch.Tensor | None:
        """A forward pass that feeds `rows` (`input_ids` and `new_mask` cover every row; the others
        hold masked padding): refresh their logits and return their states, in that order. When few
        rows are fed, only they run through the model. `joining`: see `_forward`."""
        if len(rows) < self.engine.subset_share * self.size:
            logits, states = self._forward(input_ids[rows], new_mask, rows, joining)
            self.logits[rows] = logits
            return states
        logits, states = self._forward(input_ids, new_mask, joining=joining)
        if len(rows) == self.size:  # every row fed: the new logits are the batch's, no copy
            self.logits = logits
        else:
            self.logits[rows] = logits[rows]
        return states[rows] if states is not None else None

    def _feed(self, tokens: dict[int, int], joining: "Batch | None" = None) -> None:
        """Write one token on each given row (others get a masked hole) and refresh their logits
        (`joining`: see `_forward`)."""
        device = self.mask.device
        rows = torch.tensor(list(tokens), dtype=torch.long, device=device)
        positions = torch.tensor([self.fed[r] for r in tokens], dtype=torch.long, device=device)
        fed = torch.zeros(self.size, dtype=torch.bool, device=device)
        fed[rows] = True
        input_ids = torch.full((self.size, 1), self.engine.pad_id, dtype=torch.long, device=device)
        input_ids[rows, 0] = torch.tensor(list(tokens.values()), dtype=torch.long, device=device)
        for row in tokens:
            self.fed[row] += 1
        states = self._forward_rows(input_ids, fed.long().unsqueeze(1), rows, joining)
        if states is not None:
            self.answer_states[rows, positions] = states[:, 0]
            self.state_sums[rows] += states[:, 0]
        for prompt in {self.prompt_of[r] for r in tokens}:
            self.work[prompt].forward_passes += 1
        for row in tokens:
            self.work[self.prompt_of[row]].decode_tokens += 1

    # ----- writing tokens ---------------------------------------------------------------------
    def _record(self, row: int, token: int, logprob: float, entropy: float, *, new: bool = True) -> str | None:
        """Append a chosen token to a row; return its finish reason if the row is now done."""
        self.tokens[row].append(token)
        self.logprobs[row].append(logprob)
        self.entropies[row].append(entropy)
        if new:
            self.work[self.prompt_of[row]].generated_tokens += 1
            if self.on_token is not None:
                self.on_token(row, token)
        limits = self.prompts[self.prompt_of[row]]
        if token in self.engine.eos_ids and len(self.tokens[row]) >= limits.min_new_tokens:
            return "eos"
        if limits.stop_strings and len(self.tokens[row]) >= limits.min_new_tokens:
            text = self.engine.decode(self.tokens[row])
            if any(text.find(stop, start) >= 0 for stop, start in self._stops(row)):
                return "stop"
        total = self.prompt_lengths[self.prompt_of[row]] + len(self.tokens[row])
        if len(self.tokens[row]) >= limits.max_new_tokens or (
            self.engine.context_length and total >= self.engine.context_length
        ):
            return "length"
        return None

    def _distribution(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        every_row_in_order = len(rows) == self.size and all(r == i for i, r in enumerate(rows))
        raw = self.logits if every_row_in_order else self.next_logits(rows)  # read here, never written
        logp = raw.log_softmax(-1)
        entropy = logp.exp().mul_(logp).nan_to_num_().sum(-1).neg_()  # in place: one buffer per step
        return raw, logp, entropy

    def mask_early_eos(self, rows: list[int], scores: torch.Tensor) -> torch.Tensor:
        """Scores with EOS at -inf on rows that have not yet written min_new_tokens."""
        early = [i for i, r in enumerate(rows)
                 if len(self.tokens[r]) < self.prompts[self.prompt_of[r]].min_new_tokens]
        if early and self.engine.eos_ids:
            scores = scores.clone()
            scores[torch.tensor(early)[:, None], torch.tensor(sorted(self.engine.eos_ids))[None, :]] = float("-inf")
        return scores

    def extend(
        self,
        sampling: Sampling,
        *,
        rows: Sequence[int] | None = None,
        max_tokens: int | None = None,
        stop_rule: StopRule | None = None,
        cut_rule: CutRule | None = None,
    ) -> list[Segment]:
        """Write a segment on each live row in `rows` (default: all live rows) until the row
        finishes, the stop rule fires before a token, the cut rule fires after one, or the
        segment reaches `max_tokens`."""
        rows = self.live_rows() if rows is None else [r for r in rows if self.finish[r] is None]
        segments = self.open_segments(rows)
        running = list(segments)
        while running:
            self.step(running, sampling, max_tokens=max_tokens, stop_rule=stop_rule, cut_rule=cut_rule)
            running = [s for s in running if not s.reason]
        self.compact()
        return segments

    def open_segments(self, rows: Sequence[int], *, forget_earlier: bool = False,
                      croppable: bool = True) -> list[Segment]:
        """Start a segment on each row, saving the logits at its start: a rejected segment is then
        cropped back here without recomputing anything. forget_earlier: drop the logits saved at
        earlier starts (the caller will never crop back past this one). croppable=False saves
        nothing, for callers that never crop a segment away."""
        for r in rows:
            if forget_earlier:
                self.snapshots[r] = {}
            if croppable:
                self.snapshots[r][len(self.tokens[r])] = self.logits[r].clone()
        return [Segment(row=r, start=len(self.tokens[r])) for r in rows]

    def step(
        self,
        segments: Sequence[Segment],
        sampling: Sampling,
        *,
        max_tokens: int | None = None,
        stop_rule: StopRule | None = None,
        cut_rule: CutRule | None = None,
    ) -> None:
        """One token on each running segment (reason ""): set a segment's reason when it ends
        (finish reason, 'rule', 'segment' at max_tokens, 'cancelled')."""
        self.advance([Sample(segments, sampling, max_tokens, stop_rule, cut_rule)])

    def append(self, tokens: dict[int, int]) -> dict[int, str | None]:
        """Write chosen tokens (row -> token id) on live rows; return each row's finish reason
        (rows of cancelled prompts write nothing and finish as 'cancelled')."""
        to_feed: dict[int, int] = {}
        reasons = self._write(tokens, to_feed)
        if to_feed:
            self._feed(to_feed)
        return reasons

    def advance(self, moves: Sequence[Move], joining: "Batch | None" = None) -> int | None:
        """Make every move (sampled or chosen tokens, each on its own rows) and feed all the new
        tokens in one forward pass: how methods sharing a batch step together. The sampled moves'
        rows share one distribution and one trip to the host, however many moves there are.

        `joining` (from `prepare_join`): prompts that join at this
        step (continuous batching), encoded in the same forward pass; their rows come after the
        existing ones, and the first of them is returned (None without `joining`)."""
        to_feed: dict[int, int] = {}
        samples = [move for move in moves if isinstance(move, Sample)]
        if samples:
            self._sample(samples, to_feed)
        written = {r: t for move in moves if isinstance(move, Write) for r, t in move.tokens.items()}
        if written:
            self._write(written, to_feed)
        if to_feed:
            self._feed(to_feed, joining)
        if joining is None:
            return None
        if joining.unencoded is not None:  # nothing was fed, or it could not share the pass
            joining._encode()
        return self._join(joining)

    def _sample(self, moves: Sequence[Sample], to_feed: dict[int, int]) -> None:
        running = {s.row: (s, k) for k, move in enumerate(moves) for s in move.segments if not s.reason}
        active = self._drop_cancelled(list(running))
        for r in set(running) - set(active):
            running[r][0].reason = "cancelled"
        if not active:
            return
        raw, logp, entropy = self._distribution(active)
        at = {r: i for i, r in enumerate(active)}  # row -> its line in raw, logp, entropy

        def lines(rows: list[int]) -> torch.Tensor:
            return torch.tensor([at[r] for r in rows], device=raw.device)

        for move, rows in zip(moves, self._rows_by_move(running, active, len(moves))):
            if move.stop_rule is None or not rows:
                continue
            index = lines(rows)
            stop = move.stop_rule(StepView(
                logits=raw[index],
                entropy=entropy[index],
                segment_lengths=torch.tensor([len(running[r][0].tokens) for r in rows], device=raw.device),
                total_lengths=torch.tensor([len(self.tokens[r]) for r in rows], device=raw.device),
            )).tolist()
            for r, s in zip(rows, stop):
                if s:
                    running[r][0].reason = "rule"
        drawing = [r for r in active if not running[r][0].reason]
        if not drawing:
            return
        chosen_at = torch.zeros(len(active), dtype=torch.long, device=raw.device)
        for sampling in dict.fromkeys(moves[running[r][1]].sampling for r in drawing):  # one draw per rule
            rows = [r for r in drawing if moves[running[r][1]].sampling == sampling]
            group = lines(rows)
            scores = raw if len(rows) == len(active) else raw[group]
            chosen_at[group] = choose_tokens(self.mask_early_eos(rows, scores), sampling,
                                             [self.generators[r] for r in rows])
        chosen = chosen_at.tolist()  # one transfer per step for every move's tokens, logprobs, entropies
        chosen_logp = logp.gather(1, chosen_at[:, None]).squeeze(1).tolist()
        entropies = entropy.tolist()
        cut: dict[int, bool] = {}
        for move, rows in zip(moves, self._rows_by_move(running, drawing, len(moves))):
            if move.cut_rule is None or not rows:
                continue
            tokens = [chosen[at[r]] for r in rows]
            cut.update(zip(rows, move.cut_rule(TokenView(
                tokens=tokens,
                texts=[self.engine.decode([t]) for t in tokens],
                entropy=entropy[lines(rows)],
                segment_lengths=torch.tensor([len(running[r][0].tokens) + 1 for r in rows], device=raw.device),
            )).tolist()))
        for r in drawing:
            (segment, k), i = running[r], at[r]
            token = chosen[i]
            segment.tokens.append(token)
            segment.logprobs.append(chosen_logp[i])
            segment.entropies.append(entropies[i])
            reason = self._record(r, token, chosen_logp[i], entropies[i])
            if reason is not None:
                self.finish[r] = segment.reason = reason
                continue
            to_feed[r] = token
            if cut.get(r):
                segment.reason = "rule"
            elif moves[k].max_tokens is not None and len(segment.tokens) >= moves[k].max_tokens:
                segment.reason = "segment"

    @staticmethod
    def _rows_by_move(running: dict[int, tuple[Segment, int]], rows: list[int], moves: int) -> list[list[int]]:
        """`rows` split by the move (its index in `running`) each belongs to, in order."""
        split: list[list[int]] = [[] for _ in range(moves)]
        for r in rows:
            split[running[r][1]].append(r)
        return split

    def _write(self, tokens: dict[int, int], to_feed: dict[int, int]) -> dict[int, str | None]:
        rows = self._drop_cancelled(list(tokens))
        reasons: dict[int, str | None] = {r: self.finish[r] for r in tokens if r not in rows}
        if not rows:
            return reasons
        for r in rows:
            if self.finish[r] is not None:
                raise DecalignError(f"row {r} has finished ({self.finish[r]}); crop it before appending")
        _, logp, entropy = self._distribution(rows)
        written = [int(tokens[r]) for r in rows]
        logps = logp.gather(1, torch.tensor(written, device=logp.device)[:, None]).squeeze(1).tolist()
        entropies = entropy.tolist()  # one transfer per step, not one per row
        for i, (r, token) in enumerate(zip(rows, written)):
            reasons[r] = self._record(r, token, logps[i], entropies[i])
            if reasons[r] is None:
                to_feed[r] = token
            else:
                self.finish[r] = reasons[r]
        return reasons

    # ----- reshaping rows ---------------------------------------------------------------------
    def select(self, indices: Sequence[int]) -> None:
        """Keep the rows in `indices`, in that order; a repeated row forks into independent copies."""
        if not indices:
            raise DecalignError("select needs at least one row")
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        if self.state_layers:
            self.prompt_states = self.prompt_states[index]
            self.answer_states = self.answer_states[index]
            self.state_sums = self.state_sums[index]
        occurrences = _occurrences(indices)
        self._forks += 1
        self.seeds = [self.seeds[r] if k == 0 else derive_seed(self.seeds[r], "fork", self._forks, k)
                      for k, r in occurrences]
        self.generators = [  # a fork draws its own random stream; the first copy keeps the row's
            self.generators[r] if k == 0 else make_generator(seed)
            for (k, r), seed in zip(occurrences, self.seeds)
        ]
        for name in ("tokens", "logprobs", "entropies"):
            values = getattr(self, name)
            setattr(self, name, [list(values[r]) for r in indices])
        self.snapshots = [dict(self.snapshots[r]) for r in indices]
        self.prompt_of = [self.prompt_of[r] for r in indices]
        if self.adapters is not None:
            self.adapters = [self.adapters[r] for r in indices]
        self.fed = [self.fed[r] for r in indices]
        self.finish = [self.finish[r] for r in indices]
        self.compact()

    def close(self) -> None:
        """Free the KV cache and every per-row tensor now; the rows' tokens and texts stay readable.
        A batch sits in reference cycles (`on_token`'s closure holds it) and the methods it served
        hold it too, some a while longer (a server's answers still being sent), so without this its
        memory waited for Python's next full collection: a server idle after a load at --max-batch 64
        kept its last batch, some 47 MiB resident and 2.4 GB of reserved cache room (docs/server.md)."""
        self.cache = self.logits = self.mask = None
        self.prompt_states = self.answer_states = self.state_sums = None
        self.snapshots = [{} for _ in self.snapshots]
        self.on_token = self.cancelled = None

    def keep_prompts(self, prompts: Sequence[int]) -> dict[int, int]:
        """Forget every prompt not in `prompts` (no row may still belong to one), so a batch that never
        empties (a busy server's) does not keep every prompt it ever admitted; returns old -> new numbers."""
        new = {old: i for i, old in enumerate(prompts)}
        self.prompt_of = [new[q] for q in self.prompt_of]
        for name in ("prompts", "prompt_lengths", "work"):
            values = getattr(self, name)
            setattr(self, name, [values[q] for q in prompts])
        return new

    def admit(self, prompts: Sequence[BatchPrompt]) -> int:
        """Add prompts to this running batch now (continuous batching), encoded in a forward pass of
        their own, and return the first of their rows. (`advance(moves, joining=)` encodes them in
        the next step's pass instead.)"""
        joining = self.prepare_join(prompts)
        joining._encode()
        return self._join(joining)

    def prepare_join(self, prompts: Sequence[BatchPrompt]) -> "Batch":
        """Prompts to join this batch at a later `advance`, checked now (a bad prompt fails here)."""
        return Batch(self.engine, prompts, joins=True)

    def _join(self, joining: "Batch") -> int:
        """Add an encoded batch's rows to the cache after the existing ones, both left-padded to one
        width (padding is masked, and positions count only unmasked tokens, so no row's logits
        change); its prompts are numbered after the existing ones, and hidden states are kept for the
        union of both sides' layers. Returns the first of its rows."""
        first, base = self.size, len(self.prompts)
        width = max(self.mask.shape[1], joining.mask.shape[1])
        room = width + max(self.remaining_tokens(), joining.remaining_tokens())
        for mine, theirs in zip(self.cache.layers, joining.cache.layers):
            mine.append_rows(theirs, width, room)
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(joining.mask, width, 1)])
        self.logits = torch.cat([self.logits, joining.logits])
        self._join_states(joining)
        if self.adapters is not None or joining.adapters is not None:
            loaded = self.engine.active_adapter()
            self.adapters = (self.adapters or [loaded] * first) + (joining.adapters or [loaded] * joining.size)
        for name in ("tokens", "logprobs", "entropies", "fed", "finish", "snapshots", "seeds", "generators",
                     "prompts", "prompt_lengths", "work"):
            getattr(self, name).extend(getattr(joining, name))
        self.prompt_of.extend(base + q for q in joining.prompt_of)
        self.compact()
        return first

    def remaining_tokens(self) -> int:
        """The most tokens a live row may still generate (the cache's room to reserve)."""
        return max((self.prompts[self.prompt_of[r]].max_new_tokens - len(self.tokens[r])
                    for r in self.live_rows()), default=0)

    def _join_states(self, joining: "Batch") -> None:
        """Tracked states of both batches in the column layout of the union of their layers (zeros
        where a side did not track a layer: its rows' methods never read it)."""
        layers = tuple(dict.fromkeys(self.state_layers + joining.state_layers))
        if not layers:
            return
        # room for every row's answer: the prompts' limits, or more where the rows of a prompt that
        # has since left the batch made it wider
        longest = max([p.max_new_tokens for p in self.prompts + joining.prompts]
                      + [b.answer_states.shape[1] for b in (self, joining) if b.answer_states is not None])
        hidden = self.engine.hidden_size
        like = self.state_sums if self.state_sums is not None else joining.state_sums
        parts: dict[str, list[torch.Tensor]] = {"prompt_states": [], "answer_states": [], "state_sums": []}
        for batch in (self, joining):
            for name, shape in (("prompt_states", ()), ("answer_states", (longest,)), ("state_sums", ())):
                spread = like.new_zeros((batch.size, *shape, len(layers) * hidden))
                old = getattr(batch, name)
                for i, layer in enumerate(batch.state_layers):
                    column = layers.index(layer) * hidden
                    source = old[..., i * hidden:(i + 1) * hidden]
                    if name == "answer_states":
                        spread[:, :source.shape[1], column:column + hidden] = source
                    else:
                        spread[..., column:column + hidden] = source
                parts[name].append(spread)
        for name, tensors in parts.items():
            setattr(self, name, torch.cat(tensors))
        self.state_layers = layers

    def copy_row(self, source: int, targets: Sequence[int]) -> None:
        """Make each target row a copy of `source` (text, cache, logits, saved logits), in place:
        row numbers do not change and each row keeps its own random stream."""
        targets = [t for t in targets if t != source]
        if not targets:
            return
        index = torch.as_tensor(targets, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys[index] = layer.keys[source].clone()
            layer.values[index] = layer.values[source].clone()
        self.mask[index] = self.mask[source].clone()
        self.logits[index] = self.logits[source].clone()
        if self.state_layers:
            for states in (self.prompt_states, self.answer_states, self.state_sums):
                states[index] = states[source].clone()
        for t in targets:
            for name in ("tokens", "logprobs", "entropies"):
                getattr(self, name)[t] = list(getattr(self, name)[source])
            self.snapshots[t] = dict(self.snapshots[source])
            self.fed[t], self.finish[t] = self.fed[source], self.finish[source]

    def crop(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Cut each row back to its first `lengths[i]` generated tokens; the cut tokens leave the
        cache. At a segment start the saved logits are reused; elsewhere the last kept token is
        written once more so its logits are fresh (one token, never the prefix)."""
        refeed: dict[int, int] = {}
        for row, length in zip(rows, lengths):
            if not 0 <= length <= len(self.tokens[row]):
                raise DecalignError(f"cannot crop row {row} of {len(self.tokens[row])} tokens to {length}")
            snapshot = self.snapshots[row].get(length)
            keep_in_cache = length if snapshot is not None or length == self.fed[row] else length - 1
            self._unmask_tail(row, self.fed[row] - keep_in_cache)
            self.fed[row] = keep_in_cache
            if self.state_layers:  # the kept tokens' states are still in place: re-add them
                self.state_sums[row] = self.answer_states[row, :keep_in_cache].sum(0)
            del self.tokens[row][length:], self.logprobs[row][length:], self.entropies[row][length:]
            self.snapshots[row] = {k: v for k, v in self.snapshots[row].items() if k <= length}
            self.finish[row] = None
            if snapshot is not None:
                self.logits[row] = snapshot
            elif keep_in_cache < length:
                refeed[row] = self.tokens[row][length - 1]
        if refeed:
            self._feed(refeed)
        self.compact()

    def force(self, segments: dict[int, "Segment"]) -> None:
        """Write segments drawn earlier (a rejection sampler's fallback to its best attempt) onto
        live rows in one forward pass; their recorded log-probabilities and entropies are kept."""
        width = max(len(s.tokens) for s in segments.values())
        input_ids = torch.full((self.size, width), self.engine.pad_id, dtype=torch.long, device=self.mask.device)
        new_mask = torch.zeros((self.size, width), dtype=torch.long, device=self.mask.device)
        written: dict[int, tuple[int, int]] = {}  # row -> (first answer position fed, tokens fed)
        for row, segment in segments.items():
            if self.finish[row] is not None:
                raise DecalignError(f"row {row} has finished; crop it before forcing tokens")
            reason = None
            for token, logprob, entropy in zip(segment.tokens, segment.logprobs, segment.entropies):
                if reason is not None:
                    raise DecalignError(f"row {row}: forced tokens continue past its finish ({reason})")
                reason = self._record(row, token, logprob, entropy, new=False)
            self.finish[row] = reason
            fed = segment.tokens[:-1] if reason is not None else segment.tokens  # as extend would
            if fed:  # right-aligned: every row's last fed token sits in the last column
                input_ids[row, width - len(fed):] = torch.tensor(fed)
                new_mask[row, width - len(fed):] = 1
                written[row] = (self.fed[row], len(fed))
                self.fed[row] += len(fed)
        if not new_mask.any():
            return
        states = self._forward_rows(input_ids, new_mask, torch.tensor(list(written), dtype=torch.long,
                                                                      device=self.mask.device))
        if states is not None:
            for i, (row, (start, count)) in enumerate(written.items()):
                self.answer_states[row, start:start + count] = states[i, width - count:]
                self.state_sums[row] += states[i, width - count:].sum(0)
        for prompt in {self.prompt_of[r] for r in segments}:
            self.work[prompt].forward_passes += 1
        for row in segments:
            self.work[self.prompt_of[row]].decode_tokens += int(new_mask[row].sum())
        self.compact()

    def _unmask_tail(self, row: int, count: int) -> None:
        if count > 0:
            columns = self.mask[row].nonzero().flatten()[-count:]
            self.mask[row, columns] = 0

    def compact(self) -> None:
        """Squeeze out masked holes once they cost more than moving the cache does."""
        width = int(self.mask.sum(1).max())
        holes = self.mask.shape[1] - width
        if holes == 0 or holes < max(4, self.mask.shape[1] // 8):
            return
        order = torch.argsort(self.mask, dim=1, stable=True)[:, -width:]
        self.mask = self.mask.gather(1, order)
        for layer in self.cache.layers:
            layer.gather_positions(order)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _occurrences(indices: Sequence[int]) -> list[tuple[int, int]]:
    """(k, r) for each r in indices, where k counts earlier occurrences of r."""
    counts: dict[int, int] = {}
    out = []
    for r in indices:
        out.append((counts.get(r, 0), r))
        counts[r] = counts.get(r, 0) + 1
    return out
