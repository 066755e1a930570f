"""The sampling engine: one batched, KV-cached state that every decoding method drives.

- `core`: `Engine` (a model with its tokenizer: load, render, decode, open a batch), `get_engine`
  (one loaded policy per process), `Prompt`, `validate_messages`.
- `batch`: `Batch` (live rows in one KV cache: extend, step, append, advance, select, copy_row, crop,
  force, tracked hidden states), `BatchPrompt` (a prompt with its rows and limits), the moves
  `Sample` / `Write`, `Segment`, `Work`, `FINISHED`.
- `cache`: `RowLayer`, the KV cache layer that writes steps into spare room instead of copying
  the cache, and runs a step over the rows that take a token only (`row_cache`, `only_rows`).
- `decoder`: `Decoder`, the forward pass for Llama-family models without transformers' per-call
  machinery (same logits and hidden states; other architectures keep transformers' forward).
- `stopping`: segment rules and what they see: `StepView`/`StopRule` (before a token), `TokenView`/
  `CutRule` (after one), `EntropyStop`, `MaxProbStop`, `PunctuationCut`.
- `adapters`: PEFT specifics and model patches: `BASE`, `loaded_adapters`, `LoraRowGate` (per-row
  LoRA gating of mixed-adapter batches), `use_packed_linears` (oneDNN packed
  weights for CPU decode steps), `use_lean_lora` (LoRA modules without PEFT's per-call Python).

Imports run one way: core -> batch, decoder -> cache, stopping, adapters. Everything is re-exported here.
"""

from .adapters import BASE, LoraRowGate, loaded_adapters, use_lean_lora, use_packed_linears
from .batch import FINISHED, Batch, BatchPrompt, Move, Sample, Segment, Work, Write
from .core import Engine, Prompt, get_engine, validate_messages
from .stopping import CutRule, EntropyStop, MaxProbStop, PunctuationCut, StepView, StopRule, TokenView

__all__ = [
    "BASE", "Batch", "BatchPrompt", "Move", "Sample", "Write", "get_engine", "CutRule", "Engine", "EntropyStop", "FINISHED", "LoraRowGate", "MaxProbStop", "Prompt",
    "PunctuationCut", "Segment", "StepView", "StopRule", "TokenView", "Work", "loaded_adapters",
    "use_lean_lora", "use_packed_linears", "validate_messages",
]
