"""Resumable JSONL jobs: answer every record of a file (`decalign generate --input/--output`) or score
every answer of a file (`decalign score`). Results are appended as each batch finishes, and a rerun
skips the ids already in the output, so an interrupted job resumes where it stopped."""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from .api import run
from .engine import get_engine
from .errors import DecalignError
from .records import (FINGERPRINT, append_record, changed_since, check_job_config, count_lines, digest, held_output,
                      load_output, read_records, response_of)
from .request import Request
from .rewards import load_reward
from .sampling import derive_seed


def check_prompt(engine, request: Request, prompt: Any) -> None:
    """Refuse a prompt the engine cannot render, or one that fills the model's context."""
    engine.check_fits(engine.render(prompt, system=request.system, chat=request.chat))


def answered(record_id: Any, prompt: Any, result) -> dict:
    """The output record of one answered prompt: {id, prompt | messages, **result}."""
    return {"id": record_id, "prompt" if isinstance(prompt, str) else "messages": prompt, **result.to_dict()}


def count_records(input_path: Path, what: str = "prompts") -> int:
    """The input's records (blank lines aside); an input file that holds none is refused, naming
    `what` it should hold."""
    total = count_lines(input_path)
    if total == 0 and input_path.is_file():
        raise DecalignError(f"{input_path} holds no {what}")
    return total


def answered_prompts(written: list[dict]) -> dict:
    """Each answered id's prompt, as its output record holds it."""
    return {record["id"]: record.get("prompt", record.get("messages")) for record in written}


def check_same_prompt(asked: dict, record_id: Any, prompt: Any, where: str, output_path: Path) -> None:
    """Refuse to skip an id as done when its prompt changed since it was answered (an input edited
    under the same path), instead of leaving the old answer as this prompt's."""
    if asked[record_id] != prompt:
        raise DecalignError(f"{where}: id {record_id!r} was answered in {output_path} for another prompt; "
                            "use a new output file")


def job_config(input_path: Path, request: Request) -> dict:
    """What a `generate --input` job's answers depend on: a rerun into the same output must ask the same."""
    model = request.model if request.model is None or isinstance(request.model, str) else getattr(request.model, "name", "")
    return {"input": str(input_path), "model": model, "adapter": request.adapter, "method": request.method,
            "params": request.params, "reward": request.scorer.name if request.scorer is not None else None,
            "reward" + FINGERPRINT: request.scorer.fingerprint() if request.scorer is not None else None,
            "value": request.value, "max_new_tokens": request.max_new_tokens, "min_new_tokens": request.min_new_tokens,
            "seed": request.seed, "system": request.system, "chat": request.chat, "stop": request.stop}


JOB_PATHS = ("input", "model", "adapter")  # compared resolved, however they are spelled


def run_batch(input_path: str | Path, output_path: str | Path, request: Request) -> None:
    """Answer every {id?, prompt} or {id?, messages} record of `input_path` with the decoding of
    `request` (a validated Request without prompts), appending {id, prompt | messages, **result} to
    `output_path` batch by batch; ids already there are skipped. Each record's seed derives from the
    request's seed and the record's id, so an answer does not depend on the batch it landed in."""
    input_path, output_path = Path(input_path), Path(output_path)
    total = count_records(input_path)
    with held_output(output_path) as out:  # a second job on the same output is refused, not run twice
        done, written = load_output(output_path)
        asked = answered_prompts(written)
        check_job_config(output_path, job_config(input_path, request), written=bool(done), paths=JOB_PATHS)
        base_seed = random.randrange(2**62) if request.seed is None else request.seed
        engine = get_engine(request.model, request.adapter, trust_remote_code=request.trust_remote_code)
        pending: list[tuple[Any, Any]] = []
        bar = tqdm(total=total, unit="prompt", desc="generate", file=sys.stderr, dynamic_ncols=True,
                   disable=None)  # shown on a terminal, silent in logs

        def flush(out) -> None:
            batch, pending[:] = list(pending), []  # taken: a batch that fails is not run again
            if not batch:
                return
            prompts = [prompt for _, prompt in batch]
            seeds = [derive_seed(base_seed, record_id) for record_id, _ in batch]
            for (record_id, prompt), result in zip(batch, run(request.with_prompts(prompts, seeds, model=engine,
                                                                                   adapter=None))):
                append_record(out, answered(record_id, prompt, result))
                bar.update(1)

        with _flushed_at_the_end(lambda: flush(out), bar):
            for number, record_id, prompt, _ in read_records(input_path):
                if record_id in done:
                    check_same_prompt(asked, record_id, prompt, f"{input_path} line {number}", output_path)
                    bar.update(1)
                    continue
                try:
                    check_prompt(engine, request, prompt)
                except DecalignError as exc:
                    raise DecalignError(f"{input_path} line {number}: {exc}") from None
                pending.append((record_id, prompt))
                if len(pending) >= request.batch_size:
                    flush(out)


def run_score(input_path: str | Path, output_path: str | Path, reward: str, batch_size: int = 32) -> None:
    """Score the {id?, prompt | messages, response} records of `input_path` with the reward spec
    `reward`, appending {id, score, reward} to `output_path` batch by batch; ids already there are skipped."""
    if batch_size < 1:
        raise DecalignError(f"--batch-size must be >= 1, got {batch_size}")
    scorer = load_reward(reward)
    source, output = Path(input_path), Path(output_path)
    total = count_records(source, "records to score")
    with held_output(output) as out:
        done, written = load_output(output)
        scored = {record["id"]: record.get("scored") for record in written}  # digests of what was scored
        config = {"input": str(source), "reward": scorer.name, "reward" + FINGERPRINT: scorer.fingerprint()}
        check_job_config(output, config, written=bool(done), paths=("input",))
        pending: list[tuple[Any, Any, str]] = []
        bar = tqdm(total=total, unit="item", desc="score", file=sys.stderr, disable=None)

        def flush(out) -> None:
            batch, pending[:] = list(pending), []  # taken: a batch that fails is not scored again
            if batch:
                values = scorer.score([p for _, p, _ in batch], [r for _, _, r in batch])
                for (record_id, prompt, response), value in zip(batch, values):
                    append_record(out, {"id": record_id, "score": value, "reward": scorer.name,
                                        "scored": digest(prompt, response)})
                bar.update(len(batch))

        with _flushed_at_the_end(lambda: flush(out), bar):
            for number, record_id, prompt, record in read_records(source, with_response=True):
                if record_id in done:  # skipped as scored, unless the record under its id changed since
                    if changed_since(scored[record_id], prompt, response_of(record)):
                        raise DecalignError(f"{source} line {number}: id {record_id!r} was scored in {output} for "
                                            "another prompt or response; use a new output file")
                    bar.update(1)
                    continue
                pending.append((record_id, prompt, response_of(record)))
                if len(pending) >= batch_size:
                    flush(out)


@contextmanager
def _flushed_at_the_end(flush: Callable[[], None], bar: tqdm) -> Iterator[None]:
    """Run the last batch when the records end, or when a bad record stops the job (the records
    before it are finished and written). Ctrl-C or a failing batch stops at once: the unfinished
    batch is dropped, and a rerun resumes after the last record written."""
    try:
        yield
    except DecalignError:
        flush()
        raise
    else:
        flush()
    finally:
        bar.close()
