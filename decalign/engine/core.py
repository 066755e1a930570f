"""The policy engine: a model with its tokenizer, which renders prompts and opens batches."""

from __future__ import annotations

import functools
import os
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Mapping, Sequence

import torch

from ..errors import DecalignError
from ..models import DEFAULT_MODEL, check_adapter_name, load_adapter, load_model, local_or_id
from .adapters import BASE, LoraRowGate, loaded_adapters, use_lean_lora, use_packed_linears
from .batch import Batch, BatchPrompt
from .cache import attention_windows, row_cache
from .decoder import Decoder, planless_attention

Prompt = str | list[dict]


class Engine:
    """A policy model with its tokenizer: renders prompts and opens batches."""

    def __init__(self, model, tokenizer, *, name: str = "model", adapter: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.adapter = adapter  # the adapter loaded with --adapter (a local one by its absolute path)
        # adapters loaded to be chosen by name (a request's `model`), not part of the model as loaded
        self.named_adapters: tuple[str, ...] = ()  # `add_adapter`
        self.device = next(model.parameters()).device
        config = model.config
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0})
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # a decode step where fewer than this share of a batch's rows take a token runs those rows
        # only (gathering their cache costs less than running the idle rows; measured in docs/cards.md)
        self.subset_share = 0.8
        self.lora_gate = LoraRowGate(model, self.device)  # per-row adapter gating for mixed batches
        if self.device.type == "cpu" and os.environ.get("DECALIGN_PACK_WEIGHTS", "1") != "0":
            use_packed_linears(model)  # DECALIGN_PACK_WEIGHTS=0 keeps torch's matmul and saves the copy
        use_lean_lora(model)  # an adapter's LoRA modules without PEFT's per-call Python
        # the decode forward without transformers' per-call machinery, where it is exact (else None)
        self.decoder = Decoder.build(model)
        # one decoding at a time: a pass sets the adapters' row gates, and a method may load an adapter
        # of its own, on the model that every caller shares (`decalign.run` holds it; reentrant)
        self.lock = threading.RLock()
        row_cache(config)  # refuses, at load, a model whose cache the engine cannot keep
        self.windows = attention_windows(config)  # sliding-window layers: masks in token positions

    @classmethod
    def load(
        cls, model: str | None = None, adapter: str | None = None, *, trust_remote_code: bool = False,
        device: str | None = None, adapters: Mapping[str, str] | None = None,
    ) -> "Engine":
        """Load a policy on `device` (default: $DECALIGN_DEVICE, else "auto": a CUDA GPU when one is
        visible, else the CPU). On a GPU it runs in bfloat16 where supported; on the CPU in float32.
        `adapter`: a LoRA folder the model runs with as loaded; `adapters`: name -> LoRA folder, loaded
        beside it for rows that name them (`BatchPrompt.adapter`, a request's `adapter_name`)."""
        where = pick_device(device)
        dtype = "bfloat16" if where.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        policy, tokenizer = load_model(model, adapter, trust_remote_code=trust_remote_code, dtype=dtype)
        engine = cls(policy.to(where), tokenizer, name=local_or_id(model) or DEFAULT_MODEL, adapter=local_or_id(adapter))
        for name, folder in (adapters or {}).items():
            engine.add_adapter(name, folder)
        return engine

    # ----- text <-> tokens -------------------------------------------------------------------
    def check_fits(self, ids: Sequence[int], which: str = "the prompt") -> None:
        """Refuse a prompt that fills the model's context (no room left for an answer token)."""
        if self.context_length and len(ids) >= self.context_length:
            raise DecalignError(f"{which} has {len(ids)} tokens; the model's context is {self.context_length}")

    def render(self, prompt: Prompt, *, system: str | None = None, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt. Message lists always go through the chat template; a string does
        when the model has one (chat=None) or chat=True, else it is encoded as raw text."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DecalignError("empty prompt")
            _check_unicode(prompt, "the prompt")
            use_chat = self.has_chat_template if chat is None else chat
            if not use_chat:
                if system:
                    raise DecalignError("a system message needs chat mode (the model has no chat template)")
                return self.tokenizer(prompt)["input_ids"]
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = validate_messages(prompt)
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        if not self.has_chat_template:
            raise DecalignError(f"model {self.name} has no chat template; pass a plain string prompt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        seeds: Sequence[int] | None = None,
        max_new_tokens: int = 128,
        min_new_tokens: int = 0,
        stop_strings: Sequence[str] = (),
        adapters: Sequence[str] | None = None,
        state_layers: Sequence[int] = (),
    ) -> "Batch":
        """Encode each prompt once and give it `n` rows that share that encoding.

        `adapters` (one name per prompt, its rows inherit it): run each prompt's rows with that PEFT
        adapter, or "__base__" for the model without adapters, all in the same forward passes
        (CoLD puts a prompt twice, once per name).

        `state_layers`: keep, per row, the hidden states of these layers (0 = embeddings, N = the
        last layer's output, as the model reports them) for the answer's tokens, so that `state_means` and `last_states` give a
        prefix value its features with no extra forward pass."""
        if adapters is not None and len(adapters) != len(prompts):
            raise DecalignError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        return self.open([BatchPrompt(ids=ids, seed=seed, rows=n, adapter=adapters[i] if adapters else None,
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      stop_strings=tuple(stop_strings), state_layers=tuple(state_layers))
                          for i, (ids, seed) in enumerate(zip(prompts, seeds))])

    def open(self, prompts: Sequence[BatchPrompt]) -> "Batch":
        """A batch of prompts that may each have their own rows, limits, adapter and tracked layers
        (prompts of different requests and methods, decoded together)."""
        return Batch(self, prompts)

    @torch.no_grad()
    def top_tokens(self, prompt_ids: Sequence[int], answer: Sequence[int], k: int,
                   adapter: str | None = None) -> list[list[tuple[int, float]]]:
        """For each token of `answer`, the `k` most likely tokens at its position and their
        log-probabilities under the policy as loaded, or with `adapter` (a loaded adapter's name, BASE:
        none), as its rows ran (one teacher-forced forward pass; the logits are computed for the
        answer's positions only)."""
        if not answer or k < 1:
            return [[] for _ in answer]
        ids = torch.tensor([list(prompt_ids) + list(answer)], dtype=torch.long, device=self.device)
        positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1, device=self.device)
        context, extra = self.adapter_route([adapter]) if adapter is not None else (nullcontext(), {})
        with context, planless_attention():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=positions, **extra).logits[0]
        values, indices = logits.float().log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
        return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]

    def active_adapter(self) -> str:
        """The adapter the model runs with as loaded (BASE when it has none but named ones)."""
        names = [name for name in self.adapter_names() if name not in self.named_adapters]
        if not names:
            return BASE
        active = getattr(self.model, "active_adapter", names[0])
        return active if isinstance(active, str) and active in names else names[0]

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def adapter_names(self) -> list[str]:
        """Names of the PEFT adapters loaded on the model ("default" for --adapter); [] without any."""
        return loaded_adapters(self.model)

    def add_adapter(self, name: str, folder: str) -> None:
        """Load the LoRA adapter in `folder` under `name`, beside the adapters loaded by name (rows and
        requests may then name it; the model as loaded is unchanged). Not while a pass runs: the
        server calls it between steps."""
        check_adapter_name(name)
        if name in self.adapter_names():
            raise DecalignError(f"an adapter named {name} is loaded already")
        plain = not self.adapter_names() and not hasattr(self.model, "peft_config")
        model = load_adapter(self.model, folder, name=name)  # a plain model is wrapped, its layers in place
        if plain:
            model.base_model.set_adapter([])  # the model as loaded stays its base
            self.model = self.lora_gate.model = model.eval()
        use_lean_lora(self.model)
        self.named_adapters += (name,)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter loaded by name (`add_adapter`, `Engine.load(adapters=)`)."""
        if name not in self.named_adapters:
            raise DecalignError(f"no adapter named {name} is loaded by name")
        self.model.delete_adapter(name)
        self.named_adapters = tuple(n for n in self.named_adapters if n != name)

    def adapter_route(self, adapters: list[str]) -> tuple[AbstractContextManager, dict]:
        """(context, extra forward arguments) for a forward pass whose rows use `adapters` (see
        `LoraRowGate.route`)."""
        return self.lora_gate.route(adapters)


def pick_device(name: str | None = None) -> torch.device:
    """The device a policy runs on: `name`, else $DECALIGN_DEVICE, else "auto" (CUDA when visible)."""
    name = (name or os.environ.get("DECALIGN_DEVICE") or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DecalignError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DecalignError(f"device {name} asked for, but no CUDA GPU is visible to torch")
    if device.type not in ("cpu", "cuda"):
        raise DecalignError(f"device {name}: decalign runs on cpu or cuda")
    return device


def get_engine(model: "str | Engine | None" = None, adapter: str | None = None, *,
               trust_remote_code: bool = False, adapters: Mapping[str, str] | None = None) -> Engine:
    """The engine for a model spec, loaded once per process (the last one is kept); `adapters` as
    `Engine.load` takes them."""
    if isinstance(model, Engine):
        if adapter is not None or adapters:
            raise DecalignError("pass the adapter when loading the Engine, not with an Engine instance")
        return model
    return _shared_engine(model, adapter, trust_remote_code, tuple((adapters or {}).items()))


@functools.lru_cache(maxsize=1)  # one policy in memory at a time
def _shared_engine(model: str | None, adapter: str | None, trust_remote_code: bool,
                   adapters: tuple[tuple[str, str], ...] = ()) -> Engine:
    return Engine.load(model, adapter, trust_remote_code=trust_remote_code, adapters=dict(adapters) or None)


# The roles a prompt may use, as the chat template gets them (OpenAI's "developer" is its system message).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def validate_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DecalignError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not message.get("role"):
            raise DecalignError(f"message {i} must be an object with a role and a string content")
        # a chat template writes whatever role it is given: a typo would become a turn of its own
        if not isinstance(message["role"], str) or message["role"] not in ROLES:
            raise DecalignError(f"message {i} has role {message['role']!r}; roles are {', '.join(ROLES)}")
    if not any(m["content"].strip() for m in messages):
        raise DecalignError("empty prompt: every message is empty")
    for i, message in enumerate(messages):
        _check_unicode(message["content"], f"message {i}")
    return [{"role": ROLES[m["role"]], "content": m["content"]} for m in messages]


def _check_unicode(text: str, what: str) -> None:
    """Text the tokenizer can take: JSON's \\ud800-style escapes can make a lone surrogate, which no
    encoding holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DecalignError(f"{what} is not valid Unicode text: {exc.reason} at character {exc.start}") from None
