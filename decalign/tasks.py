"""A generated task that a LoRA adapter can teach: short arithmetic word problems in a fixed format.

Each item is a small story ("Mia has 23 stickers. She buys 15 more. ...") of one to three steps
(add, take away, double or triple), and the answer is worked in one line per step, then a final
line `#### <n>`, GSM8K style:

    23 + 15 = 38
    38 * 2 = 76
    #### 76

The base model answers such questions in free prose and never in this format; an adapter trained on
the train split learns the format and part of the arithmetic, which leaves room for a decoder to
help or hurt. Items are drawn from a seeded generator, so a split is reproducible from its seed, and
the test split never repeats a train question. `decalign make-task` writes both splits.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DecalignError

NAMES = [("Mia", "she", "her"), ("Tom", "he", "his"), ("Ava", "she", "her"), ("Leo", "he", "his"),
         ("Zoe", "she", "her"), ("Sam", "he", "his"), ("Ines", "she", "her"), ("Omar", "he", "his"),
         ("Lena", "she", "her"), ("Ravi", "he", "his"), ("Nora", "she", "her"), ("Ben", "he", "his")]
THINGS = ["apples", "stickers", "marbles", "coins", "books", "pencils", "cookies", "shells", "stamps", "cards"]
GAIN = ["{He} buys {n} more.", "{He} finds {n} more.", "A friend gives {him} {n} more.", "{He} wins {n} more."]
LOSS = ["{He} gives away {n}.", "{He} loses {n}.", "{He} sells {n}.", "{He} gives {n} to a friend."]
TIMES = {2: "Then the number of {things} {he} has doubles.", 3: "Then the number of {things} {he} has triples."}
FINAL = re.compile(r"####\s*(-?\d+)")
FINAL_LINE = re.compile(r"#### -?\d+")
NUMBER = re.compile(r"-?\d+")


@dataclass
class Problem:
    """One word problem: its question, worked solution (the training target) and integer answer."""

    id: str
    question: str
    solution: str
    answer: int
    steps: int


def make_problem(rng: random.Random, item_id: str, max_steps: int = 3) -> Problem:
    """Draw one problem; every intermediate value stays between 1 and 999."""
    name, he, his = rng.choice(NAMES)
    things = rng.choice(THINGS)
    value = rng.randint(5, 60)
    sentences = [f"{name} has {value} {things}."]
    lines = []
    steps = rng.randint(1, max_steps)
    fill = dict(He=he.capitalize(), he=he, him="her" if he == "she" else "him", things=things)
    for _ in range(steps):
        kinds = ["add", "sub"] + (["mul"] if value <= 300 else [])
        kind = rng.choice(kinds) if value > 1 else "add"
        if kind == "add":
            n = rng.randint(2, 60)
            sentences.append(rng.choice(GAIN).format(n=n, **fill))
            lines.append(f"{value} + {n} = {value + n}")
            value += n
        elif kind == "sub":
            n = rng.randint(1, min(value - 1, 60))
            sentences.append(rng.choice(LOSS).format(n=n, **fill))
            lines.append(f"{value} - {n} = {value - n}")
            value -= n
        else:
            n = rng.choice([2, 3])
            sentences.append(TIMES[n].format(**fill))
            lines.append(f"{value} * {n} = {value * n}")
            value *= n
    sentences.append(f"How many {things} does {name} have now?")
    return Problem(item_id, " ".join(sentences), "\n".join(lines + [f"#### {value}"]), value, steps)


def make_splits(train: int, test: int, seed: int = 0, max_steps: int = 3) -> tuple[list[Problem], list[Problem]]:
    """Train and test problems from one seed; no test question appears in the train split."""
    if train < 0 or test < 0:
        raise DecalignError(f"split sizes must be >= 0, got train {train}, test {test}")
    if not 1 <= max_steps <= 5:
        raise DecalignError(f"max steps must be between 1 and 5, got {max_steps}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(count: int, prefix: str) -> list[Problem]:
        items: list[Problem] = []
        for _ in range(50 * count + 1000):
            if len(items) == count:
                return items
            problem = make_problem(rng, f"{prefix}-{len(items)}", max_steps)
            if problem.question not in seen:
                seen.add(problem.question)
                items.append(problem)
        if len(items) < count:
            raise DecalignError(f"cannot draw {count} distinct {prefix} problems; ask for fewer")
        return items

    test_items = draw(test, "test")  # drawn first, so a test split does not depend on the train size
    train_items = draw(train, "train")
    return train_items, test_items


def parse_final(text: str) -> int | None:
    """The answer an output commits to: the number after its last `####`, or None."""
    found = FINAL.findall(text)
    return int(found[-1]) if found else None


def parse_lenient(text: str) -> int | None:
    """The last integer anywhere in the text: a fair reading of answers that ignore the format."""
    found = NUMBER.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


def is_formatted(text: str) -> bool:
    """True when the output ends with exactly one final line `#### <n>` (the taught format)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and FINAL_LINE.fullmatch(lines[-1]) is not None and text.count("####") == 1


def write_splits(out: Path, train: int, test: int, seed: int = 0, max_steps: int = 3) -> tuple[Path, Path]:
    """train.jsonl as chat records for `decalign train-lora`, test.jsonl as {id, prompt, answer, steps}."""
    train_items, test_items = make_splits(train, test, seed, max_steps)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out / "train.jsonl", out / "test.jsonl"
    with train_path.open("w", encoding="utf-8") as handle:
        for p in train_items:
            messages = [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution}]
            handle.write(json.dumps({"id": p.id, "messages": messages}) + "\n")
    with test_path.open("w", encoding="utf-8") as handle:
        for p in test_items:
            handle.write(json.dumps({"id": p.id, "prompt": p.question, "answer": p.answer, "steps": p.steps}) + "\n")
    return train_path, test_path
