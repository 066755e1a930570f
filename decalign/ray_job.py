"""`decalign generate --input --output --ray`: the resumable batch job of `batch_job.run_batch`, run on
Ray Data so that it scales from a laptop to a cluster.

The pending records become a Ray Dataset; `map_batches` sends them through a pool of actors, each
holding one loaded engine, and this process appends each answered record to the output as it streams
back. So the guarantees of the single-process job hold: ids already in the output are skipped, a
killed job loses only the batches in flight, and each record's seed derives from the job's seed and
its id, so it gets the same answer as in one process whichever replica and batch it lands in. An
actor that dies is restarted by Ray and its batch retried; a record is written only when its answer
comes back, so none is written twice.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from .batch_job import JOB_PATHS, answered_prompts, check_same_prompt, count_records, job_config
from .errors import DecalignError, first_line
from .models import check_loadable
from .records import append_record, check_job_config, held_output, load_output, read_records
from .request import Request
from .sampling import derive_seed


class Replica:
    """One engine in the actor pool: answers batches of records with the job's request."""

    def __init__(self, fields: dict, threads: int) -> None:
        import torch

        from .engine import get_engine

        torch.set_num_threads(max(1, threads))
        self.request = request = Request.build(**fields)  # loads the reward here, from its spec
        self.engine = get_engine(request.model, request.adapter, trust_remote_code=request.trust_remote_code)

    def __call__(self, batch: dict) -> dict:
        from .api import run
        from .batch_job import answered, check_prompt

        ids, prompts, seeds, errors = [], [], [], []
        for line, record_id, prompt, seed in zip(batch["line"], batch["id"], batch["prompt"], batch["seed"]):
            prompt = json.loads(prompt)
            try:
                check_prompt(self.engine, self.request, prompt)
            except DecalignError as exc:
                errors.append((int(line), str(exc)))
                continue
            ids.append(json.loads(record_id))
            prompts.append(prompt)
            seeds.append(int(seed))
        records = []
        if prompts:
            results = run(self.request.with_prompts(prompts, seeds, model=self.engine, adapter=None))
            records = [json.dumps(answered(i, p, r), ensure_ascii=False) for i, p, r in zip(ids, prompts, results)]
        # an answered record has line 0 and no error; a refused one its line and why
        return {"record": records + [""] * len(errors), "line": [0] * len(records) + [line for line, _ in errors],
                "error": [""] * len(records) + [message for _, message in errors]}


def _import_ray():
    """Ray, with Ray Data loaded, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise DecalignError("--ray needs Ray Data: pip install 'decalign[ray]'") from None
    return ray


def _check_ready(request: Request, address: str | None) -> None:
    """What would otherwise fail only once Ray runs, refused first in one line: a cluster address
    that is malformed or that nothing answers at (Ray would retry it for minutes), and a model the
    replicas could not load (each would fail with its own traceback)."""
    if address and address != "auto":
        host, colon, port = address.removeprefix("ray://").rpartition(":")
        if not (host and colon and port.isdigit()):
            raise DecalignError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise DecalignError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}") from None
    check_loadable(request.model, trust_remote_code=request.trust_remote_code)


def _start_ray(address: str | None, replicas: int):
    ray = _import_ray()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices would interleave with our progress bar
    warnings.filterwarnings("ignore", category=UserWarning, module="ray")  # e.g. fewer inputs than replicas
    if not ray.is_initialized():
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core's own stderr notices, likewise
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                                   "configure_logging": True}
        if address:
            options["address"] = address
        else:
            options["num_cpus"] = os.cpu_count() or replicas
        try:
            with _stderr_discarded():  # the core still announces the level it was given, in a line of its own
                ray.init(**options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = f" at {address}" if address else ""
            hint = (" (a cluster that asks for token authentication, as `ray start --head` does in Ray 2.60, "
                    "needs RAY_AUTH_MODE=token here too)") if address and isinstance(exc, ConnectionError) else ""
            raise DecalignError(f"cannot start or join Ray{where}: {first_line(exc)}{hint}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts written records
    context.print_on_execution_start = False
    return ray


@contextmanager
def _stderr_discarded() -> Iterator[None]:
    """This process's standard error (the file descriptor, which native code writes to) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _device_options() -> dict:
    """--device reaches replicas on other machines too; a replica on CUDA reserves a GPU."""
    device = os.environ.get("DECALIGN_DEVICE")
    if not device:
        return {}
    return {"runtime_env": {"env_vars": {"DECALIGN_DEVICE": device}}, "num_gpus": 1 if device.startswith("cuda") else 0}


def _portable(request: Request) -> dict:
    """The request's fields, to rebuild it in each replica: a reward given as a spec travels as the
    spec (not the loaded model), and the policy must be a name or path each replica can load."""
    if not (request.model is None or isinstance(request.model, str)):
        raise DecalignError("with --ray, give the model as a name or path (each replica loads its own)")
    fields = {name: getattr(request, name) for name in type(request).model_fields}
    cloudpickle = _import_ray().cloudpickle  # how Ray ships it
    try:
        cloudpickle.dumps(fields)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the request cannot travel
        raise DecalignError(f"with --ray, the request must travel to each replica, and it cannot: {type(exc).__name__}: "
                            f"{exc} (give the reward as a spec string, e.g. python:module:function)") from None
    return fields


def _pool_rows(items: list[dict], replica: type, kwargs: dict, *, replicas: int, address: str | None,
               batch_size: int) -> Iterator[dict]:
    """The rows `replica` actors return for `items`, in batches of `batch_size`, as they come back."""
    ray = _start_ray(address, replicas)
    cpus = max(1, int(ray.cluster_resources().get("CPU", replicas)) // replicas)
    dataset = ray.data.from_items(items).map_batches(
        replica, fn_constructor_kwargs={**kwargs, "threads": cpus}, batch_size=batch_size, concurrency=replicas,
        num_cpus=cpus, batch_format="numpy", **_device_options(),
    )  # Ray Data's actor pools restart a replica that dies and retry its batch (an exception is not retried)
    yield from dataset.iter_rows()


class SamplingReplica:
    """One engine and reward in the actor pool of `train-value --ray`: answers chunks of prompts with
    `values.sampling.sample_chunk`, so they are the records one process would write."""

    def __init__(self, model: str | None, adapter: str | None, reward: Any, options: dict, threads: int) -> None:
        import torch

        from .engine import get_engine
        from .rewards import load_reward

        torch.set_num_threads(max(1, threads))
        self.engine = get_engine(model, adapter)
        self.reward = load_reward(reward)
        self.options = options

    def __call__(self, batch: dict) -> dict:
        from .values.sampling import sample_chunk

        chunk = [(json.loads(i), json.loads(p)) for i, p in zip(batch["id"], batch["prompt"])]
        records = sample_chunk(self.engine, self.reward, chunk, **self.options)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def sample_on_ray(pending: list[tuple[Any, Any]], *, model: str | None, adapter: str | None, reward: Any, n: int,
                  max_new_tokens: int, temperature: float, top_k: int, seed: int, batch_size: int, replicas: int = 2,
                  address: str | None = None) -> Iterator[dict]:
    """`values.sampling.sample_answers`' records for (id, prompt) pairs, sampled on a Ray actor pool."""
    if replicas < 1:
        raise DecalignError(f"--replicas must be >= 1, got {replicas}")
    if not pending:
        return
    items = [{"id": json.dumps(i), "prompt": json.dumps(p)} for i, p in pending]
    options = {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    kwargs = {"model": model, "adapter": adapter, "reward": reward, "options": options}
    for row in _pool_rows(items, SamplingReplica, kwargs, replicas=replicas, address=address, batch_size=batch_size):
        yield json.loads(row["record"])


class BenchReplica:
    """One engine, the steering reward and the judge in the actor pool of `bench --ray`: answers
    batches of (method, id, prompt, seed) rows with `bench.answer_records`, so they are the records
    one process would write."""

    def __init__(self, jobs: dict, reward: str | None, judge: str | None, threads: int) -> None:
        import torch

        from .engine import get_engine
        from .rewards import load_reward

        torch.set_num_threads(max(1, threads))
        self.steer, self.judge = load_reward(reward), load_reward(judge) if judge else None
        self.jobs = {label: (params, Request.build(**{**fields, "reward": self.steer}))
                     for label, (params, fields) in jobs.items()}
        first = next(iter(self.jobs.values()))[1]
        self.engine = get_engine(first.model, first.adapter, trust_remote_code=first.trust_remote_code)

    def __call__(self, batch: dict) -> dict:
        from .bench import answer_records

        groups: dict[str, list] = {}  # a batch may hold the end of one method's rows and the start of the next's
        for label, record_id, prompt, seed in zip(batch["method"], batch["id"], batch["prompt"], batch["seed"]):
            groups.setdefault(str(label), []).append((json.loads(record_id), json.loads(prompt), int(seed)))
        records = []
        for label, chunk in groups.items():
            params, request = self.jobs[label]
            records += answer_records(label, params, request, chunk, self.engine, self.steer, self.judge)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def bench_on_ray(pending: dict[str, list[tuple[Any, Any, int]]], jobs: dict[str, tuple[dict, Request]], *,
                 reward: str | None, judge: str | None, batch_size: int | None, replicas: int = 2,
                 address: str | None = None) -> Iterator[dict]:
    """`bench`'s records for each method's pending (id, prompt, seed), answered on a Ray actor pool;
    the rewards travel as their specs and each replica loads its own."""
    if replicas < 1:
        raise DecalignError(f"--replicas must be >= 1, got {replicas}")
    items = [{"method": label, "id": json.dumps(i), "prompt": json.dumps(p), "seed": s}
             for label, rows in pending.items() for i, p, s in rows]
    if not items:
        return
    portable = {label: (params, {**_portable(request), "reward": reward}) for label, (params, request) in jobs.items()}
    _check_ready(next(iter(jobs.values()))[1], address)
    size = batch_size or max(map(len, pending.values()))  # default: a method's prompts all together, as in one process
    kwargs = {"jobs": portable, "reward": reward, "judge": judge}
    for row in _pool_rows(items, BenchReplica, kwargs, replicas=replicas, address=address, batch_size=size):
        yield json.loads(row["record"])


def run_batch_ray(input_path: str | Path, output_path: str | Path, request: Request, *, replicas: int = 2,
                  address: str | None = None) -> None:
    """Answer every record of `input_path` like `run_batch`, on `replicas` Ray actors (a local Ray by
    default, or the cluster at `address`); results are appended to `output_path` as they come back."""
    if replicas < 1:
        raise DecalignError(f"--replicas must be >= 1, got {replicas}")
    input_path, output_path = Path(input_path), Path(output_path)
    fields = _portable(request)  # a request the replicas cannot rebuild is refused first
    count_records(input_path)
    _check_ready(request, address)
    with held_output(output_path) as out:  # a second job on the same output is refused, not run twice
        done, written = load_output(output_path)
        check_job_config(output_path, job_config(input_path, request), written=bool(done), paths=JOB_PATHS)
        asked = answered_prompts(written)
        base_seed = random.randrange(2**62) if request.seed is None else request.seed
        items, malformed = [], None
        try:
            for number, record_id, prompt, _ in read_records(input_path):
                if record_id in done:
                    check_same_prompt(asked, record_id, prompt, f"{input_path} line {number}", output_path)
                else:
                    items.append({"line": number, "id": json.dumps(record_id), "prompt": json.dumps(prompt),
                                  "seed": derive_seed(base_seed, record_id)})
        except DecalignError as exc:  # the records before a malformed line are answered first
            malformed = exc
        bar = tqdm(total=len(done) + len(items), initial=len(done), unit="prompt", desc="generate", file=sys.stderr,
                   dynamic_ncols=True, disable=None)
        refused: list[tuple[int, str]] = []
        if items:
            for row in _pool_rows(items, Replica, {"fields": fields}, replicas=replicas, address=address,
                                  batch_size=request.batch_size):
                if row["error"]:
                    refused.append((int(row["line"]), str(row["error"])))
                else:
                    append_record(out, json.loads(row["record"]))
                bar.update(1)
        bar.close()
    if refused:
        line, message = min(refused)
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise DecalignError(f"{input_path} line {line}: {message}{more}")
    if malformed is not None:
        raise malformed
