"""`decalign serve`: the OpenAI-compatible server."""

from __future__ import annotations

import click

from ..errors import DecalignError
from ..logs import quiet_transformers
from ..models import DEFAULT_MODEL
from ..options import parse_options
from ..server.config import CHOICES, ServerConfig


@click.command()
@click.option("--model", default=None, help="Policy model [default: embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]PATH",
              help="PEFT LoRA adapter folder. PATH: the served model runs with it. NAME=PATH (repeatable): "
                   "served beside the model as NAME (a request's `model`; listed by /v1/models); rows of "
                   "every adapter share the running batch.")
@click.option("--method", "-m", default=None,
              help="Default method; requests may override [default: OpenAI's meaning: sample at the request's "
                   "temperature, greedy at temperature 0].")
@click.option("--reward", "-r", default=None, help="Default reward; requests may override.")
@click.option("--param", "-p", "params", multiple=True, metavar="NAME=VALUE", help="Default method parameter.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="DECALIGN_API_KEY", default=None, help="Require this bearer key [env DECALIGN_API_KEY].")
@click.option("--max-tokens-limit", default=ServerConfig.max_tokens_limit, show_default=True, type=int)
@click.option("--queue-size", default=ServerConfig.queue_size, show_default=True, type=int)
@click.option("--timeout", default=ServerConfig.timeout, show_default=True, type=float, help="Seconds per request.")
@click.option("--max-batch", default=ServerConfig.max_batch, show_default=True, type=int,
              help="Requests in the running batch (continuous batching: others wait in the queue).")
@click.option("--max-rows", default=ServerConfig.max_rows, show_default=True, type=int,
              help="No request joins the running batch while it has this many rows (candidates, particles).")
@click.option("--max-join-tokens", default=ServerConfig.max_join_tokens, show_default=True, type=int,
              help="Prompt tokens that may join the running batch at one step (at least one request joins); "
                   "a burst of requests joins over several steps instead of one long prefill.")
@click.option("--batching", type=click.Choice(CHOICES["batching"]), default=ServerConfig.batching,
              show_default=True,
              help="continuous: requests join the running batch at the next step. To compare against: static, "
                   "requests join only an idle engine (waves of any mix); grouped, waves of requests that ask "
                   "for the same decoding (the scheduler before continuous batching).")
@click.option("--admission", type=click.Choice(CHOICES["admission"]), default=ServerConfig.admission,
              show_default=True,
              help="Which waiting request joins first: shortest = fewest rows x tokens (a request overtaken "
                   "--max-batch times goes first); arrival = first come, first served.")
@click.option("--join", type=click.Choice(CHOICES["join"]), default=ServerConfig.join, show_default=True,
              help="How a request joins the running batch: in-step encodes its prompt in the next step's forward "
                   "pass, beside the running rows (fewer passes); own-pass encodes it at once in a pass of its "
                   "own, so its first token comes a step sooner (one more pass per join).")
@click.option("--shutdown-grace", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="On Ctrl-C or SIGTERM, seconds the requests in flight get to finish before they are "
                   "answered 503 (a second Ctrl-C answers them at once).")
@click.option("--allow-adapter-loading", is_flag=True,
              help="Let clients load and unload LoRA adapters by name at run time (POST /v1/load_lora_adapter "
                   "{lora_name, lora_path} and /v1/unload_lora_adapter {lora_name}, as vLLM's): the server then "
                   "reads folders its clients name, so keep --api-key set.")
@click.option("--trust-remote-code", is_flag=True)
def serve(model, adapters, method, reward, params, host, port, api_key, max_tokens_limit, queue_size, timeout,
          max_batch, max_rows, max_join_tokens, batching, admission, join, shutdown_grace, allow_adapter_loading,
          trust_remote_code):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions) that aligns as it decodes."""
    from ..engine import get_engine
    from ..memory import bound_kernel_cache, freeze_long_lived
    from ..methods import make_config
    from ..server import create_app, shared_reward
    from ..server.shutdown import serve_app

    bound_kernel_cache()  # before any model runs: a long-lived server's memory returns to its start

    method_params = parse_options(params, what="--param", example="--param NAME=VALUE", strip=True)
    if method is not None:
        make_config(method, method_params)  # the server's defaults fail now, not on every request
    elif method_params:
        raise DecalignError("--param sets the default method's parameters: name the method with --method")
    config = ServerConfig(model_name=model or DEFAULT_MODEL, method=method, reward=reward,
                          method_params=method_params, api_key=api_key, max_tokens_limit=max_tokens_limit,
                          queue_size=queue_size, timeout=timeout, max_batch=max_batch,
                          max_rows=max_rows, max_join_tokens=max_join_tokens, batching=batching,
                          admission=admission, join=join, allow_adapter_loading=allow_adapter_loading)
    if reward is not None:
        shared_reward(reward)  # loaded once, before the first request
    quiet_transformers()
    adapter, named = split_adapters(adapters)
    if config.model_name in named:
        raise DecalignError(f"--adapter {config.model_name}=...: the name is the served model's; choose another")
    engine = get_engine(model, adapter, trust_remote_code=trust_remote_code, adapters=named)
    default = method or "sample, greedy at temperature 0"
    app = create_app(engine, config)
    freeze_long_lived()  # the server's own objects: no garbage collection pass rescans them
    served = "".join(f", adapter {name}" for name in named)
    click.echo(f"decalign serving {config.model_name}{served} on http://{host}:{port}/v1 (method {default})", err=True)
    serve_app(app, host=host, port=port, grace=shutdown_grace)


def split_adapters(values: tuple[str, ...]) -> tuple[str | None, dict[str, str]]:
    """`--adapter` values as (the folder the served model runs with, {name: folder} served beside it)."""
    unnamed, named = [], {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or "/" in name or not name:  # a plain folder (one may hold "=" after a slash)
            unnamed.append(value)
        elif not folder:
            raise DecalignError(f"--adapter {value}: give the folder after {name}=")
        elif name in named:
            raise DecalignError(f"--adapter {name}=...: the name is given twice")
        else:
            named[name] = folder
    if len(unnamed) > 1:
        raise DecalignError("--adapter: one folder without a name (the served model's own); name the others "
                            "NAME=PATH")
    return (unnamed[0] if unnamed else None), named
