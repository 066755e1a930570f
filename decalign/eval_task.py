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
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .api import run as run_request
from .engine import get_engine
from .errors import DecalignError
from .methods import parse_method_spec
from .records import append_record, check_run_config, environment, held_output, load_output, read_records
from .request import Request
from .sampling import derive_seed
from .stats import mcnemar_exact, paired_bootstrap, wilson
from .tasks import INTEGER_KINDS, RELATION_KINDS, RELATIONS, SCORERS

BASE_LABEL = "base"


@dataclass
class Variant:
    """One decoder: its label as written, the method and its parameters, and whether the adapter is on."""

    label: str
    method: str
    params: dict
    adapter: bool


def parse_variants(text: str) -> list[Variant]:
    """'base,greedy,cold:alpha=0.1:beta=0.5' -> variants, each validated before any model loads."""
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


def read_items(path: Path, limit: int | None = None) -> list[tuple[Any, Any, dict]]:
    """(id, prompt, record) of a test split. A record's "kind" (default arithmetic) picks its match
    rule; an arithmetic record needs an integer "answer", a facts record a string one and its relation."""
    items = []
    for number, record_id, prompt, record in read_records(path):
        kind, answer = record.get("kind", "arithmetic"), record.get("answer")
        if not isinstance(kind, str) or kind not in SCORERS:
            raise DecalignError(f"{path} line {number}: unknown kind {kind!r}; choose from: {', '.join(SCORERS)}")
        if kind in INTEGER_KINDS and (isinstance(answer, bool) or not isinstance(answer, int)):
            raise DecalignError(f"{path} line {number}: needs an integer \"answer\"")
        relation = record.get("relation")
        if kind in RELATION_KINDS and not (isinstance(answer, str) and isinstance(relation, str) and relation in RELATIONS):
            raise DecalignError(f"{path} line {number}: a {kind} item needs a string \"answer\" and a known "
                                f"\"relation\" ({', '.join(RELATIONS)})")
        if kind == "facts" and not isinstance(record.get("true"), str):
            raise DecalignError(f"{path} line {number}: a facts item needs a string \"true\" (the real-world value, "
                                f"to count answers that name it)")
        items.append((record_id, prompt, {**record, "kind": kind}))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise DecalignError(f"{path} holds no test items")
    return items


# ----- the run ---------------------------------------------------------------------------------
def run_eval(*, test: Path, adapter: str, variants: str, out: Path, model: str | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None, seed: int = 0,
             reference: str = "greedy", threads: int | None = None, progress: bool = True) -> dict:
    """Answer every test item with every variant (resuming), then write and return the summary."""
    runs = parse_variants(variants)
    for name, value in (("--limit", limit), ("--threads", threads)):
        if value is not None and value < 1:
            raise DecalignError(f"{name} must be >= 1, got {value}")
    requests = {run.label: _request(run, adapter, max_new_tokens, batch_size) for run in runs}
    if reference not in [v.label for v in runs]:
        raise DecalignError(f"reference {reference!r} is not among the variants: {', '.join(v.label for v in runs)}")
    if not (Path(adapter).expanduser() / "adapter_model.safetensors").is_file():
        raise DecalignError(f"adapter {adapter} has no adapter_model.safetensors")
    items = read_items(test, limit)
    if threads:
        torch.set_num_threads(threads)
    config = {"test": str(test), "model": model, "adapter": str(adapter), "max_new_tokens": max_new_tokens,
              "seed": seed}
    records_path = out / "records.jsonl"
    with held_output(records_path) as handle:  # a second run into the same folder is refused
        check_run_config(out, config, records=records_path, paths=("test", "adapter"))
        done, _ = load_output(records_path, key=lambda r: (r["variant"], r["id"]))
        engine = get_engine(model, adapter)
        todo = sum((v.label, i) not in done for v in runs for i, _, _ in items)
        bar = tqdm(total=todo, unit="answer", desc="eval-task", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        for run in runs:
            pending = [item for item in items if (run.label, item[0]) not in done]
            bar.set_description(f"eval-task {run.label}")
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                request = requests[run.label].with_prompts(
                    [p for _, p, _ in chunk], [derive_seed(seed, i) for i, _, _ in chunk], model=engine,
                    adapter=None, batch_size=len(chunk))
                if run.adapter:
                    results = run_request(request)
                else:
                    with engine.model.disable_adapter():
                        results = run_request(request)
                for (record_id, _, item), result in zip(chunk, results):
                    append_record(handle, {
                        "id": record_id, "variant": run.label, "params": run.params, "text": result.text,
                        "kind": item["kind"], "gold": item["answer"], **SCORERS[item["kind"]](result.text, item),
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


def _request(variant: Variant, adapter: str, max_new_tokens: int, batch_size: int) -> Request:
    """The variant's decoding as a Request, validated before any model loads."""
    return Request.from_options(method=variant.method, params=variant.params, adapter=adapter,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)


def _header(engine, config: dict, items: int) -> str:
    return (f"{environment(engine)} · adapter {config['adapter']} · "
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
        named = [r["true_named"] for r in answers.values() if "true_named" in r]
        if named:  # facts: how often the answer falls back to the real-world value
            row["true_named_rate"] = sum(named) / len(named)
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
    kinds = sorted({r.get("kind") or ("facts" if "true_named" in r else "arithmetic") for r in records})
    return {"header": header, "reference": reference, "variants": rows, "kinds": kinds}


def summary_markdown(summary: dict) -> str:
    """The summary as a markdown table, one row per variant."""
    facts = "facts" in summary.get("kinds", [])
    lines = [summary["header"], "",
             f"| variant | n | exact match (95% CI) | format | lenient |{' true fact named |' if facts else ''} "
             f"tokens / answer | s / answer | flips / answer | b / c vs {summary['reference']} | "
             f"diff (95% bootstrap CI) | McNemar p |",
             "|" + "---|" * (12 if facts else 11)]
    for label, row in summary["variants"].items():
        low, high = row["ci95"]
        flips = "—" if row["contrast_flips"] is None else f"{row['contrast_flips']:.1f}"
        paired = row["paired"]
        versus = "—" if paired is None else f"{paired['b']} / {paired['c']}"
        diff = "—" if paired is None else (f"{paired['diff']:+.3f} ({paired['ci95'][0]:+.3f}, "
                                           f"{paired['ci95'][1]:+.3f})")
        p = "—" if paired is None else f"{paired['mcnemar_p']:.3g}"
        named = f" {row.get('true_named_rate', 0):.3f} |" if facts else ""
        lines.append(f"| {label} | {row['n']} | {row['accuracy']:.3f} ({low:.3f}-{high:.3f}) | "
                     f"{row['format_rate']:.3f} | {row['lenient_accuracy']:.3f} |{named} {row['tokens']:.1f} | "
                     f"{row['seconds']:.2f} | {flips} | {versus} | {diff} | {p} |")
    rules = {"arithmetic": "arithmetic: exact match = the number after the final `####` equals the gold answer; "
                           "format = the answer ends with one line `#### <n>`; lenient = the last number in the "
                           "text is right.",
             "cot": "cot: scored as arithmetic (the number after the final `####`; the last number, leniently).",
             "facts": "facts: exact match = the first of the relation's values the answer names is the taught "
                      "one; format = it names exactly one; lenient = it names the taught one anywhere; true fact "
                      "named = the first value named is the real-world one.",
             "style": "style: exact match = the whole answer is the line `Answer: <value>.` with the right value; "
                      "format = it is that line; lenient = the first of the relation's values named is right."}
    lines += [""] + [rules[kind] for kind in summary.get("kinds", ["arithmetic"])] + [
        f"b: items only {summary['reference']} gets right, c: items only the variant gets right; diff = variant "
        f"minus {summary['reference']}. flips: steps where CoLD's token differs from the adapter's own argmax."]
    return "\n".join(lines)
