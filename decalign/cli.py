"""The `decalign` command: a thin shell over the library. Errors are one line, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import DecalignError
from .records import append_record, count_lines, load_output, read_records

EXIT_USER_ERROR = 2


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DecalignError(f"--param needs NAME=VALUE, got {pair!r}")
        params[key.strip()] = value.strip()
    return params


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decalign")
def cli() -> None:
    """decalign: steer what a language model writes at decoding time."""


@cli.command()
@click.argument("prompt", required=False)
@click.option("--method", "-m", default="greedy", show_default=True, help="Decoding method (see `decalign methods`).")
@click.option("--model", default=None, help="HF model id or local folder [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", default=None, help="PEFT LoRA adapter folder.")
@click.option("--reward", "-r", default=None, help="Reward spec, e.g. sentiment or python:module:function.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--min-new-tokens", default=0, show_default=True, type=int)
@click.option("--temperature", type=float, default=None, help="Sampling temperature (sampling methods).")
@click.option("--top-k", type=int, default=None, help="Top-k filter (sampling methods; 0 = off).")
@click.option("--top-p", type=float, default=None, help="Nucleus filter (sampling methods; 1 = off).")
@click.option("--n", type=int, default=None, help="Candidates per prompt (bon).")
@click.option("--cold-alpha", type=float, default=None, help="CoLD plausibility mask alpha in (0, 1] (param alpha).")
@click.option("--cold-beta", type=float, default=None, help="CoLD contrast strength beta >= 0 (param beta).")
@click.option("--param", "-p", "params", multiple=True, metavar="NAME=VALUE", help="Any method parameter; repeatable.")
@click.option("--seed", type=int, default=None, help="Same seed, same output.")
@click.option("--system", default=None, help="System message (chat models).")
@click.option("--stop", multiple=True, help="Stop string; repeatable.")
@click.option("--raw", is_flag=True, help="Encode the prompt as raw text, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None,
              help="JSONL of {id?, prompt} or {id?, messages} records.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), default=None,
              help="JSONL to append results to (with --input); a rerun resumes.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Prompts decoded together.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code (off by default).")
def generate(prompt, method, model, adapter, reward, max_new_tokens, min_new_tokens, temperature, top_k, top_p, n,
             cold_alpha, cold_beta, params, seed, system, stop, raw, as_json, input_path, output_path, batch_size,
             trust_remote_code):
    """Answer PROMPT (or every record of --input) with an aligned decoding method."""
    method_params: dict[str, Any] = _parse_params(params)
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("n", n),
                        ("alpha", cold_alpha), ("beta", cold_beta)):
        if value is not None:
            method_params[name] = value
    options = dict(method=method, model=model, adapter=adapter, reward=reward, max_new_tokens=max_new_tokens,
                   min_new_tokens=min_new_tokens, system=system, stop=stop, chat=False if raw else None,
                   batch_size=batch_size, trust_remote_code=trust_remote_code, **method_params)
    if (prompt is None) == (input_path is None):
        raise DecalignError("give either a PROMPT or --input FILE")
    if input_path is None and output_path is not None:
        raise DecalignError("--output goes with --input")
    _validate_options(options)
    _quiet_transformers()
    if input_path is not None:
        if output_path is None:
            raise DecalignError("--input needs --output (results are appended there as they finish)")
        _run_batch(Path(input_path), Path(output_path), seed, options)
        return
    from .api import generate as run

    result = run(prompt, seed=seed, **options)[0]
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    click.echo(result.text)
    stats = result.stats
    summary = f"[{method} · {len(result.tokens)} tokens · {stats['wall_time']:.1f} s"
    if result.reward is not None:
        summary += f" · reward {result.reward:.3f}"
    click.echo(summary + f" · finish {result.finish_reason}]", err=True)


def _validate_options(options: dict[str, Any]) -> None:
    """Check what can be checked before a model is loaded, so bad input fails in a second."""
    from .methods import get_method, make_config, missing_adapter
    from .rewards import load_reward

    known = {"method", "model", "adapter", "reward", "max_new_tokens", "min_new_tokens", "system", "stop",
             "chat", "batch_size", "trust_remote_code"}
    spec = get_method(options["method"])
    make_config(spec.name, {k: v for k, v in options.items() if k not in known})
    if options["max_new_tokens"] < 1:
        raise DecalignError(f"--max-new-tokens must be >= 1, got {options['max_new_tokens']}")
    if options["batch_size"] < 1:
        raise DecalignError(f"--batch-size must be >= 1, got {options['batch_size']}")
    if options["reward"] is not None:
        options["reward"] = load_reward(options["reward"])
    elif spec.needs_reward:
        raise DecalignError(f"method {spec.name} needs a reward (--reward), e.g. --reward sentiment")
    if spec.needs_adapter and options["adapter"] is None:
        raise missing_adapter(spec.name)
    if options["model"] is not None:
        from .models import resolve_model_path

        resolve_model_path(options["model"])


def _run_batch(input_path: Path, output_path: Path, seed: int | None, options: dict[str, Any]) -> None:
    import random

    from tqdm import tqdm

    from .api import generate as run
    from .api import get_engine
    from .sampling import derive_seed

    done, _ = load_output(output_path)
    total = count_lines(input_path)
    base_seed = random.randrange(2**62) if seed is None else seed
    engine = get_engine(options["model"], options["adapter"], trust_remote_code=options["trust_remote_code"])
    options = {**options, "model": engine, "adapter": None}
    pending: list[tuple[Any, Any]] = []
    bar = tqdm(total=total, unit="prompt", desc="generate", file=sys.stderr, dynamic_ncols=True,
               disable=None)  # shown on a terminal, silent in logs

    def flush(out) -> None:
        if not pending:
            return
        prompts = [prompt for _, prompt in pending]
        seeds = [derive_seed(base_seed, record_id) for record_id, _ in pending]
        for (record_id, prompt), result in zip(pending, run(prompts, seed=seeds, **options)):
            key = "prompt" if isinstance(prompt, str) else "messages"
            append_record(out, {"id": record_id, key: prompt, **result.to_dict()})
            bar.update(1)
        pending.clear()

    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("a", encoding="utf-8") as out:
        try:
            for number, record_id, prompt, _ in read_records(input_path):
                if record_id in done:
                    bar.update(1)
                    continue
                try:
                    length = len(engine.render(prompt, system=options["system"], chat=options["chat"]))
                except DecalignError as exc:
                    raise DecalignError(f"{input_path} line {number}: {exc}") from None
                if engine.context_length and length >= engine.context_length:
                    raise DecalignError(f"{input_path} line {number}: the prompt has {length} tokens; "
                                        f"the model's context is {engine.context_length}")
                pending.append((record_id, prompt))
                if len(pending) >= options["batch_size"]:
                    flush(out)
        finally:
            flush(out)  # records before a bad line are finished and written
            bar.close()


@cli.command()
@click.argument("input_path", metavar="FILE.jsonl", type=click.Path(dir_okay=False))
@click.option("--reward", "-r", required=True, help="Reward spec, e.g. harmless, sentiment, hf:PATH, 'a + 0.5*b'.")
@click.option("--output", "-o", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL to append {id, score, reward} to; a rerun resumes.")
@click.option("--batch-size", default=32, show_default=True, type=int)
def score(input_path, reward, output_path, batch_size):
    """Score {id?, prompt or messages, response} records with a reward, writing as it goes."""
    from tqdm import tqdm

    from .rewards import load_reward

    if batch_size < 1:
        raise DecalignError(f"--batch-size must be >= 1, got {batch_size}")
    _quiet_transformers()
    scorer = load_reward(reward)
    source, output = Path(input_path), Path(output_path)
    done, _ = load_output(output)
    total = count_lines(source)
    pending: list[tuple[Any, Any, str]] = []
    bar = tqdm(total=total, unit="item", desc="score", file=sys.stderr, disable=None)

    def flush(out) -> None:
        if pending:
            values = scorer.score([p for _, p, _ in pending], [r for _, _, r in pending])
            for (record_id, _, _), value in zip(pending, values):
                append_record(out, {"id": record_id, "score": value, "reward": scorer.name})
            bar.update(len(pending))
            pending.clear()

    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as out:
        try:
            for _, record_id, prompt, record in read_records(source, with_response=True):
                if record_id in done:
                    bar.update(1)
                    continue
                pending.append((record_id, prompt, record["response"]))
                if len(pending) >= batch_size:
                    flush(out)
        finally:
            flush(out)
            bar.close()


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
        click.option("--temperature", type=float, default=0.7, show_default=True,
                     help="Sampling temperature of the answers (CARDS proposes at 0.7)."),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts sampled together."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@cli.command("train-value")
@click.argument("prompts", metavar="PROMPTS.jsonl", type=click.Path(dir_okay=False))
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for value.safetensors and value.json (samples.jsonl is kept there: a rerun resumes).")
@_sample_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--validation", type=float, default=0.2, show_default=True, help="Fraction of prompts held out.")
def train_value(prompts, out, reward, model, adapter, exclude, limit, offset, n, max_new_tokens, temperature, top_k,
                batch_size, seed, validation):
    """Distil a reward into a prefix value on the policy's own hidden states (use as value=PATH)."""
    from .values.train import train_value as train

    _quiet_transformers()
    head = train(prompts=Path(prompts), reward_spec=reward, out=Path(out), model=model, adapter=adapter,
                 exclude=Path(exclude) if exclude else None, limit=limit, offset=offset, n=n,
                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                 validation=validation, batch_size=batch_size, log=lambda line: click.echo(line, err=True))
    figures = head.card["validation"]
    rows = ", ".join(f"{k} tok {v['correlation']:.2f} (drift {v['drift_sd']:+.2f} sd)"
                     for k, v in figures["by_length"].items())
    click.echo(f"value written to {out}: layers {head.layers}, penalty {figures['penalty']:g}; validation "
               f"within-prompt correlation {rows}")


@cli.command("value-check")
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
    from .values.check import check_values

    _quiet_transformers()
    click.echo(check_values(prompts=Path(prompts), reward_spec=reward, out=Path(out), values=values,
                            scorers=scorers, model=model, adapter=adapter, exclude=Path(exclude) if exclude else None,
                            limit=limit, offset=offset, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, seed=seed, batch_size=batch_size))


@cli.command()
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
def bench(methods_, prompts, reward, judge, model, adapter, max_new_tokens, out, limit, offset, frontier, batch_size,
          seed, baseline, system, compare):
    """Methods side by side: reward, judge, win-tie and cost, as tables and plots."""
    from .bench import compare as compare_runs
    from .bench import run_bench, summary_markdown

    if compare:
        click.echo(compare_runs(Path(compare[0]), Path(compare[1])))
        return
    missing = [flag for flag, value in (("--methods", methods_), ("--prompts", prompts), ("--out", out)) if not value]
    if missing:
        raise DecalignError(f"decalign bench needs {', '.join(missing)} (or --compare DIR1 DIR2)")
    _quiet_transformers()
    summary = run_bench(methods=methods_, prompts=Path(prompts), out=Path(out), reward=reward, judge=judge,
                        model=model, adapter=adapter, max_new_tokens=max_new_tokens, limit=limit, offset=offset,
                        frontier=frontier, batch_size=batch_size, seed=seed, baseline=baseline, system=system,
                        progress=sys.stderr.isatty())
    click.echo(summary_markdown(summary))
    click.echo(f"\nrecords, summary and plots in {out}", err=True)


@cli.command()
@click.option("--model", default=None, help="Policy model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", default=None, help="PEFT LoRA adapter folder.")
@click.option("--method", "-m", default="greedy", show_default=True, help="Default method; requests may override.")
@click.option("--reward", "-r", default=None, help="Default reward; requests may override.")
@click.option("--param", "-p", "params", multiple=True, metavar="NAME=VALUE", help="Default method parameter.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="DECALIGN_API_KEY", default=None, help="Require this bearer key [env DECALIGN_API_KEY].")
@click.option("--max-tokens-limit", default=512, show_default=True, type=int)
@click.option("--queue-size", default=64, show_default=True, type=int)
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds per request.")
@click.option("--max-batch", default=16, show_default=True, type=int, help="Requests decoded together.")
@click.option("--trust-remote-code", is_flag=True)
def serve(model, adapter, method, reward, params, host, port, api_key, max_tokens_limit, queue_size, timeout,
          max_batch, trust_remote_code):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions) that aligns as it decodes."""
    import uvicorn

    from .api import get_engine
    from .methods import get_method, make_config
    from .models import DEFAULT_MODEL
    from .rewards import load_reward
    from .server import ServerConfig, create_app

    method_params = _parse_params(params)
    make_config(get_method(method).name, method_params)
    if reward is not None:
        load_reward(reward)
    for name, value in (("--max-tokens-limit", max_tokens_limit), ("--queue-size", queue_size),
                        ("--max-batch", max_batch)):
        if value < 1:
            raise DecalignError(f"{name} must be >= 1, got {value}")
    _quiet_transformers()
    engine = get_engine(model, adapter, trust_remote_code=trust_remote_code)
    config = ServerConfig(model_name=model or DEFAULT_MODEL, method=method, reward=reward,
                          method_params=method_params, api_key=api_key, max_tokens_limit=max_tokens_limit,
                          queue_size=queue_size, timeout=timeout, max_batch=max_batch)
    click.echo(f"decalign serving {config.model_name} on http://{host}:{port}/v1 (method {method})", err=True)
    uvicorn.run(create_app(engine, config), host=host, port=port, log_level="warning")


@cli.command("train-reward")
@click.argument("pairs", metavar="PAIRS.jsonl", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the trained head.")
@click.option("--holdout", default=0.2, show_default=True, type=float, help="Share of pairs kept aside to test on.")
@click.option("--seed", default=0, show_default=True, type=int)
def train_reward(pairs, output, holdout, seed):
    """Train a harmlessness-style reward head on {messages, chosen, rejected} pairs (use it as harmless:PATH)."""
    from .rewards.harmless import train_reward as train

    if not 0 < holdout < 1:
        raise DecalignError(f"--holdout must be between 0 and 1, got {holdout}")
    _quiet_transformers()
    report = train(pairs, output, holdout=holdout, seed=seed, progress=sys.stderr.isatty())
    click.echo(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2))
    click.echo(f"held-out pairwise accuracy {report['heldout_accuracy']:.3f} on {report['heldout_pairs']} pairs; "
               f"head and model card in {output}", err=True)


@cli.command()
def methods() -> None:
    """List the decoding methods and their parameters."""
    from .methods import METHODS

    for name in sorted(METHODS):
        spec = METHODS[name]
        params = ", ".join(f"{k}={v}" for k, v in spec.parameters().items()) or "no parameters"
        needs = " (needs --reward)" if spec.needs_reward else ""
        click.echo(f"{name:10s} {spec.summary}{needs}\n{'':10s} {params}")


@cli.command("bench-engine")
@click.option("--model", default=None, help="Model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--batch-sizes", default="1,4,16", show_default=True)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="torch threads [default: all cores].")
def bench_engine(model, batch_sizes, new_tokens, repeats, threads):
    """Tokens per second of the engine against transformers' generate, side by side."""
    from .bench_engine import run_bench

    _quiet_transformers()
    sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    click.echo(run_bench(model=model, batch_sizes=sizes, new_tokens=new_tokens, repeats=repeats, threads=threads))


from .lora import train_lora_command  # noqa: E402
cli.add_command(train_lora_command)
cli.add_command(__import__("decalign.bench_cold", fromlist=["x"]).bench_cold_command)
cli.add_command(__import__("decalign.tasks", fromlist=["x"]).make_task_command)
cli.add_command(__import__("decalign.eval_task", fromlist=["x"]).eval_task_command)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DecalignError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # never a traceback to a user; DECALIGN_DEBUG=1 shows it
        if os.environ.get("DECALIGN_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: unexpected {type(exc).__name__}: {message} (DECALIGN_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
