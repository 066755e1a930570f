"""`decalign make-task` and `decalign eval-task`: tasks an adapter learns, and their evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..logs import quiet_transformers
from ..tasks import KINDS, write_splits


@click.command("make-task")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the two splits.")
@click.option("--train", default=3000, show_default=True, type=int, help="Train problems (chat JSONL).")
@click.option("--test", default=300, show_default=True, type=int,
              help="Held-out test problems (facts and style have 320 at most: each fact in each test phrasing).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int,
              help="Most steps per problem, for --kind arithmetic only.  [default: 3]")
@click.option("--kind", type=click.Choice(KINDS), default="arithmetic", show_default=True,
              help="arithmetic: word problems answered `#### <n>`; cot: multi-step word problems answered in "
                   "worked sentences, then `#### <n>` (GSM8K's setting); facts: counterfactual facts (an adapter "
                   "overriding what the base model knows); style: real facts in a house answer style the base "
                   "model never uses. cot, facts and style are tested with phrasings training never used.")
def make_task(output, train, test, seed, max_steps, kind):
    """Write a task's train.jsonl (chat records for train-lora) and test.jsonl (for eval-task)."""
    train_path, test_path = write_splits(Path(output), train, test, seed, max_steps, kind)
    counts = [sum(1 for _ in path.open(encoding="utf-8")) for path in (train_path, test_path)]
    click.echo(f"wrote {counts[0]} train records to {train_path} and {counts[1]} test items to {test_path}", err=True)


@click.command("eval-task")
@click.argument("test", metavar="TEST.jsonl", type=click.Path(dir_okay=False))
@click.option("--adapter", required=True, help="PEFT LoRA adapter folder (trained with train-lora).")
@click.option("--variants", "-v", default="base,greedy,cold:alpha=0.1:beta=0.5", show_default=True,
              help="Comma-separated decoders: base (no adapter) or a method spec run with the adapter.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (resumable).")
@click.option("--model", default=None, help="Base model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--reference", default="greedy", show_default=True, help="Variant the paired statistics compare to.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=int, help="Items decoded together.")
@click.option("--limit", default=None, type=int, help="Use the first K test items.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds sampling variants (greedy ignores it).")
@click.option("--threads", default=None, type=int, help="torch threads [default: all cores].")
def eval_task(test, adapter, variants, out, model, reference, max_new_tokens, batch_size, limit, seed, threads):
    """Exact-match accuracy of base, adapter greedy and CoLD on a test split, with paired statistics."""
    # Local: decalign.eval_task loads scipy and statsmodels (through decalign.stats), ~0.8 s that --help should
    # not pay.
    from ..eval_task import run_eval, summary_markdown

    quiet_transformers()
    summary = run_eval(test=Path(test), adapter=adapter, variants=variants, out=Path(out), model=model,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, seed=seed,
                       reference=reference, threads=threads, progress=sys.stderr.isatty())
    click.echo(summary_markdown(summary))
    click.echo(f"\nrecords and summary in {out}", err=True)
