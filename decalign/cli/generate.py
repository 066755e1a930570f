"""`decalign generate`, `decalign score` and `decalign methods`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import DecalignError
from ..logs import quiet_transformers
from ..options import parse_options


@click.command()
@click.argument("prompt", required=False)
@click.option("--method", "-m", default="greedy", show_default=True, help="Decoding method (see `decalign methods`).")
@click.option("--model", default=None, help="HF model id or local folder [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", default=None, help="PEFT LoRA adapter folder.")
@click.option("--reward", "-r", default=None, help="Reward spec, e.g. sentiment or python:module:function.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--min-new-tokens", default=0, show_default=True, type=int,
              help="No end-of-text, and no --stop string matched, before this many tokens.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (sampling methods).")
@click.option("--top-k", type=int, default=None, help="Top-k filter (sampling methods; 0 = off).")
@click.option("--top-p", type=float, default=None, help="Nucleus filter (sampling methods; 1 = off).")
@click.option("--n", type=int, default=None, help="Candidates per prompt (bon).")
@click.option("--cold-alpha", type=float, default=None,
              help="CoLD plausibility mask alpha in (0, 1] (param alpha of cold, contrastive, dexperts).")
@click.option("--cold-beta", type=float, default=None,
              help="CoLD contrast strength beta >= 0 (param beta of cold, contrastive, dexperts).")
@click.option("--param", "-p", "params", multiple=True, metavar="NAME=VALUE",
              help="Any method parameter; repeatable (`decalign methods -v` lists each with its help).")
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
@click.option("--ray", "use_ray", is_flag=True,
              help="With --input: run the job on Ray Data, an actor pool of engines (pip install 'decalign[ray]').")
@click.option("--replicas", default=2, show_default=True, type=int, help="With --ray: engines in the actor pool.")
@click.option("--ray-address", default=None, help="With --ray: an existing cluster [default: start a local one].")
def generate(prompt, method, model, adapter, reward, max_new_tokens, min_new_tokens, temperature, top_k, top_p, n,
             cold_alpha, cold_beta, params, seed, system, stop, raw, as_json, input_path, output_path, batch_size,
             trust_remote_code, use_ray, replicas, ray_address):
    """Answer PROMPT (or every record of --input) with an aligned decoding method."""
    from .. import api
    from ..batch_job import run_batch
    from ..methods import get_method
    from ..methods.contrast import ContrastParams
    from ..request import Request

    method_params: dict[str, Any] = parse_options(params, what="--param", example="--param NAME=VALUE", strip=True)
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("n", n),
                        ("alpha", cold_alpha), ("beta", cold_beta)):
        if value is not None:
            option = {"alpha": "--cold-alpha", "beta": "--cold-beta"}.get(name, f"--{name.replace('_', '-')}")
            if option.startswith("--cold") and not issubclass(get_method(method).config, ContrastParams):
                # cards' alpha, spec_rejection's alpha, rs' beta... mean something else
                raise DecalignError(f"{option} is the contrastive methods' {name} (cold, contrastive, dexperts); "
                                    f"method {method}'s {name} means something else: give --param {name}=VALUE")
            if name in method_params and not _same_number(method_params[name], value):
                raise DecalignError(f"{option} {value} and --param {name}={method_params[name]} disagree; give one")
            method_params[name] = value
    if (prompt is None) == (input_path is None):
        raise DecalignError("give either a PROMPT or --input FILE")
    if input_path is None and output_path is not None:
        raise DecalignError("--output goes with --input")
    request = Request.from_options(method=method, params=method_params, model=model, adapter=adapter, reward=reward,
                                   max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed,
                                   system=system, stop=list(stop), chat=False if raw else None,
                                   batch_size=batch_size, trust_remote_code=trust_remote_code)
    quiet_transformers()
    if input_path is not None:
        if output_path is None:
            raise DecalignError("--input needs --output (results are appended there as they finish)")
        if use_ray:
            from ..ray_job import run_batch_ray

            run_batch_ray(Path(input_path), Path(output_path), request, replicas=replicas, address=ray_address)
        else:
            run_batch(Path(input_path), Path(output_path), request)
        return
    if use_ray:
        raise DecalignError("--ray goes with --input (a batch job)")
    result = api.run(request.with_prompts(prompt, seed))[0]
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    click.echo(result.text)
    stats = result.stats
    summary = f"[{method} · {len(result.tokens)} tokens · {stats['wall_time']:.1f} s"
    if result.reward is not None:
        summary += f" · reward {result.reward:.3f}"
    click.echo(summary + f" · finish {result.finish_reason}]", err=True)


@click.command()
@click.argument("input_path", metavar="FILE.jsonl", type=click.Path(dir_okay=False))
@click.option("--reward", "-r", required=True, help="Reward spec, e.g. harmless, sentiment, hf:PATH, 'a + 0.5*b'.")
@click.option("--output", "-o", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL to append {id, score, reward, scored} to (scored: a digest of what was scored); a rerun resumes.")
@click.option("--batch-size", default=32, show_default=True, type=int)
def score(input_path, reward, output_path, batch_size):
    """Score {id?, prompt or messages, response} records with a reward, writing as it goes."""
    from ..batch_job import run_score

    quiet_transformers()
    run_score(Path(input_path), Path(output_path), reward, batch_size)


@click.command()
@click.option("--verbose", "-v", is_flag=True, help="Also each parameter's type and help text.")
def methods(verbose: bool) -> None:
    """List the decoding methods and their parameters."""
    from ..methods import METHODS

    for name in sorted(METHODS):
        spec = METHODS[name]
        params = ", ".join(f"{k}={v}" for k, v in spec.parameters().items()) or "no parameters"
        needs = " (needs --reward)" if spec.needs_reward else ""
        click.echo(f"{name:10s} {spec.summary}{needs}\n{'':10s} {params}")
        if verbose:
            for param, about in spec.describe().items():
                click.echo(f"{'':12s}{param} ({about['type']}, default {about['default']}): {about['help']}")


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == float(value)
    except ValueError:
        return False
