"""`decalign eval-task`: exact-match accuracy of decoders on a task's held-out split, paired statistics.

It tests the claim that a decoder (CoLD) beats greedy decoding *with the same adapter*: every variant
answers the same items, so each comparison is paired. Per variant: accuracy with a Wilson 95% CI,
the rate of answers in the taught format, a lenient accuracy (last number in the text, which is fair
to a model that ignores the format) and tokens per answer. Against the reference variant (adapter
greedy): the flips b (only the reference right) and c (only the variant right), McNemar's exact
p-value and a paired bootstrap 95% CI of the accuracy difference.

Variants: `base` is greedy decoding with the adapter switched off; any other label is a method spec
run with the adapter (`greedy`, `cold:alpha=0.1:beta=0.5`, ...). A run directory holds config.json,
records.jsonl (one line per variant and item, appended as each batch finishes, so a rerun resumes
and may add variants) and summary.md / summary.json.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .errors import DecalignError
from .records import append_record, check_run_config, load_output, read_records
from .tasks import is_formatted, parse_final, parse_lenient

BASE_LABEL = "base"
Z95 = 1.959963984540054


@dataclass
class Variant:
    """One decoder: its label as written, the method and its parameters, and whether the adapter is on."""

    label: str
    method: str
    params: dict
    adapter: bool


def parse_variants(text: str) -> list[Variant]:
    """'base,greedy,cold:alpha=0.1:beta=0.5' -> variants, each validated before any model loads."""
    from .methods import parse_method_spec

    variants = []
    for label in [part.strip() for part in text.split(",") if part.strip()]:
        if label == BASE_LABEL:
            variants.append(Variant(label, "greedy", {}, False))
        else:
            name, params = parse_method_spec(label)
            variants.append(Variant(label, name, params, True))
    if not variants:
        raise DecalignError("--variants is empty; e.g. --variants base,greedy,cold:alpha=0.1:beta=0.5")
    if len({v.label for v in variants}) != len(variants):
        raise DecalignError("--variants names a variant twice")
    return variants


def read_items(path: Path, limit: int | None = None) -> list[tuple[Any, Any, int]]:
    """(id, prompt, gold answer) of a test split; a record without an integer "answer" is refused."""
    items = []
    for number, record_id, prompt, record in read_records(path):
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DecalignError(f"{path} line {number}: needs an integer \"answer\"")
        items.append((record_id, prompt, answer))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise DecalignError(f"{path} holds no test items")
    return items


# ----- statistics ------------------------------------------------------------------------------
def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sound near 0 and 1, where the normal one is not."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as b + c fair coin flips."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(reference: list[bool], other: list[bool], resamples: int = 10000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): accuracy of `other` minus `reference` on the same items, with the
    95% percentile interval of that difference over items resampled with replacement."""
    import numpy as np

    if len(reference) != len(other) or not reference:
        raise DecalignError("a paired bootstrap needs two equally long, non-empty lists of outcomes")
    diff = np.asarray(other, dtype=float) - np.asarray(reference, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


# ----- the run ---------------------------------------------------------------------------------
def run_eval(*, test: Path, adapter: str, variants: str, out: Path, model: str | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None, seed: int = 0,
             reference: str = "greedy", threads: int | None = None, progress: bool = True) -> dict:
    """Answer every test item with every variant (resuming), then write and return the summary."""
    import torch
    from tqdm import tqdm

    from .api import generate, get_engine
    from .sampling import derive_seed

    runs = parse_variants(variants)
    for name, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size),
                        ("--limit", limit), ("--threads", threads)):
        if value is not None and value < 1:
            raise DecalignError(f"{name} must be >= 1, got {value}")
    if reference not in [v.label for v in runs]:
        raise DecalignError(f"reference {reference!r} is not among the variants: {', '.join(v.label for v in runs)}")
    if not (Path(adapter).expanduser() / "adapter_model.safetensors").is_file():
        raise DecalignError(f"adapter {adapter} has no adapter_model.safetensors")
    items = read_items(test, limit)
    if threads:
        torch.set_num_threads(threads)
    config = {"test": str(test), "model": model, "adapter": str(adapter), "max_new_tokens": max_new_tokens,
              "seed": seed}
    check_run_config(out, config)
    records_path = out / "records.jsonl"
    done, _ = load_output(records_path, key=lambda r: (r["variant"], r["id"]))
    engine = get_engine(model, adapter)
    todo = sum((v.label, i) not in done for v in runs for i, _, _ in items)
    bar = tqdm(total=todo, unit="answer", desc="eval-task", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with records_path.open("a", encoding="utf-8") as handle:
        for run in runs:
            pending = [item for item in items if (run.label, item[0]) not in done]
            bar.set_description(f"eval-task {run.label}")
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                kwargs = dict(method=run.method, model=engine, max_new_tokens=max_new_tokens,
                              seed=[derive_seed(seed, i) for i, _, _ in chunk], batch_size=len(chunk), **run.params)
                prompts = [p for _, p, _ in chunk]
                if run.adapter:
                    results = generate(prompts, **kwargs)
                else:
                    with engine.model.disable_adapter():
                        results = generate(prompts, **kwargs)
                for (record_id, _, gold), result in zip(chunk, results):
                    answer = parse_final(result.text)
                    append_record(handle, {
                        "id": record_id, "variant": run.label, "params": run.params, "text": result.text,
                        "gold": gold, "answer": answer, "correct": answer == gold,
                        "formatted": is_formatted(result.text), "lenient_correct": parse_lenient(result.text) == gold,
                        "tokens": len(result.tokens), "finish_reason": result.finish_reason,
                        "seconds": result.stats["wall_time"] / result.stats["batch_size"],
                        "contrast_flips": result.stats.get("contrast_flips")})
                bar.update(len(chunk))
    bar.close()
    _, records = load_output(records_path, key=lambda r: (r["variant"], r["id"]))
    wanted = {i for i, _, _ in items}
    summary = summarize([r for r in records if r["id"] in wanted], [v.label for v in runs], reference,
                        header=_header(engine, config, len(items)))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    return summary


def _header(engine, config: dict, items: int) -> str:
    import torch

    from . import __version__

    return (f"decalign {__version__} · torch {torch.__version__} · {platform.machine()} "
            f"{torch.get_num_threads()} threads · model {engine.name} · adapter {config['adapter']} · "
            f"{items} items of {config['test']} · {config['max_new_tokens']} new tokens · seed {config['seed']} · "
            f"{time.strftime('%Y-%m-%d')}")


def summarize(records: list[dict], labels: list[str], reference: str, header: str = "") -> dict:
    """Per-variant accuracy, format rate and length; paired flips, McNemar and bootstrap vs the reference."""
    by_label = {label: {r["id"]: r for r in records if r["variant"] == label} for label in labels}
    ref = by_label[reference]
    rows = {}
    for label, answers in by_label.items():
        if not answers:
            continue
        n = len(answers)
        correct = sum(r["correct"] for r in answers.values())
        flips = [r["contrast_flips"] for r in answers.values() if r.get("contrast_flips") is not None]
        row = {"n": n, "correct": correct, "accuracy": correct / n, "ci95": wilson(correct, n),
               "format_rate": sum(r["formatted"] for r in answers.values()) / n,
               "lenient_accuracy": sum(r["lenient_correct"] for r in answers.values()) / n,
               "tokens": statistics.fmean(r["tokens"] for r in answers.values()),
               "seconds": statistics.fmean(r["seconds"] for r in answers.values()),
               "contrast_flips": statistics.fmean(flips) if flips else None, "paired": None}
        shared = sorted(set(answers) & set(ref), key=str)
        if label != reference and shared:
            mine = [answers[i]["correct"] for i in shared]
            theirs = [ref[i]["correct"] for i in shared]
            b = sum(t and not m for m, t in zip(mine, theirs))
            c = sum(m and not t for m, t in zip(mine, theirs))
            diff, low, high = paired_bootstrap(theirs, mine)
            row["paired"] = {"n": len(shared), "b": b, "c": c, "diff": diff, "ci95": [low, high],
                             "mcnemar_p": mcnemar_exact(b, c)}
        rows[label] = row
    return {"header": header, "reference": reference, "variants": rows}


def summary_markdown(summary: dict) -> str:
    """The summary as a markdown table, one row per variant."""
    lines = [summary["header"], "",
             f"| variant | n | exact match (95% CI) | format | lenient | tokens / answer | s / answer | "
             f"flips / answer | b / c vs {summary['reference']} | diff (95% bootstrap CI) | McNemar p |",
             "|" + "---|" * 11]
    for label, row in summary["variants"].items():
        low, high = row["ci95"]
        flips = "—" if row["contrast_flips"] is None else f"{row['contrast_flips']:.1f}"
        paired = row["paired"]
        versus = "—" if paired is None else f"{paired['b']} / {paired['c']}"
        diff = "—" if paired is None else (f"{paired['diff']:+.3f} ({paired['ci95'][0]:+.3f}, "
                                           f"{paired['ci95'][1]:+.3f})")
        p = "—" if paired is None else f"{paired['mcnemar_p']:.3g}"
        lines.append(f"| {label} | {row['n']} | {row['accuracy']:.3f} ({low:.3f}-{high:.3f}) | "
                     f"{row['format_rate']:.3f} | {row['lenient_accuracy']:.3f} | {row['tokens']:.1f} | "
                     f"{row['seconds']:.2f} | {flips} | {versus} | {diff} | {p} |")
    lines += ["", f"exact match: the number after the final `####` equals the gold answer; format: the answer "
              f"ends with one line `#### <n>`; lenient: the last number in the text is right. b: items only "
              f"{summary['reference']} gets right, c: items only the variant gets right; diff = variant minus "
              f"{summary['reference']}. flips: steps where CoLD's token differs from the adapter's own argmax."]
    return "\n".join(lines)


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
def eval_task_command(test, adapter, variants, out, model, reference, max_new_tokens, batch_size, limit, seed,
                      threads):
    """Exact-match accuracy of base, adapter greedy and CoLD on a test split, with paired statistics."""
    from .cli import _quiet_transformers

    _quiet_transformers()
    summary = run_eval(test=Path(test), adapter=adapter, variants=variants, out=Path(out), model=model,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, seed=seed,
                       reference=reference, threads=threads)
    click.echo(summary_markdown(summary))
    click.echo(f"\nrecords and summary in {out}", err=True)
