"""`train_lora`: a small PEFT LoRA fine-tuner for chat data, so users and tests can make adapters.

Data: JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line. Each conversation is
rendered with the model's chat template; the loss covers only the assistant turns' tokens (the
template's end-of-turn marker included), never the prompt. Adam on the LoRA weights, a linear
warm-up/decay schedule, a progress bar on stderr; the adapter is saved as adapter_model.safetensors.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import DecalignError
from .models import load_model
from .records import json_objects, output_folder


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The message lists of a JSONL file; a malformed line raises an error naming it."""
    path = Path(path)
    conversations = []
    for number, record in json_objects(path, "training data"):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DecalignError(f"{path} line {number}: needs a non-empty \"messages\" list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                    or message.get("role") not in ("system", "user", "assistant"):
                raise DecalignError(f"{path} line {number}: message {i} needs a role (system, user or "
                                    "assistant) and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DecalignError(f"{path} line {number}: no assistant message to learn from")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise DecalignError(f"training data {path} has no records")
    return conversations


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 except on assistant turns."""
    def render(part: list[dict], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(part, add_generation_prompt=generation_prompt, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    labels: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:k], True)
        full = render(messages[: k + 1], False)
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise DecalignError("the chat template does not render conversations as growing prefixes; "
                                "cannot tell assistant tokens apart")
        labels += [-100] * (len(prefix) - len(ids)) + full[len(prefix):]
        ids = full
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def train_lora(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    max_steps: int | None = None,
    epochs: int = 1,
    rank: int = 8,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    max_length: int = 512,
    target_modules: str | list[str] = "all-linear",
) -> dict:
    """Fine-tune a LoRA adapter on chat data and save it to `out_dir`.

    Returns {"steps", "examples", "first_loss", "last_loss", "seconds", "path"}: the losses are the
    means over the first and the last up-to-10 steps, windows that never overlap (a quick check that it
    learned; one step gives the same loss twice)."""
    from peft import LoraConfig, get_peft_model  # local: peft costs ~2 s and only training needs it

    if rank < 1:
        raise DecalignError(f"rank must be >= 1, got {rank}")
    if not lr > 0:
        raise DecalignError(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        raise DecalignError(f"batch size must be >= 1, got {batch_size}")
    if epochs < 1:
        raise DecalignError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise DecalignError(f"max steps must be >= 1, got {max_steps}")
    out = output_folder(out_dir)  # before any work
    conversations = read_conversations(data_path)
    base, tokenizer = load_model(model)
    if not getattr(tokenizer, "chat_template", None):
        raise DecalignError("train-lora needs a model with a chat template")
    examples = []
    for messages in conversations:
        ids, labels = encode_conversation(tokenizer, messages, max_length)
        if any(label != -100 for label in labels):
            examples.append((ids, labels))
    if not examples:
        raise DecalignError(f"no assistant tokens fit in {max_length} tokens")

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=target_modules, task_type="CAUSAL_LM"))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = math.ceil(len(examples) / batch_size)
    total = max_steps if max_steps is not None else per_epoch * epochs
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(seed)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc="train-lora", unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    step = 0
    while step < total:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            if step >= total:
                break
            chunk = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
            loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    peft_model.eval()
    peft_model.save_pretrained(str(out), safe_serialization=True)
    window = max(1, min(10, len(losses) // 2))
    head, tail = losses[:window], losses[-window:]
    return {"steps": step, "examples": len(examples), "first_loss": sum(head) / len(head),
            "last_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - started, "path": str(out)}
