"""`decalign train-reward` and `decalign train-lora`: train a reward head or a LoRA adapter."""

from __future__ import annotations

import json
import sys

import click

from ..errors import DecalignError
from ..logs import quiet_transformers
from ..lora import train_lora as train_lora_adapter
from ..rewards.harmless_training import train_reward as train_reward_head


@click.command("train-reward")
@click.argument("pairs", metavar="PAIRS.jsonl", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the trained head.")
@click.option("--holdout", default=0.2, show_default=True, type=float, help="Share of pairs kept aside to test on.")
@click.option("--seed", default=0, show_default=True, type=int)
def train_reward(pairs, output, holdout, seed):
    """Train a harmlessness-style reward head on {messages, chosen, rejected} pairs (use it as harmless:PATH)."""
    if not 0 < holdout < 1:
        raise DecalignError(f"--holdout must be between 0 and 1, got {holdout}")
    quiet_transformers()
    report = train_reward_head(pairs, output, holdout=holdout, seed=seed, progress=sys.stderr.isatty())
    click.echo(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2))
    click.echo(f"held-out pairwise accuracy {report['heldout_accuracy']:.3f} on {report['heldout_pairs']} pairs; "
               f"head and model card in {output}", err=True)


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
    quiet_transformers()
    summary = train_lora_adapter(data, output, model=model, max_steps=max_steps, epochs=epochs, rank=rank, lr=lr,
                                 batch_size=batch_size, seed=seed)
    click.echo(f"adapter written to {summary['path']}: {summary['steps']} steps on {summary['examples']} "
               f"examples, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
               f"({summary['seconds']:.0f} s)", err=True)
