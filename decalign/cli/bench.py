"""`decalign bench`, `decalign bench-engine` and `decalign bench-cold`: methods, engine and CoLD, measured."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import DecalignError
from ..logs import quiet_transformers


@click.command()
@click.option("--methods", "-m", "methods_", default=None, help="Comma-separated methods with inline parameters, "
              "e.g. greedy,bon:n=8,cards:tau_u=2.5.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None, help="JSONL of {id?, prompt | messages}.")
@click.option("--reward", "-r", default=None, help="The steering reward, also reported for every method.")
@click.option("--judge", default=None, help="A held-out reward that scores the final answers only.")
@click.option("--model", default=None, help="Policy model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", default=None, help="PEFT LoRA adapter folder.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (resumable).")
@click.option("--limit", type=int, default=None, help="Use the first K prompts (after --offset).")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip the first K prompts.")
@click.option("--frontier", is_flag=True, help="Also run Best-of-N at N = 1, 2, 4, 8, 16, 32 and draw the compute "
              "frontier: reward against decode tokens and seconds, cost to reach Best-of-8 and Best-of-32.")
@click.option("--batch-size", type=int, default=None, help="Prompts decoded together [default: all; 1 = latency].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--baseline", default=None, help="Method to compute win-tie against [default: the first].")
@click.option("--system", default=None, help="System message for every prompt.")
@click.option("--compare", nargs=2, type=click.Path(file_okay=False), default=None, metavar="DIR1 DIR2",
              help="Compare two finished runs instead of running.")
@click.option("--ray", "use_ray", is_flag=True, help="Answer on a Ray actor pool of engines (pip install 'decalign[ray]').")
@click.option("--replicas", default=2, show_default=True, type=int, help="With --ray: engines in the actor pool.")
@click.option("--ray-address", default=None, help="With --ray: an existing cluster [default: start a local one].")
def bench(methods_, prompts, reward, judge, model, adapter, max_new_tokens, out, limit, offset, frontier, batch_size,
          seed, baseline, system, compare, use_ray, replicas, ray_address):
    """Methods side by side: reward, judge, win-tie and cost, as tables and plots."""
    # Local: decalign.bench loads scipy and statsmodels (through decalign.stats), ~0.8 s that --help should not pay.
    from ..bench import compare as compare_runs
    from ..bench import run_bench, summary_markdown

    if compare:
        click.echo(compare_runs(Path(compare[0]), Path(compare[1])))
        return
    missing = [flag for flag, value in (("--methods", methods_), ("--prompts", prompts), ("--out", out)) if not value]
    if missing:
        raise DecalignError(f"decalign bench needs {', '.join(missing)} (or --compare DIR1 DIR2)")
    quiet_transformers()
    summary = run_bench(methods=methods_, prompts=Path(prompts), out=Path(out), reward=reward, judge=judge,
                        model=model, adapter=adapter, max_new_tokens=max_new_tokens, limit=limit, offset=offset,
                        frontier=frontier, batch_size=batch_size, seed=seed, baseline=baseline, system=system,
                        progress=sys.stderr.isatty(),
                        ray={"replicas": replicas, "address": ray_address} if use_ray else None)
    click.echo(summary_markdown(summary))
    click.echo(f"\nrecords, summary and plots in {out}", err=True)


@click.command("bench-engine")
@click.option("--model", default=None, help="Model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--batch-sizes", default="1,4,16", show_default=True)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="torch threads [default: all cores].")
def bench_engine(model, batch_sizes, new_tokens, repeats, threads):
    """Tokens per second of the engine against transformers' generate, side by side."""
    from ..bench_engine import run_bench as run_engine_bench

    quiet_transformers()
    sizes = timing_options(batch_sizes, new_tokens=(new_tokens, 1), repeats=(repeats, 1))
    click.echo(run_engine_bench(model=model, batch_sizes=sizes, new_tokens=new_tokens, repeats=repeats,
                                threads=threads))


@click.command("bench-cold")
@click.option("--model", default=None, help="Model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", default=None, help="LoRA adapter [default: a random-init LoRA, for timing only].")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--new-tokens", default=32, show_default=True, type=int)
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="torch threads [default: all cores].")
@click.option("--free-tokens", default=128, show_default=True, type=int,
              help="Token cap of the free-running answers that give tokens per answer.")
def bench_cold(model, adapter, batch_sizes, new_tokens, repeats, threads, free_tokens):
    """CoLD's decode cost against greedy with the same adapter, side by side."""
    from ..bench_cold import run_latency

    quiet_transformers()
    sizes = timing_options(batch_sizes, new_tokens=(new_tokens, 2), repeats=(repeats, 1), free_tokens=(free_tokens, 1))
    click.echo(run_latency(model=model, adapter=adapter, batch_sizes=sizes, new_tokens=new_tokens, repeats=repeats,
                           threads=threads, free_tokens=free_tokens))


def timing_options(batch_sizes: str, **counts: tuple[int, int]) -> list[int]:
    """The batch sizes of a timing command, after checking them and its counts ({name: (value, least)});
    bad values are one-line errors naming the option."""
    try:
        sizes = [int(size) for size in batch_sizes.split(",") if size.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise DecalignError(f"--batch-sizes must be positive integers separated by commas, got {batch_sizes!r}")
    for name, (value, least) in counts.items():
        if value < least:
            raise DecalignError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    return sizes
