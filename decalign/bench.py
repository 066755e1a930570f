"""`decalign bench`: methods side by side on a prompt set — reward, held-out judge, win-tie, cost.

A run directory holds config.json (what was run), records.jsonl (one line per method and prompt,
appended as answers finish, so a rerun resumes), summary.md / summary.json and PNG plots.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from .api import run as run_request
from .engine import get_engine
from .errors import DecalignError
from .memory import release_memory
from .methods import get_method, parse_method_spec
from .models import DEFAULT_MODEL
from .records import (FINGERPRINT, append_record, changed_since, check_run_config, digest, environment, held_output,
                      load_output, read_records)
from .request import Request
from .rewards import Reward, load_reward
from .sampling import derive_seed
from .stats import mean_ci

COST_FIELDS = ("forward_passes", "prefill_tokens", "decode_tokens", "discarded_tokens", "reward_calls",
               "value_calls")
FRONTIER_N = (1, 2, 4, 8, 16, 32)  # the Best-of-N reference curve of --frontier


def win_tie(scores: dict[Any, float], baseline: dict[Any, float], tolerance: float = 1e-9) -> dict[str, float]:
    """Per prompt, method against baseline: wins, ties, losses and the win-tie rate."""
    shared = sorted(set(scores) & set(baseline), key=str)
    wins = sum(scores[k] > baseline[k] + tolerance for k in shared)
    losses = sum(scores[k] < baseline[k] - tolerance for k in shared)
    ties = len(shared) - wins - losses
    return {"n": len(shared), "wins": wins, "ties": ties, "losses": losses,
            "win_tie": (wins + ties) / len(shared) if shared else math.nan}


@dataclass
class MethodRun:
    label: str  # as written on the command line, e.g. bon:n=8
    name: str
    params: dict


def parse_methods(text: str, *, frontier: bool = False) -> list[MethodRun]:
    """Runs from 'greedy,bon:n=8,cards'; with frontier, Best-of-N at N = 1..32 goes first."""
    labels = [part.strip() for part in text.split(",") if part.strip()]
    if frontier:
        labels = [f"bon:n={n}" for n in FRONTIER_N if f"bon:n={n}" not in labels] + labels
    runs = []
    for label in labels:
        name, params = parse_method_spec(label)
        runs.append(MethodRun(label, name, params))
    if not runs:
        raise DecalignError("--methods is empty; e.g. --methods greedy,bon:n=8,cards")
    if len({r.label for r in runs}) != len(runs):
        raise DecalignError("--methods names a method twice")
    return runs


def run_bench(*, methods: str, prompts: Path, out: Path, reward: str | None, judge: str | None = None,
              model: str | None = None, adapter: str | None = None, max_new_tokens: int = 128,
              limit: int | None = None, batch_size: int | None = None, seed: int = 0, baseline: str | None = None,
              system: str | None = None, progress: bool = True, frontier: bool = False, offset: int = 0,
              on_record: Callable[[dict], None] | None = None, ray: dict | None = None) -> dict:
    """Run every method on every prompt (resuming), then write the summary and plots. With
    `frontier`, Best-of-N runs at N = 1..32 beside the methods and the compute frontier is drawn.
    With `ray` ({"replicas": N, "address": A}), the answers come from a Ray actor pool of engines
    (`ray_job.bench_on_ray`): the same records, each batch timed where it ran."""
    runs = parse_methods(methods, frontier=frontier)
    if limit is not None and limit < 1:
        raise DecalignError(f"--limit must be >= 1, got {limit}")
    if offset < 0:
        raise DecalignError(f"--offset must be >= 0, got {offset}")
    every = [(record_id, prompt) for _, record_id, prompt, _ in read_records(prompts)]
    if not every:
        raise DecalignError(f"{prompts} holds no prompts")
    if offset >= len(every):
        raise DecalignError(f"--offset {offset} skips all {len(every)} prompts of {prompts}")
    items = every[offset:offset + limit] if limit is not None else every[offset:]
    steer = load_reward(reward)
    scorer = load_reward(judge) if judge else None
    needs = [r.label for r in runs if get_method(r.name).needs_reward]
    if needs and steer is None:
        raise DecalignError(f"--reward is needed by {', '.join(needs)}")
    requests = {run.label: _request(run, steer, model=model, adapter=adapter, max_new_tokens=max_new_tokens,
                                    system=system, batch_size=batch_size) for run in runs}
    config = {"prompts": str(prompts), "offset": offset, "model": model, "adapter": adapter, "reward": reward, "judge": judge,
              "max_new_tokens": max_new_tokens, "seed": seed, "system": system,
              **{role + FINGERPRINT: rater.fingerprint() for role, rater in (("reward", steer), ("judge", scorer))
                 if rater is not None}}
    records_path = out / "records.jsonl"
    with held_output(records_path) as handle:  # a second run into the same folder is refused
        check_run_config(out, config, records=records_path, defaults={"offset": 0},
                         paths=("prompts", "adapter"))  # before --offset: none
        done, written = load_output(records_path, key=lambda r: (r["method"], r["id"]))
        _check_same_prompts(written, dict(items), prompts, out)
        pending = {run.label: [(i, p, derive_seed(seed, i)) for i, p in items if (run.label, i) not in done]
                   for run in runs}
        bar = tqdm(total=sum(map(len, pending.values())), unit="answer", desc="bench", disable=not progress)
        if ray is None:
            engine = get_engine(model, adapter)
            header = _header(environment(engine), config)

            def answers() -> Iterator[dict]:
                for run in runs:
                    size = batch_size or len(pending[run.label]) or 1
                    for start in range(0, len(pending[run.label]), size):
                        bar.set_description(f"bench {run.label}")
                        yield from answer_records(run.label, run.params, requests[run.label],
                                                  pending[run.label][start:start + size], engine, steer, scorer)
                        release_memory()  # a Best-of-32 batch's pages are not held into the next method's
        else:
            from .ray_job import bench_on_ray

            where = f"on Ray, {ray['replicas']} replicas · model {model or DEFAULT_MODEL}"
            header = _header(f"{environment(None)} · {where}", config)
            jobs = {run.label: (run.params, requests[run.label]) for run in runs}
            answers = functools.partial(bench_on_ray, pending, jobs, reward=reward, judge=judge, batch_size=batch_size,
                                        **ray)
        for record in answers():
            append_record(handle, record)
            bar.update(1)
            if on_record is not None:
                on_record(record)
        bar.close()
        _, records = load_output(records_path, key=lambda r: (r["method"], r["id"]))
        labels = [r.label for r in runs]
        summary = summarize(records, labels, baseline or labels[0], header=header)
        write_summary(out, summary)
        write_plots(out, records, summary)
    return summary


def answer_records(label: str, params: dict, request: Request, chunk: list[tuple[Any, Any, int]], engine,
                   steer: Reward | None, scorer: Reward | None) -> list[dict]:
    """Bench records of one batch: (id, prompt, seed) decoded together by `request`, each answer
    scored by the steering reward and the judge."""
    prompts = [p for _, p, _ in chunk]
    results = run_request(request.with_prompts(prompts, seed=[s for _, _, s in chunk], model=engine,
                                               batch_size=len(chunk)))
    texts = [r.text for r in results]
    rewards = steer.score(prompts, texts) if steer else [None] * len(chunk)
    judged = scorer.score(prompts, texts) if scorer else [None] * len(chunk)
    return [{"id": record_id, "method": label, "params": params, "text": result.text, "tokens": len(result.tokens),
             "finish_reason": result.finish_reason, "reward": value, "judge": verdict, "stats": result.stats,
             "trace": result.trace, "prompt_digest": digest(prompt)}
            for (record_id, prompt, _), result, value, verdict in zip(chunk, results, rewards, judged)]


def _check_same_prompts(written: list[dict], asked: dict, prompts: Path, out: Path) -> None:
    """Refuse to keep an answer as an id's when the prompt under that id changed since it was
    answered (a prompts file edited under the same path)."""
    for record in written:
        if record["id"] in asked and changed_since(record.get("prompt_digest"), asked[record["id"]]):
            raise DecalignError(f"{prompts}: id {record['id']!r} was answered in {out} for another prompt; "
                                "use a new --out folder")


def _request(run: MethodRun, reward: Reward | None, *, model: str | None, adapter: str | None, max_new_tokens: int,
             system: str | None, batch_size: int | None) -> Request:
    """The run's decoding as a Request, validated before anything is decoded (traces kept where the
    method has them)."""
    params = dict(run.params)
    if "trace" in get_method(run.name).parameters():
        params.setdefault("trace", True)
    return Request.from_options(method=run.name, params=params, reward=reward, model=model, adapter=adapter,
                                max_new_tokens=max_new_tokens, system=system, batch_size=batch_size or 1)


def _header(environment_line: str, config: dict) -> str:
    return (f"{environment_line} · reward {config['reward']} · judge {config['judge']} · {config['max_new_tokens']} new tokens · "
            f"seed {config['seed']}")


def summarize(records: list[dict], labels: list[str], baseline: str, header: str = "") -> dict:
    """Per-method means with 95% CIs, win-tie against the baseline, and costs per answer."""
    by_method = {label: [r for r in records if r["method"] == label] for label in labels}
    if baseline not in by_method:
        raise DecalignError(f"baseline {baseline!r} is not among the methods: {', '.join(labels)}")

    def column(label: str, key: str) -> dict:
        return {r["id"]: r[key] for r in by_method[label] if r[key] is not None}

    judged = any(r["judge"] is not None for r in records)
    compare_key = "judge" if judged else "reward"
    rows = {}
    for label, items in by_method.items():
        if not items:
            continue
        per_answer = [r["stats"]["wall_time"] / r["stats"]["batch_size"] for r in items]
        rewards = [r["reward"] for r in items if r["reward"] is not None]
        judges = [r["judge"] for r in items if r["judge"] is not None]
        row = {
            "n": len(items),
            "reward": mean_ci(rewards) if rewards else None,
            "judge": mean_ci(judges) if judges else None,
            "win_tie": win_tie(column(label, compare_key), column(baseline, compare_key)),
            "time_median": statistics.median(per_answer),
            "time_mean": statistics.fmean(per_answer),
            "tokens": statistics.fmean(r["tokens"] for r in items),
        }
        for field in COST_FIELDS:
            row[field] = statistics.fmean(r["stats"].get(field, 0) for r in items)
        row["decode_tokens_per_s"] = row["decode_tokens"] / row["time_mean"] if row["time_mean"] else math.nan
        rows[label] = row
    summary = {"header": header, "baseline": baseline, "win_tie_by": compare_key, "methods": rows}
    summary["frontier"] = frontier(summary)
    return summary


def _curve_key(label: str) -> str:
    """Which curve of the frontier a run belongs to: its method, and its value if it has one."""
    name, *parts = label.split(":")
    value = [p for p in parts if p.startswith("value=")]
    return name + (f" ({value[0]})" if value else "")


def _bon_n(label: str) -> int | None:
    """N of a plain Best-of-N run ('bon:n=8', or 'bon' at its default N); None for anything else."""
    name, *parts = label.split(":")
    if name != "bon" or any(not p.startswith("n=") for p in parts):
        return None
    if not parts:
        return get_method("bon").parameters()["n"]
    return int(parts[0][2:]) if parts[0][2:].isdigit() else None


def cost_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The least cost at which a curve of (cost, reward) points reaches `target`, interpolating
    log-linearly between the last point below and the first point at or above it; None if never."""
    points = sorted(points)
    for i, (cost, reward) in enumerate(points):
        if reward >= target:
            if i == 0 or cost <= 0:
                return cost
            below = max(points[:i], key=lambda p: p[1])
            if below[1] >= target or below[0] <= 0:
                return cost
            fraction = (target - below[1]) / (reward - below[1])
            return math.exp(math.log(below[0]) + fraction * (math.log(cost) - math.log(below[0])))
    return None


def frontier(summary: dict) -> dict | None:
    """Each curve's cost (decode tokens and seconds per answer) to reach Best-of-8's and Best-of-32's
    mean reward, beside Best-of-N's own; None without a Best-of-N curve."""
    rows = summary["methods"]
    bon = {n: rows[label] for label in rows if (n := _bon_n(label)) is not None and rows[label]["reward"]}
    targets = {f"Best-of-{n}": bon[n]["reward"][0] for n in (8, 32) if n in bon}
    if len(bon) < 2 or not targets:
        return None
    curves: dict[str, list[str]] = {}
    for label, row in rows.items():
        if row["reward"] is not None and row["reward_calls"]:  # methods steered by the reward
            curves.setdefault(_curve_key(label), []).append(label)
    table = {}
    for curve, labels in curves.items():
        entry = {"points": labels, "best_reward": max(rows[l]["reward"][0] for l in labels)}
        for target_name, target in targets.items():
            for cost in ("decode_tokens", "time_mean"):
                entry[f"{target_name} {cost}"] = cost_to_reach(
                    [(rows[l][cost], rows[l]["reward"][0]) for l in labels], target)
        table[curve] = entry
    return {"targets": targets, "curves": table}


def frontier_markdown(front: dict) -> str:
    targets = list(front["targets"])
    reference = front["curves"].get("bon", {})
    lines = ["Cost per answer to reach Best-of-N's mean reward (interpolated along each curve; ratio to "
             "Best-of-N's own cost in brackets; — = not reached).", "",
             "| curve | best reward | " + " | ".join(f"{t} ({front['targets'][t]:.3f}): decode tok | "
                                                    f"{t}: s/answer" for t in targets) + " |",
             "|---|---|" + "---|---|" * len(targets)]
    for curve, entry in front["curves"].items():
        cells = []
        for target in targets:
            for cost in ("decode_tokens", "time_mean"):
                value, base = entry[f"{target} {cost}"], reference.get(f"{target} {cost}")
                if value is None:
                    cells.append("—")
                else:
                    ratio = f" ({value / base:.2f}x)" if base else ""
                    cells.append(f"{value:.0f}{ratio}" if cost == "decode_tokens" else f"{value:.2f}{ratio}")
        lines.append(f"| {curve} | {entry['best_reward']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(pair) -> str:
    if pair is None:
        return "—"
    mean, half = pair
    return f"{mean:.3f} ± {half:.3f}" if not math.isnan(half) else f"{mean:.3f}"


def summary_markdown(summary: dict) -> str:
    lines = [summary["header"], "",
             f"| method | n | reward (95% CI) | judge (95% CI) | win-tie vs {summary['baseline']} "
             f"(by {summary['win_tie_by']}) | s/answer median | s/answer mean | forward passes | prefill tok | "
             f"decode tok | discarded tok | reward calls | value calls | answer tok | decode tok/s |",
             "|" + "---|" * 15]
    for label, row in summary["methods"].items():
        wt = row["win_tie"]
        lines.append(
            f"| {label} | {row['n']} | {_fmt(row['reward'])} | {_fmt(row['judge'])} | "
            f"{wt['win_tie']:.0%} ({wt['wins']}/{wt['ties']}/{wt['losses']}) | {row['time_median']:.2f} | "
            f"{row['time_mean']:.2f} | {row['forward_passes']:.0f} | {row['prefill_tokens']:.0f} | "
            f"{row['decode_tokens']:.0f} | {row['discarded_tokens']:.0f} | {row['reward_calls']:.0f} | "
            f"{row['value_calls']:.0f} | {row['tokens']:.0f} | {row.get('decode_tokens_per_s', math.nan):.0f} |")
    lines += ["", "win-tie columns: rate (wins/ties/losses), per prompt. Time per answer: a batch's wall time "
              "divided by its answers; decode tok/s: policy tokens fed per second of it."]
    if summary.get("frontier"):
        lines += ["", "## Compute frontier", "", frontier_markdown(summary["frontier"]), "",
                  "Plots: frontier_tokens.png (reward against decode tokens), frontier_time.png (against seconds)."]
    return "\n".join(lines)


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")


def write_plots(out: Path, records: list[dict], summary: dict) -> list[Path]:
    """reward_vs_time.png, cost.png, and cards_trace.png when a run has a CARDS trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["methods"]
    written = []
    labels = list(rows)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        row = rows[label]
        if row["reward"] is None:
            continue
        mean, half = row["reward"]
        ax.errorbar(row["time_mean"], mean, yerr=None if math.isnan(half) else half, fmt="o", capsize=4,
                    label=label)
        ax.annotate(label, (row["time_mean"], mean), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("wall time per answer, seconds (log scale)")
    ax.set_ylabel("mean reward (95% CI)")
    ax.set_title("Alignment against cost")
    ax.grid(True, alpha=0.3)
    written.append(_save(fig, out / "reward_vs_time.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    positions = range(len(labels))
    bottom = [0.0] * len(labels)
    for field, colour in (("prefill_tokens", "#8da0cb"), ("decode_tokens", "#66c2a5"),
                          ("discarded_tokens", "#fc8d62")):
        values = [rows[label][field] for label in labels]
        axes[0].bar(positions, values, bottom=bottom if field != "discarded_tokens" else None, color=colour,
                    label=field.replace("_", " "), alpha=0.9 if field != "discarded_tokens" else 0.6,
                    width=0.6 if field != "discarded_tokens" else 0.35)
        if field != "discarded_tokens":
            bottom = [b + v for b, v in zip(bottom, values)]
    axes[0].set_ylabel("policy tokens per answer")
    axes[0].set_title("Policy tokens (discarded: narrow bar)")
    axes[0].legend(fontsize=8)
    axes[1].bar(positions, [rows[label]["reward_calls"] for label in labels], color="#e78ac3", width=0.6)
    axes[1].set_ylabel("reward items scored per answer")
    axes[1].set_title("Reward calls")
    for axis in axes:
        axis.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
    written.append(_save(fig, out / "cost.png"))

    if summary.get("frontier"):
        written += _plot_frontier(plt, summary, out)
    traced = [r for r in records if r.get("trace") and "threshold" in r["trace"][0]]
    if traced:  # the answer with the most proposals shows the mechanism best
        traced = max(traced, key=lambda r: len(r["trace"]))
        written.append(_plot_trace(plt, traced, out / "cards_trace.png"))
    return written


def _plot_frontier(plt, summary: dict, out: Path) -> list[Path]:
    """Reward (and judge) against decode tokens and against seconds per answer, a curve per method:
    every setting a marker, the line through those that beat every cheaper setting."""
    rows = summary["methods"]
    curves = summary["frontier"]["curves"]
    judged = any(rows[l]["judge"] for c in curves.values() for l in c["points"])
    written = []
    for cost, name, xlabel in (("decode_tokens", "frontier_tokens.png", "policy decode tokens per answer (log)"),
                               ("time_mean", "frontier_time.png", "seconds per answer (log)")):
        fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(13 if judged else 7.5, 5), squeeze=False)
        for axis, key in zip(axes[0], ("reward", "judge")):
            for curve, entry in curves.items():
                points = sorted((rows[l][cost], rows[l][key], l) for l in entry["points"] if rows[l][key])
                if not points:
                    continue
                xs = [p[0] for p in points]
                ys = [p[1][0] for p in points]
                errors = [0 if math.isnan(p[1][1]) else p[1][1] for p in points]
                style = dict(color="#333333") if curve == "bon" else {}
                drawn = axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, linestyle="none", label=curve,
                                      **style)
                best = [i for i, y in enumerate(ys) if all(y > earlier for earlier in ys[:i])]  # the Pareto front
                axis.plot([xs[i] for i in best], [ys[i] for i in best], color=drawn[0].get_color(),
                          linestyle="--" if curve == "bon" else "-")
                for x, y, (_, _, label) in zip(xs, ys, points):
                    tag = label.split(":", 1)[1] if ":" in label else label
                    axis.annotate(tag.replace("value=", "v="), (x, y), textcoords="offset points", xytext=(4, 4),
                                  fontsize=7)
            for target, level in summary["frontier"]["targets"].items():
                if key == "reward":
                    axis.axhline(level, color="#bbbbbb", linewidth=0.8, linestyle=":")
                    axis.annotate(target, (axis.get_xlim()[0], level), fontsize=7, color="#777777")
            axis.set_xscale("log")
            axis.set_xlabel(xlabel)
            axis.set_ylabel(f"mean {key} (95% CI)")
            axis.set_title(f"{key} against compute")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
        written.append(_save(fig, out / name))
    return written


def _plot_trace(plt, record: dict, path: Path) -> Path:
    trace = record["trace"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = list(range(1, len(trace) + 1))
    colours = ["#1b9e77" if e["accepted"] else "#d95f02" for e in trace]
    ax.scatter(xs, [e["reward"] for e in trace], c=colours, s=28, zorder=3)
    ax.step(xs, [e["threshold"] for e in trace], where="mid", color="#555555", label="threshold τ(t)")
    for x, entry in zip(xs, trace):
        if entry["attempt"] == 1 and x > 1:
            ax.axvline(x - 0.5, color="#bbbbbb", linewidth=0.8, zorder=1)
    ax.scatter([], [], c="#1b9e77", label="accepted segment")
    ax.scatter([], [], c="#d95f02", label="rejected proposal")
    ax.set_xlabel("proposal, in order (grey lines separate segments)")
    ax.set_ylabel("reward of prefix + proposal")
    ax.set_title(f"{record['method']} on prompt {record['id']}: proposals, rewards and threshold")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def compare(first: Path, second: Path) -> str:
    """A markdown table of what changed between two runs' summaries, method by method."""
    summaries = []
    for folder in (first, second):
        path = folder / "summary.json"
        if not path.is_file():
            raise DecalignError(f"{folder} has no summary.json; run decalign bench there first")
        summaries.append(json.loads(path.read_text()))
    a, b = (s["methods"] for s in summaries)
    lines = [f"{first} → {second}", "",
             "| method | reward Δ | judge Δ | win-tie Δ | time/answer ratio | decode tokens ratio | reward calls ratio |",
             "|---|---|---|---|---|---|---|"]

    def delta(x, y) -> str:
        return "—" if x is None or y is None else f"{y[0] - x[0]:+.3f}"

    def ratio(x, y) -> str:
        return f"{y / x:.2f}x" if x else "—"

    for label in [m for m in a if m in b]:
        lines.append(f"| {label} | {delta(a[label]['reward'], b[label]['reward'])} | "
                     f"{delta(a[label]['judge'], b[label]['judge'])} | "
                     f"{b[label]['win_tie']['win_tie'] - a[label]['win_tie']['win_tie']:+.0%} | "
                     f"{ratio(a[label]['time_mean'], b[label]['time_mean'])} | "
                     f"{ratio(a[label]['decode_tokens'], b[label]['decode_tokens'])} | "
                     f"{ratio(a[label]['reward_calls'], b[label]['reward_calls'])} |")
    only = sorted(set(a) ^ set(b))
    if only:
        lines += ["", f"in one run only: {', '.join(only)}"]
    return "\n".join(lines)
