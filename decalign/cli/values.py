"""`decalign train-value` and `decalign value-check`: prefix values distilled from a reward."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..logs import quiet_transformers


def _sample_options(function):
    """The options train-value and value-check share: which policy answers, how, and on which prompts."""
    options = [
        click.option("--reward", "-r", required=True, help="Reward spec that scores finished answers, e.g. harmless."),
        click.option("--model", default=None, help="Policy model [default: embedded SmolLM2-135M-Instruct]."),
        click.option("--adapter", default=None, help="PEFT LoRA adapter folder of the policy."),
        click.option("--exclude", type=click.Path(dir_okay=False), default=None,
                     help="Drop prompts whose first user turn appears in this JSONL (keep a benchmark unseen)."),
        click.option("--limit", type=int, default=None, help="Use K prompts (after --exclude and --offset)."),
        click.option("--offset", type=int, default=0, show_default=True, help="Skip the first K prompts."),
        click.option("--n", type=int, default=8, show_default=True, help="Answers sampled per prompt."),
        click.option("--max-new-tokens", type=int, default=96, show_default=True),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="Sampling temperature of the answers: that of the search that will use the value "
                          "(the policy's own distribution by default; CARDS' paper setting is 0.7)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Top-k of the answers (0 = off)."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts sampled together."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command("train-value")
@click.argument("prompts", metavar="PROMPTS.jsonl", type=click.Path(dir_okay=False))
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for value.safetensors and value.json (samples.jsonl is kept there: a rerun resumes).")
@_sample_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--validation", type=float, default=0.2, show_default=True, help="Fraction of prompts held out.")
@click.option("--samples-from", type=click.Path(file_okay=False, exists=True), default=None,
              help="Reuse the answers another train-value run sampled (same policy and sampling), rescored by "
                   "--reward: retrain a value for a new reward without sampling again.")
@click.option("--ray", "use_ray", is_flag=True, help="Sample the answers on a Ray actor pool (pip install 'decalign[ray]').")
@click.option("--replicas", default=2, show_default=True, type=int, help="With --ray: engines in the actor pool.")
@click.option("--ray-address", default=None, help="With --ray: an existing cluster [default: start a local one].")
def train_value(prompts, out, reward, model, adapter, exclude, limit, offset, n, max_new_tokens, temperature, top_k,
                batch_size, seed, validation, samples_from, use_ray, replicas, ray_address):
    """Distil a reward into a prefix value on the policy's own hidden states (use as value=PATH)."""
    from ..values.train import train_value as train_value_head

    quiet_transformers()
    head = train_value_head(prompts=Path(prompts), reward_spec=reward, out=Path(out), model=model, adapter=adapter,
                            exclude=Path(exclude) if exclude else None, limit=limit, offset=offset, n=n,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                            validation=validation, batch_size=batch_size, log=lambda line: click.echo(line, err=True),
                            samples_from=Path(samples_from) if samples_from else None,
                            ray={"replicas": replicas, "address": ray_address} if use_ray else None,
                            progress=sys.stderr.isatty())
    figures = head.card["validation"]
    rows = ", ".join(f"{k} tok {v['correlation']:.2f} (drift {v['drift_sd']:+.2f} sd)"
                     for k, v in figures["by_length"].items())
    click.echo(f"value written to {out}: layers {head.layers}, penalty {figures['penalty']:g}; validation "
               f"within-prompt correlation {rows}")


@click.command("value-check")
@click.argument("prompts", metavar="PROMPTS.jsonl", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for samples.jsonl (resumable) and value_check.md / .json.")
@click.option("--value", "values", multiple=True, help="A value to check (shipped name or folder); repeatable.")
@click.option("--scorer", "scorers", multiple=True, help="Any reward spec scored on prefixes; repeatable.")
@_sample_options
@click.option("--seed", type=int, default=1, show_default=True)
def value_check(prompts, out, values, scorers, reward, model, adapter, exclude, limit, offset, n, max_new_tokens,
                temperature, top_k, batch_size, seed):
    """Within-prompt correlation with the final reward, and drift, of prefix scorers at 4..64 tokens."""
    from ..values.check import check_values

    quiet_transformers()
    click.echo(check_values(prompts=Path(prompts), reward_spec=reward, out=Path(out), values=values,
                            scorers=scorers, model=model, adapter=adapter, exclude=Path(exclude) if exclude else None,
                            limit=limit, offset=offset, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, seed=seed, batch_size=batch_size, progress=sys.stderr.isatty()))
