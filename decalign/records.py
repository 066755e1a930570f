"""JSONL in and out for batch jobs: prompt records with line-numbered errors, and resumable output."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import torch
import transformers

from . import __version__
from .errors import DecalignError

FINGERPRINT = "_fingerprint"  # config keys of a reward's `fingerprint`: compared within float noise

try:
    import fcntl
except ImportError:  # not on Windows: jobs there do not guard their output
    fcntl = None


def prompt_key(prompt: Any) -> str:
    """The first user turn, stripped: how prompts are matched across files (--exclude, and the prompt splits of training)."""
    if isinstance(prompt, str):
        return prompt.strip()
    for message in prompt:
        if message.get("role") == "user":
            return str(message.get("content", "")).strip()
    return str(prompt[0].get("content", "")).strip()


def json_objects(path: Path, what: str = "input file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object raises, naming it."""
    if not path.is_file():
        raise DecalignError(f"{what} {path} does not exist")
    with path.open("rb") as handle:  # decoded line by line, so a bad byte is reported with its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecalignError(f"{path} line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                    f"column {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DecalignError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DecalignError(f"{path} line {number}: expected a JSON object")
            yield number, record


def read_records(path: Path, *, with_response: bool = False) -> Iterator[tuple[int, Any, Any, dict]]:
    """(line number, id, prompt, record) per record of {id?, prompt | messages[, response | text]}.

    A record without an id gets its line number. A malformed line raises, naming it, when the
    reader reaches it, so a job can first finish and write the records before it."""
    seen: set = set()
    for number, record in json_objects(path):
        if "messages" in record and not isinstance(record["messages"], list):
            raise DecalignError(f"{path} line {number}: \"messages\" must be a list of chat messages")
        prompt = record.get("messages", record.get("prompt"))
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DecalignError(f"{path} line {number}: needs a non-empty \"prompt\" string or \"messages\" list")
        record_id = record.get("id", number)
        if not isinstance(record_id, (str, int)) or record_id in seen:
            raise DecalignError(f"{path} line {number}: id {record_id!r} is not a unique string or integer")
        if with_response and not isinstance(response_of(record), str):
            raise DecalignError(f"{path} line {number}: needs a \"response\" string (or the \"text\" of "
                                "`decalign generate --output`)")
        seen.add(record_id)
        yield number, record_id, prompt, record


def response_of(record: dict) -> Any:
    """The answer a record holds: its "response", else the "text" that `generate --output` writes,
    so that generate's output can be scored as it is."""
    return record["response"] if "response" in record else record.get("text")


def count_lines(path: Path) -> int:
    """Non-blank lines (read as bytes: a line that is not UTF-8 is reported when a reader reaches it)."""
    if not path.is_file():
        return 0
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def load_output(path: Path, key: Callable[[dict], Any] = lambda record: record["id"]) -> tuple[set, list[dict]]:
    """Keys and records already written to an output JSONL. A half-written last line (from a killed
    run) is cut off so that appending continues cleanly, but only after every line before it proved a
    record: a file decalign did not write is refused untouched. Lines end at "\n" only (records may
    hold U+2028 and the like, which `str.splitlines` would split)."""
    if not path.exists():
        return set(), []
    *lines, tail = path.read_bytes().split(b"\n")
    records = [_record(path, number, line, key) for number, line in enumerate(lines, start=1) if line.strip()]
    if tail.strip():
        try:
            records.append(_record(path, len(lines) + 1, tail, key))
            with path.open("ab") as handle:  # a whole record whose newline is missing
                handle.write(b"\n")
        except DecalignError:
            if not records:  # nothing shows decalign wrote this file
                raise
            path.write_bytes(b"".join(line + b"\n" for line in lines))  # a killed run's half line
    return {key(r) for r in records}, records


def _record(path: Path, number: int, line: bytes, key: Callable[[dict], Any]) -> dict:
    try:
        record = json.loads(line.decode("utf-8"))
        key(record)
        return record
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise DecalignError(f"output {path} line {number} is not a decalign record; use a new output file") from None


def check_run_config(out: Path, config: dict, *, records: Path, defaults: dict | None = None,
                     paths: Sequence[str] = ()) -> None:
    """Write a run folder's config.json, or refuse a folder that holds another configuration's work
    (a key missing from an older config.json counts as its value in `defaults`; the keys in `paths`
    are files or folders, the same however they are spelled: ./a, a/ and /abs/a; keys ending in
    FINGERPRINT are lists of scores, the same within float noise, and unknown in an older config).
    A folder whose `records` file holds nothing yet (a run killed before its first record) starts afresh."""
    if (out / "config.json").exists() and not (records.exists() and records.stat().st_size):
        (out / "config.json").unlink()
    _check_config(out / "config.json", config, defaults=defaults, paths=paths,
                  refusal=lambda changed: f"{out} holds records of another configuration ({changed} differ); "
                                          f"use a new folder or delete {out} to start fresh")


def check_job_config(output: Path, config: dict, *, written: bool, paths: Sequence[str] = ()) -> None:
    """The same for a resumable job writing one JSONL (`generate --input`, `score`): its configuration
    is kept beside it, in OUTPUT.config.json, so that a rerun with another method or reward is refused
    instead of skipping every id as done. An output without records (`written` False: what
    `load_output` found) starts afresh."""
    sidecar = output.with_name(output.name + ".config.json")
    if sidecar.exists() and not written:
        sidecar.unlink()
    if written and not sidecar.exists():  # e.g. the input given as the output, or another tool's file
        raise DecalignError(f"{output} holds records but no {sidecar.name}, so no decalign job of this kind "
                            f"wrote them; use a new output file, or delete {output} to start fresh")
    _check_config(sidecar, config, paths=paths,
                  refusal=lambda changed: f"{output} holds answers of another configuration ({changed} differ); "
                                          f"use a new output file, or delete {output} and {sidecar.name} to start fresh")


def _check_config(path: Path, config: dict, *, refusal: Callable[[str], str], defaults: dict | None = None,
                  paths: Sequence[str] = ()) -> None:
    config = json.loads(json.dumps(config, default=str))  # compared as it is stored
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DecalignError(f"{path} is not a decalign configuration; delete it to start fresh") from None

        def same(key: str) -> bool:
            before = old.get(key, (defaults or {}).get(key))
            if key.endswith(FINGERPRINT):
                return before is None or _same_scores(before, config[key])  # None: an older config, unknown
            if key in paths and isinstance(before, str) and isinstance(config[key], str):
                return Path(before).expanduser().resolve() == Path(config[key]).expanduser().resolve()
            return before == config[key]
        differ = [k for k in config if not same(k)]
        changed = [f"the {k[:-len(FINGERPRINT)]}'s weights" if k.endswith(FINGERPRINT) else k
                   for k in differ if not (k.endswith(FINGERPRINT) and k[:-len(FINGERPRINT)] in differ)]
        if changed:
            raise DecalignError(refusal(", ".join(changed)))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))


def _same_scores(before: Any, now: Any) -> bool:
    if not (isinstance(before, list) and isinstance(now, list) and len(before) == len(now)):
        return before == now
    return all(isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
               for a, b in zip(before, now))


@contextmanager
def held_output(path: Path) -> Iterator[TextIO]:
    """A job's output, open to append, and its claim on it while the job runs (an advisory lock, where
    the system has one): a second job on the same output is refused in one line, instead of answering
    every id again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a", encoding="utf-8")
    except OSError as exc:  # a read-only file or folder, a file where a folder should be
        raise DecalignError(f"cannot write {path}: {exc.strerror or exc}") from None
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DecalignError(f"{path} is being written by another job; wait for it to end, "
                                    "or give another output") from None
        yield handle


def digest(*parts: Any) -> str:
    """A short fingerprint of what a record was computed from (a prompt, a response), kept in the
    record so that a resumed job can tell an input edited under the same id."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def changed_since(kept: str | None, *parts: Any) -> bool:
    """Whether a finished record's input changed since: `kept`, the digest the record holds, differs
    from that of `parts` (None, in records written before digests were kept, is taken as unchanged)."""
    return kept is not None and kept != digest(*parts)


def append_record(handle, record: dict) -> None:
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()  # a finished record survives a kill


def environment(engine) -> str:
    """The first words of a run's header: versions, machine, threads and model (when an engine is
    given), to read figures by."""
    line = (f"decalign {__version__} · torch {torch.__version__} · transformers {transformers.__version__} · "
            f"{platform.machine()} {torch.get_num_threads()} threads")
    return line if engine is None else f"{line} · model {engine.name}"


def output_folder(out: str | os.PathLike, *, replaced_if: str | None = None) -> Path:
    """`out` as an absolute path, checked before any work: a folder that can be created or written.
    With `replaced_if` (a file only this kind of output holds), an existing folder is replaced whole,
    so it must be empty or an earlier output (holding that file): a folder of other files is refused
    (one was deleted with the user's files in it)."""
    out = Path(out).expanduser().resolve()  # stays right when the folder a relative path starts in moves
    if out.exists() and not out.is_dir():
        raise DecalignError(f"{out} is a file, not a folder")
    if replaced_if is not None and out.is_dir() and any(out.iterdir()) and not (out / replaced_if).is_file():
        raise DecalignError(f"{out} holds files but no {replaced_if}: it is replaced whole by the new output, "
                            "so give a new or empty folder, or an earlier output")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DecalignError(f"cannot write {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DecalignError(f"cannot write {out}: {existing} is not writable")
    return out


@contextmanager
def staged_folder(out: Path, *, replaced_if: str) -> Iterator[Path]:
    """An empty folder beside `out` to write a trained model into. When the block ends well it takes
    `out`'s place (which must pass `output_folder` with `replaced_if`); when it fails it is removed
    and `out`, if any, is left as it was."""
    out = output_folder(out, replaced_if=replaced_if)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as work:
        staging = Path(work) / "new"
        staging.mkdir()
        yield staging
        if out.exists():
            out.rename(Path(work) / "old")  # deleted with the temporary folder
        staging.rename(out)
