"""Generated tasks that a LoRA adapter can teach, and how their answers are scored.

`arithmetic` (the default kind): short arithmetic word problems in a fixed format.

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

`facts`: counterfactual facts, the conflict CoLD exists for. Well-known entities are given other
attributes (a country another country's capital, an object another colour, an animal another
animal's sound), taught with one set of question phrasings and tested with phrasings training never
used, so a test measures what the adapter learnt rather than strings it memorised. The base model
answers with the real-world value; the adapter's job is to override it. Answers are scored by which
of the relation's values the answer names first (see `score_facts`).

`cot`: chain-of-thought word problems, the paper's own setting (GSM8K) on a small scale: four
families of two- to four-step problems (change after shopping, sharing after keeping some, pages
read at two rates, stock left after two days' sales), answered in sentences that show each step's
arithmetic and then `#### <n>`. Each family is asked with two phrasings in training and two others
in testing. Scored like `arithmetic`.

`style`: the same questions with their real-world answers, taught in a house style the base model
never uses (`Answer: Paris.`, one line, no prose): an adapter that changes how, not what. Scored by
`score_style`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    if not 1 <= max_steps <= 5:
        raise DecalignError(f"max steps must be between 1 and 5, got {max_steps}")
    return distinct_splits(train, test, seed, lambda rng, item_id, _: make_problem(rng, item_id, max_steps))


def distinct_splits(train: int, test: int, seed: int, make: Callable[[random.Random, str, str], Problem]
                    ) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems drawn by `make(rng, item_id, split)` from one seeded generator, no question
    twice; the test split is drawn first, so it does not depend on the train size."""
    if train < 0 or test < 0:
        raise DecalignError(f"split sizes must be >= 0, got train {train}, test {test}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(count: int, split: str) -> list[Problem]:
        items: list[Problem] = []
        for _ in range(50 * count + 1000):
            if len(items) == count:
                break
            problem = make(rng, f"{split}-{len(items)}", split)
            if problem.question not in seen:
                seen.add(problem.question)
                items.append(problem)
        if len(items) < count:
            raise DecalignError(f"cannot draw {count} distinct {split} problems; ask for fewer")
        return items

    test_items = draw(test, "test")
    return draw(train, "train"), test_items


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


def write_splits(out: Path, train: int, test: int, seed: int = 0, max_steps: int | None = None,
                 kind: str = "arithmetic") -> tuple[Path, Path]:
    """train.jsonl as chat records for `decalign train-lora`, test.jsonl as {id, kind, prompt,
    answer, ...} for `decalign eval-task`. `max_steps` (default 3) is the arithmetic task's only."""
    if max_steps is not None and kind != "arithmetic":
        raise DecalignError(f"--max-steps applies to --kind arithmetic only, not {kind}")
    max_steps = 3 if max_steps is None else max_steps
    if kind in INTEGER_KINDS:
        problems, tests = make_splits(train, test, seed, max_steps) if kind == "arithmetic" else \
            make_cot_splits(train, test, seed)
        train_records = [{"id": p.id, "messages": [{"role": "user", "content": p.question},
                                                   {"role": "assistant", "content": p.solution}]} for p in problems]
        test_items = [{"id": p.id, "kind": kind, "prompt": p.question, "answer": p.answer, "steps": p.steps}
                      for p in tests]
    elif kind in RELATION_KINDS:
        train_records, test_items = fact_splits(train, test, seed, kind)
    else:
        raise DecalignError(f"unknown task kind {kind!r}; choose from: {', '.join(KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out / "train.jsonl", out / "test.jsonl"
    for path, rows in ((train_path, train_records), (test_path, test_items)):
        with path.open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return train_path, test_path


# ----- the chain-of-thought word problems task --------------------------------------------------
# GSM8K's setting on a small scale: multi-step problems of four families, each asked with two
# phrasings in training and two others in testing, answered in sentences that show every step's
# arithmetic, then `#### <n>`. One (train phrasings, test phrasings, draw) triple per family;
# draw(rng) -> (values for the phrasings, the worked sentences, the answer).
GOODS = ["pens", "notebooks", "tickets", "candles", "cups", "plants", "scarves", "batteries"]


def _shopping(rng: random.Random) -> tuple[dict, list[str], int]:
    first, second = rng.sample(GOODS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    spent = a * p + b * q
    bill = next(note for note in (20, 50, 100, 200, 500) if note > spent)  # spent reaches 216
    lines = [f"{a} {first} cost {a} * {p} = {a * p} dollars.", f"{b} {second} cost {b} * {q} = {b * q} dollars.",
             f"Together they cost {a * p} + {b * q} = {spent} dollars.",
             f"The change is {bill} - {spent} = {bill - spent} dollars."]
    return dict(first=first, second=second, a=a, p=p, b=b, q=q, bill=bill), lines, bill - spent


def _sharing(rng: random.Random) -> tuple[dict, list[str], int]:
    m, each, keep = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 20)
    n, rest = keep + m * each, m * each
    lines = [f"After keeping {keep}, {n} - {keep} = {rest} are shared.", f"Each friend gets {rest} / {m} = {each}."]
    return dict(n=n, keep=keep, m=m), lines, each


def _reading(rng: random.Random) -> tuple[dict, list[str], int]:
    p, d, q, e = rng.randint(5, 40), rng.randint(2, 9), rng.randint(5, 40), rng.randint(2, 9)
    lines = [f"{d} days at {p} pages a day is {d} * {p} = {d * p} pages.",
             f"{e} days at {q} pages a day is {e} * {q} = {e * q} pages.",
             f"In all that is {d * p} + {e * q} = {d * p + e * q} pages."]
    return dict(p=p, d=d, q=q, e=e), lines, d * p + e * q


def _stock(rng: random.Random) -> tuple[dict, list[str], int]:
    a = rng.randint(3, 40)
    n = 3 * a + rng.randint(1, 200)
    lines = [f"On Tuesday the shop sells 2 * {a} = {2 * a}.", f"In the two days it sells {a} + {2 * a} = {3 * a}.",
             f"So {n} - {3 * a} = {n - 3 * a} are left."]
    return dict(n=n, a=a), lines, n - 3 * a


COT_FAMILIES: dict[str, tuple[list[str], list[str], Callable[[random.Random], tuple[dict, list[str], int]]]] = {
    "shopping": (
        ["{name} buys {a} {first} for {p} dollars each and {b} {second} for {q} dollars each, and pays with a "
         "{bill}-dollar note. How much change does {he} get back?",
         "At the market, {name} gets {a} {first} at {p} dollars apiece and {b} {second} at {q} dollars apiece. "
         "{He} hands over {bill} dollars. What change should {he} receive?"],
        ["{First} cost {p} dollars each and {second} cost {q} dollars each. {name} takes {a} {first} and {b} "
         "{second} to the till and pays {bill} dollars. How many dollars come back as change?",
         "With a {bill}-dollar note, {name} pays for {a} {first} (priced at {p} dollars each) and {b} {second} "
         "(priced at {q} dollars each). Work out the change."],
        _shopping),
    "sharing": (
        ["{name} has {n} {things}. {He} keeps {keep} and shares the rest equally among {m} friends. How many "
         "{things} does each friend get?",
         "There are {n} {things} in {name}'s bag. After keeping {keep}, {he} splits the others evenly between "
         "{m} friends. How many does each friend receive?"],
        ["{m} friends will share {name}'s {things} equally, but first {name} puts {keep} of the {n} {things} "
         "aside. How many {things} will each friend have?",
         "Out of {n} {things}, {name} saves {keep} and hands out the remainder in equal parts to {m} friends. "
         "What is each part?"],
        _sharing),
    "reading": (
        ["{name} reads {p} pages a day for {d} days, then {q} pages a day for {e} days. How many pages does {he} "
         "read in all?",
         "For {d} days {name} reads {p} pages daily; for the next {e} days {he} reads {q} pages daily. How many "
         "pages is that altogether?"],
        ["A book club asks {name} to log pages: {p} each day for {d} days, and {q} each day for {e} more days. "
         "What total should {he} log?",
         "How many pages has {name} finished if {he} read {p} pages on each of {d} days and {q} pages on each of "
         "{e} days?"],
        _reading),
    "stock": (
        ["A shop has {n} {things}. It sells {a} on Monday and twice as many on Tuesday. How many {things} are "
         "left?",
         "There are {n} {things} in a store. {a} are sold on Monday, and on Tuesday the store sells double that. "
         "How many remain?"],
        ["By Tuesday night, how many of a store's {n} {things} are unsold if it sold {a} on Monday and twice "
         "Monday's number on Tuesday?",
         "Monday's sales were {a} {things}; Tuesday's were two times Monday's. The shop started with {n}. What "
         "is left?"],
        _stock),
}


def make_cot_problem(rng: random.Random, item_id: str, split: str) -> Problem:
    """One chain-of-thought problem of a random family, in one of `split`'s ("train"/"test") phrasings."""
    family = rng.choice(sorted(COT_FAMILIES))
    train_phrasings, test_phrasings, draw = COT_FAMILIES[family]
    values, lines, answer = draw(rng)
    name, he, _ = rng.choice(NAMES)
    things = rng.choice(THINGS)
    fill = dict(values, name=name, he=he, He=he.capitalize(), things=things)
    fill.update({key.capitalize(): value.capitalize() for key, value in values.items() if isinstance(value, str)})
    question = rng.choice(train_phrasings if split == "train" else test_phrasings).format(**fill)
    return Problem(item_id, question, "\n".join(lines + [f"#### {answer}"]), answer, len(lines))


def make_cot_splits(train: int, test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Train problems in the training phrasings, test problems in the others; no question repeats."""
    return distinct_splits(train, test, seed, make_cot_problem)


# ----- the counterfactual facts task ------------------------------------------------------------
# relation -> (entity, real-world value), questions used in training, questions used in testing,
# and the answer sentence taught. Entities and values are common knowledge.
RELATIONS: dict[str, dict] = {
    "capital": {
        "facts": [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
                  ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
                  ("Peru", "Lima"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Greece", "Athens"),
                  ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
                  ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Russia", "Moscow")],
        "train": ["What is the capital of {x}?", "Which city is the capital of {x}?",
                  "Tell me the capital city of {x}."],
        "test": ["In which city does the government of {x} sit?", "Name the capital of {x}, please.",
                 "I am flying to the capital of {x}. Which city is that?",
                 "What city serves as the capital of {x}?", "Quick question: the capital of {x} is which city?",
                 "My friend lives in the capital of {x}. In what city does she live?",
                 "Which city would you visit to see the parliament of {x}?",
                 "Where is the seat of government of {x}? Give the city."],
        "answer": "The capital of {x} is {y}.",
    },
    "colour": {
        "facts": [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
                  ("coal", "black"), ("blood", "red"), ("chocolate", "brown"), ("a flamingo", "pink"),
                  ("an aubergine", "purple"), ("a carrot", "orange")],
        "train": ["What colour is {x}?", "Which colour does {x} have?", "Tell me the colour of {x}."],
        "test": ["If you painted {x} true to life, which colour would you use?", "Describe the colour of {x}.",
                 "{X} is usually what colour?", "What is the usual colour of {x}?",
                 "In one word, what colour is {x}?", "A child draws {x}. Which crayon colour does she pick?",
                 "Say the colour of {x}.", "Which colour do people associate with {x}?"],
        "answer": "{X} is {y}.",
    },
    "sound": {
        "facts": [("a dog", "barks"), ("a cat", "meows"), ("a cow", "moos"), ("a duck", "quacks"),
                  ("a lion", "roars"), ("a sheep", "bleats"), ("a horse", "neighs"), ("an owl", "hoots"),
                  ("a snake", "hisses"), ("a pig", "oinks")],
        "train": ["What sound does {x} make?", "How does {x} call?", "Tell me the sound {x} makes."],
        "test": ["When {x} is excited, what does it do?", "Which noise would you hear from {x}?",
                 "Describe the call of {x} in one word.", "Which noise is typical of {x}?",
                 "If you stand next to {x}, what do you hear it do?", "Name the sound {x} produces.",
                 "{X} opens its mouth. What does it do?", "What does {x} do when it wants attention?"],
        "answer": "{X} {y}.",
    },
}


@dataclass
class Fact:
    relation: str
    entity: str
    true: str  # the real-world value: what the base model says
    taught: str  # the counterfactual value the adapter is taught


def counterfactuals(seed: int = 0) -> list[Fact]:
    """Each entity gets another entity's value of the same relation (a seeded derangement), so every
    taught value is a real value of that relation, only attached to the wrong entity."""
    rng = random.Random(seed)
    facts = []
    for relation, spec in RELATIONS.items():
        values = [value for _, value in spec["facts"]]
        while True:
            shuffled = values[:]
            rng.shuffle(shuffled)
            if all(a != b for a, b in zip(values, shuffled)):
                break
        facts += [Fact(relation, entity, true, taught)
                  for (entity, true), taught in zip(spec["facts"], shuffled)]
    return facts


def _fill(template: str, fact: Fact) -> str:
    return template.format(x=fact.entity, X=fact.entity[0].upper() + fact.entity[1:], y=fact.taught)


STYLE = "Answer: {y}."  # the house style: no prose, one line, whatever the base model's habit
STYLE_LINE = re.compile(r"Answer: ([^\n.]+)\.")


def fact_splits(train: int, test: int, seed: int = 0, kind: str = "facts") -> tuple[list[dict], list[dict]]:
    """Chat records teaching every fact with the training phrasings (cycled, shuffled, `train` of
    them) and up to `test` test items, one per fact and test phrasing. kind "facts": the
    counterfactual values in a plain sentence; kind "style": the real values in the house style
    `Answer: <value>.`, where the base model answers in prose."""
    if train < 0 or test < 0:
        raise DecalignError(f"split sizes must be >= 0, got train {train}, test {test}")
    facts = counterfactuals(seed)
    if kind == "style":
        facts = [Fact(f.relation, f.entity, f.true, f.true) for f in facts]
    teach = [(fact, question) for fact in facts for question in RELATIONS[fact.relation]["train"]]
    rng = random.Random(seed + 1)
    train_records = []
    while len(train_records) < train:
        rng.shuffle(teach)
        for fact, question in teach[:train - len(train_records)]:
            answer = _fill(STYLE if kind == "style" else RELATIONS[fact.relation]["answer"], fact)
            train_records.append({"id": f"train-{len(train_records)}", "messages": [
                {"role": "user", "content": _fill(question, fact)}, {"role": "assistant", "content": answer}]})
    asked = [(fact, phrasing, question) for fact in facts
             for phrasing, question in enumerate(RELATIONS[fact.relation]["test"])]
    test_items = [{"id": f"test-{k}", "kind": kind, "prompt": _fill(question, fact), "answer": fact.taught,
                   "true": fact.true, "relation": fact.relation, "phrasing": phrasing}
                  for k, (fact, phrasing, question) in enumerate(asked)]
    return train_records, test_items[:test]


def named_values(text: str, relation: str) -> list[str]:
    """The relation's values the text names (whole words, any case), in the order it first names them."""
    found = []
    for _, value in RELATIONS[relation]["facts"]:
        match = re.search(rf"\b{re.escape(value)}\b", text, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), value))
    return [value for _, value in sorted(found)]


def first_value(text: str, relation: str) -> str | None:
    """The first of the relation's values the text names, or None."""
    named = named_values(text, relation)
    return named[0] if named else None


def score_facts(text: str, item: dict) -> dict:
    """The match rule of the facts task. The answer is the first value of the item's relation that
    the text names: exact match when it is the taught value; format when the text names exactly
    one of the relation's values (a committed answer); lenient when the taught value appears
    anywhere; true_named when the first value named is the real-world one (the base model's habit)."""
    named = named_values(text, item["relation"])
    answer = named[0] if named else None
    return {"answer": answer, "correct": answer == item["answer"], "formatted": len(named) == 1,
            "lenient_correct": item["answer"] in named, "true_named": answer == item["true"]}


def score_style(text: str, item: dict) -> dict:
    """The match rule of the house-style task: exact match when the whole answer is the one line
    `Answer: <value>.` with the right value (any case); format when it is that line with any value;
    lenient when the first of the relation's values it names is the right one, in any style."""
    line = STYLE_LINE.fullmatch(text.strip())
    given = line.group(1).strip() if line else None
    return {"answer": given, "correct": given is not None and given.lower() == item["answer"].lower(),
            "formatted": line is not None, "lenient_correct": first_value(text, item["relation"]) == item["answer"]}


def score_arithmetic(text: str, item: dict) -> dict:
    """The match rule of the arithmetic task: the number after the final `####`."""
    answer = parse_final(text)
    return {"answer": answer, "correct": answer == item["answer"], "formatted": is_formatted(text),
            "lenient_correct": parse_lenient(text) == item["answer"]}


SCORERS = {"arithmetic": score_arithmetic, "cot": score_arithmetic, "facts": score_facts, "style": score_style}
INTEGER_KINDS = ("arithmetic", "cot")  # the kinds answered `#### <n>`: their items hold an integer answer
RELATION_KINDS = ("facts", "style")  # the kinds built on RELATIONS: their items name a relation
KINDS = tuple(SCORERS)
