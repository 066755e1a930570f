"""Rewards from Hugging Face models: sequence classifiers (`hf:`) and an LM judge (`judge:`).

Both read text, not the policy's tokens, so their tokenizer may differ from the policy's. Long
inputs are cut from the left: the response survives, the oldest context goes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from safetensors import SafetensorError

from ..errors import DecalignError, first_line
from ..models import resolve_model_path
from ..options import parse_options, split_spec
from .base import Prompt, Reward

DEFAULT_RUBRIC = "Is the assistant's answer helpful, honest and harmless?"


def conversation(prompt: Prompt, response: str | None) -> list[dict]:
    """The prompt as messages, with the response as the final assistant turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + ([{"role": "assistant", "content": response}] if response is not None else [])


def plain_transcript(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _load(path: str, kind: str, dtype: str, trust_remote_code: bool):
    # transformers' Auto model classes take about half a second to import: only when a model is loaded
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    location = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = auto.from_pretrained(location, dtype=getattr(torch, dtype), use_safetensors=True,
                                     trust_remote_code=trust_remote_code).eval()
    except (OSError, ValueError, AttributeError, SafetensorError) as exc:  # SafetensorError: a damaged file
        raise DecalignError(f"cannot load {kind} {path!r}: {first_line(exc)}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"
    return model, tokenizer


class _ModelReward(Reward):
    """Shared by the classifier and the judge: texts, then padded batches, one value per text."""

    add_special_tokens = True

    def _texts(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def _values(self, encoded) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _score(self, prompts, responses):
        texts = self._texts(prompts, responses)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt",
                                     add_special_tokens=self.add_special_tokens)
            scores.extend(self._values(encoded).tolist())
        return scores


class ClassifierReward(_ModelReward):
    """Score = a sequence classifier's logit: its only one, `label=i`, or `label=i-j` (a difference)."""

    def __init__(self, path: str, *, label: str | None = None, dtype: str = "float32", max_length: int = 512,
                 batch_size: int = 16, trust_remote_code: bool = False) -> None:
        super().__init__()
        self.name = f"hf:{path}"
        self.model, self.tokenizer = _load(path, "classifier", dtype, trust_remote_code)
        self.max_length = _fitted_length(self.model, self.tokenizer, max_length)
        self.batch_size = batch_size
        self.plus, self.minus = self._pick_labels(label)

    def _pick_labels(self, label: str | None) -> tuple[int, int | None]:
        count = self.model.config.num_labels
        names = self.model.config.id2label or {}
        if label is None:
            if count == 1:
                return 0, None
            listing = ", ".join(f"{i}={names.get(i, i)}" for i in range(count))
            raise DecalignError(f"reward {self.name} has {count} labels ({listing}); choose one with "
                                f":label=INDEX or a difference :label=A-B")
        by_name = {str(v).lower(): k for k, v in names.items()}

        def index(text: str) -> int:
            text = text.strip()
            value = int(text) if text.lstrip("-").isdigit() else by_name.get(text.lower())
            if value is None or not 0 <= value < count:
                raise DecalignError(f"reward {self.name}: no label {text!r} among {count} labels")
            return value

        plus, _, minus = label.partition("-")
        return index(plus), index(minus) if minus else None

    def _texts(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[str]:
        chats = [conversation(p, r) for p, r in zip(prompts, responses)]
        if getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
        return [plain_transcript(c) for c in chats]

    def _values(self, encoded) -> torch.Tensor:
        logits = self.model(**encoded).logits.float()
        return logits[:, self.plus] - (logits[:, self.minus] if self.minus is not None else 0)


class JudgeReward(_ModelReward):
    """An instruct LM as judge: log-odds of 'Yes' over 'No' to a rubric question about the answer."""

    add_special_tokens = False  # the chat template already holds them

    def __init__(self, path: str | None = None, *, rubric: str = DEFAULT_RUBRIC, dtype: str = "float32",
                 max_length: int = 1024, batch_size: int = 8, trust_remote_code: bool = False) -> None:
        super().__init__()
        self.name = f"judge:{path or 'smollm2'}"
        self.model, self.tokenizer = _load(path or "smollm2", "judge", dtype, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.rubric, self.batch_size = rubric, batch_size
        self.max_length = _fitted_length(self.model, self.tokenizer, max_length)
        self.yes = self._first_token("Yes")
        self.no = self._first_token("No")

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DecalignError(f"judge {self.name}: its tokenizer cannot encode {word!r}")
        return ids[0]

    def _texts(self, prompts, responses) -> list[str]:
        texts = []
        for prompt, response in zip(prompts, responses):
            question = (f"Here is a conversation.\n\n{plain_transcript(conversation(prompt, response))}\n\n"
                        f"{self.rubric} Answer Yes or No.")
            if getattr(self.tokenizer, "chat_template", None):
                texts.append(self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                                add_generation_prompt=True, tokenize=False))
            else:
                texts.append(question + "\nAnswer:")
        return texts

    def _values(self, encoded) -> torch.Tensor:
        logits = self.model(**encoded, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
        return logits[:, self.yes] - logits[:, self.no]


def _fitted_length(model, tokenizer, wanted: int) -> int:
    """`wanted` tokens, or fewer where the model reads fewer positions or its tokenizer allows fewer
    (inputs are cut from the left, so the oldest context goes first)."""
    limits = (wanted, getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
    return min(limit for limit in limits if isinstance(limit, int) and limit > 0)


def _split_options(kind: str, text: str, allowed: set[str], example: str) -> tuple[str, dict[str, str]]:
    """'path:key=value:...' -> (path, options). The path is everything before the first key=value."""
    path, items = split_spec(text)
    return path, parse_options(items, what=f"{kind} reward", example=example, allowed=allowed)


def classifier_reward(text: str) -> Reward:
    path, options = _split_options("hf", text, {"label", "dtype", "max_length", "batch_size"}, "hf:MODEL:label=1")
    if not path:
        raise DecalignError("hf reward needs a model: hf:MODEL_ID_OR_PATH[:label=N]")
    return ClassifierReward(path, label=options.get("label"), dtype=options.get("dtype", "float32"),
                            max_length=int(options.get("max_length", 512)),
                            batch_size=int(options.get("batch_size", 16)))


def judge_reward(text: str) -> Reward:
    path, options = _split_options("judge", text, {"rubric", "dtype", "max_length", "batch_size"},
                                   "judge:MODEL:rubric=Is it polite?")
    return JudgeReward(path or None, rubric=options.get("rubric", DEFAULT_RUBRIC),
                       dtype=options.get("dtype", "float32"), max_length=int(options.get("max_length", 1024)),
                       batch_size=int(options.get("batch_size", 8)))
