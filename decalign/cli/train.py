"""`decalign train-reward` and `decalign train-lora`: train a reward head or a LoRA adapter."""

from __future__ import annotations

import json
import sys

import click

from ..errors import DecalignError
from ..logs import quiet_transformers
from ..rewards.features import FEATURE_SETS, FEATURES


@click.command("train-reward")
@click.argument("pairs", metavar="PAIRS.jsonl", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the trained reward.")
@click.option("--method", type=click.Choice(["probe", "lora", "full"]), default="probe", show_default=True,
              help="probe: a linear head on frozen MiniLM embeddings (the best on ~1.5k pairs, see docs/rewards.md); "
                   "lora / full: MiniLM fine-tuned end to end as a cross-encoder with TRL's RewardTrainer "
                   "(LoRA adapters, or every weight but the embeddings).")
@click.option("--holdout", default=0.2, show_default=True, type=float,
              help="Share of pairs (split by prompt) kept aside and only measured at the end.")
@click.option("--validation", default=0.12, show_default=True, type=float,
              help="lora/full: share of pairs (split by prompt) that picks the best checkpoint and stops early.")
@click.option("--epochs", default=3.0, show_default=True, type=float, help="lora/full: training epochs at most.")
@click.option("--lr", default=None, type=float, help="lora/full: learning rate [default: 5e-4 lora, 5e-5 full].")
@click.option("--rank", default=16, show_default=True, type=int, help="lora: adapter rank (alpha = 2 x rank).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="lora/full: pairs per step.")
@click.option("--evals-per-epoch", default=2, show_default=True, type=int,
              help="lora/full: validation evaluations (and checkpoints) per epoch.")
@click.option("--patience", default=3, show_default=True, type=int,
              help="lora/full: stop after this many evaluations without a better validation accuracy.")
@click.option("--features", "feature_set", type=click.Choice(list(FEATURE_SETS)), default=FEATURES, show_default=True,
              help="probe: the head's inputs (embeddings of the user turn u and answer a, then the answer's log length "
                   "and, by default, the answer's token embeddings pooled (layer 0 of the same pass); or a third embedding of "
                   "both joined).")
@click.option("--nested-cv", default=0, show_default=True, type=int,
              help="probe: also estimate the whole recipe's accuracy by nested cross-validation over all pairs, "
                   "N folds by prompt (0: off); reported and written to the card, the head is unchanged.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--allow-empty-answers", is_flag=True,
              help="Accept pairs with an empty answer (HH-RLHF has some: raters preferred saying nothing).")
def train_reward(pairs, output, method, holdout, validation, epochs, lr, rank, batch_size, evals_per_epoch, patience,
                 feature_set, nested_cv, seed, allow_empty_answers):
    """Train a reward on {messages, chosen, rejected} pairs; score with it as harmless:OUTPUT."""
    if not 0 < holdout < 1:
        raise DecalignError(f"--holdout must be between 0 and 1, got {holdout}")
    if nested_cv and method != "probe":
        raise DecalignError("--nested-cv is for --method probe (fine-tuning once per fold would take hours)")
    from ..rewards.cross_encoder_training import train_reward_model
    from ..rewards.harmless_training import train_reward as train_reward_head

    quiet_transformers()
    progress = sys.stderr.isatty()
    if method == "probe":
        report = train_reward_head(pairs, output, holdout=holdout, seed=seed, progress=progress,
                                   allow_empty_answers=allow_empty_answers, feature_set=feature_set,
                                   nested_folds=nested_cv)
    else:
        report = train_reward_model(pairs, output, method=method, holdout=holdout, validation=validation, seed=seed,
                                    epochs=epochs, lr=lr, rank=rank, batch_size=batch_size, progress=progress,
                                    evals_per_epoch=evals_per_epoch, patience=patience,
                                    allow_empty_answers=allow_empty_answers)
    click.echo(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2))
    if report.get("nested_cv"):
        nested = report["nested_cv"]
        click.echo(f"nested cross-validation ({nested['folds']} folds by prompt): {nested['accuracy']:.3f} "
                   f"± {nested['sd']:.3f}", err=True)
    click.echo(f"held-out pairwise accuracy {report['heldout_accuracy']:.3f} on {report['heldout_pairs']} pairs; "
               f"reward and model card in {output} (use it as harmless:{output})", err=True)


@click.command("train-lora")
@click.argument("data", metavar="DATA.jsonl", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Adapter folder to write.")
@click.option("--model", default=None, help="Base model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--max-steps", default=None, type=int, help="Stop after N optimizer steps [default: whole epochs].")
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank (lora_alpha = 2 x rank).")
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
def train_lora(data, output, model, max_steps, epochs, rank, lr, batch_size, seed):
    """Fine-tune a LoRA adapter on {"messages": [...]} records (loss on assistant turns only)."""
    from ..lora import train_lora as train_lora_adapter

    quiet_transformers()
    summary = train_lora_adapter(data, output, model=model, max_steps=max_steps, epochs=epochs, rank=rank, lr=lr,
                                 batch_size=batch_size, seed=seed)
    click.echo(f"adapter written to {summary['path']}: {summary['steps']} steps on {summary['examples']} "
               f"examples, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
               f"({summary['seconds']:.0f} s)", err=True)
