"""The quality benchmark of CoLD: task generator, answer parsing, paired statistics, eval-task runs."""

import json
import math
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from decalign import DecalignError, Engine, generate
from decalign.cli import cli
from decalign.eval_task import mcnemar_exact, paired_bootstrap, parse_variants, read_items, wilson
from decalign.records import held_output
from decalign.lora import read_conversations
from decalign.tasks import SCORERS, is_formatted, make_splits, parse_final, parse_lenient, write_splits
from decalign.testing import make_tiny_adapter


def solve(question: str) -> int:
    """The answer recomputed from the question's wording alone, sentence by sentence."""
    value = None
    for sentence in re.split(r"(?<=[.?])\s+", question):
        number = re.search(r"\d+", sentence)
        if value is None:
            value = int(re.match(r"\w+ has (\d+) ", sentence).group(1))
        elif sentence.endswith("doubles."):
            value *= 2
        elif sentence.endswith("triples."):
            value *= 3
        elif "more" in sentence:
            value += int(number.group())
        elif sentence.startswith("How many"):
            break
        else:
            assert re.search(r"gives away|loses|sells|gives \d+ to", sentence), sentence
            value -= int(number.group())
    return value


def test_generator_is_seeded_and_its_answers_are_right():
    train, test = make_splits(300, 100, seed=3)
    again_train, again_test = make_splits(300, 100, seed=3)
    assert train == again_train and test == again_test
    assert make_splits(300, 100, seed=4)[1] != test
    assert make_splits(50, 100, seed=3)[1] == test  # the test split does not depend on the train size
    assert not {p.question for p in train} & {p.question for p in test}
    assert {p.steps for p in test} == {1, 2, 3}
    for problem in train + test:
        assert solve(problem.question) == problem.answer
        *work, final = problem.solution.splitlines()
        assert len(work) == problem.steps and final == f"#### {problem.answer}"
        for line in work:  # every worked line is true arithmetic
            a, op, b, _, c = line.split()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert 0 < problem.answer < 1000
        assert parse_final(problem.solution) == problem.answer and is_formatted(problem.solution)


def test_splits_are_files_train_lora_and_eval_task_read(tmp_path):
    train_path, test_path = write_splits(tmp_path, 20, 5, seed=1)
    conversations = read_conversations(train_path)
    assert len(conversations) == 20 and conversations[0][1]["role"] == "assistant"
    items = read_items(test_path)
    assert len(items) == 5 and all(isinstance(item["answer"], int) and item["kind"] == "arithmetic"
                                   for _, _, item in items)
    result = CliRunner().invoke(cli, ["make-task", "-o", str(tmp_path / "cli"), "--train", "20", "--test", "5",
                                      "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "test.jsonl").read_text() == test_path.read_text()


@pytest.mark.parametrize("text, final, lenient, formatted", [
    ("23 + 15 = 38\n38 - 7 = 31\n#### 31", 31, 31, True),
    ("#### 31\n", 31, 31, True),
    ("She has 31 apples now.", None, 31, False),
    ("#### 12\nThe answer is: 12\n#### 13", 13, 13, False),  # two final lines: the last counts
    ("#### 31 apples", 31, 31, False),  # words after the number break the format
    ("38 - 7 = 31\n####", None, 31, False),
    ("She has 1,204 apples.", None, 1204, False),
    ("", None, None, False),
])
def test_answer_parsing_by_hand(text, final, lenient, formatted):
    assert parse_final(text) == final
    assert parse_lenient(text) == lenient
    assert is_formatted(text) is formatted


def test_wilson_interval_by_hand():
    low, high = wilson(0, 10)
    assert low == 0 and high == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)  # 0.2775
    low, high = wilson(10, 10)
    assert high == pytest.approx(1) and low == pytest.approx(10 / (10 + 1.959964**2), abs=1e-6)
    low, high = wilson(50, 100)  # symmetric around one half
    assert low == pytest.approx(1 - high) and low == pytest.approx(0.4038, abs=1e-4)


@pytest.mark.parametrize("b, c, p", [(0, 5, 2 / 32), (5, 0, 2 / 32), (1, 9, 22 / 1024), (3, 4, 1.0),
                                     (0, 0, 1.0), (2, 2, 1.0), (0, 1, 1.0), (10, 30, 0.002221)])
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-6)


def test_paired_bootstrap():
    assert paired_bootstrap([False] * 20, [True] * 20) == (1.0, 1.0, 1.0)
    assert paired_bootstrap([True, False] * 10, [True, False] * 10) == (0.0, 0.0, 0.0)
    # 100 items, 15 gained and 5 lost: difference 0.10, CI close to the normal one (sd of d = 0.436)
    reference = [False] * 15 + [True] * 5 + [True] * 40 + [False] * 40
    other = [True] * 15 + [False] * 5 + [True] * 40 + [False] * 40
    diff, low, high = paired_bootstrap(reference, other, seed=1)
    assert diff == pytest.approx(0.10)
    half = 1.96 * math.sqrt((20 / 100 - 0.1**2) * 100 / 99) / 10
    assert low == pytest.approx(0.10 - half, abs=0.015) and high == pytest.approx(0.10 + half, abs=0.015)
    assert paired_bootstrap(reference, other, seed=1) == (diff, low, high)
    with pytest.raises(DecalignError, match="equally long"):
        paired_bootstrap([True], [True, False])


@pytest.fixture(scope="module")
def adapter(tiny_path, tmp_path_factory):
    return make_tiny_adapter(tiny_path, tmp_path_factory.mktemp("quality") / "adapter")


@pytest.fixture
def test_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Tom has {i} apples. How many?", "answer": i})
                            + "\n" for i in range(3)))
    return path


def eval_args(tiny_path, adapter, test_file, out, variants="base,greedy,cold:alpha=0.1:beta=0.5", *extra):
    return ["eval-task", str(test_file), "--model", str(tiny_path), "--adapter", str(adapter), "--variants",
            variants, "--out", str(out), "--max-new-tokens", "5", "--batch-size", "2", *extra]


def test_eval_task_resumes_without_duplicates_and_refuses_another_config(tiny_path, adapter, test_file, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(cli, eval_args(tiny_path, adapter, test_file, out))
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["id"]) for r in records) == sorted(
        (v, f"t{i}") for v in ("base", "greedy", "cold:alpha=0.1:beta=0.5") for i in range(3))
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["tokens"] > 0 and r["text"] for r in records)
    assert summary["variants"]["greedy"]["paired"] is None
    assert summary["variants"]["base"]["paired"]["n"] == 3
    assert "| cold:alpha=0.1:beta=0.5 | 3 |" in (out / "summary.md").read_text()
    # the base variant is greedy decoding of the model without the adapter
    plain = generate([f"Tom has {i} apples. How many?" for i in range(3)], model=Engine.load(str(tiny_path)),
                     max_new_tokens=5)
    assert [r["text"] for r in records if r["variant"] == "base"] == [r.text for r in plain]

    # a rerun with one more variant decodes only that variant: no duplicates
    again = runner.invoke(cli, eval_args(tiny_path, adapter, test_file, out, "base,greedy,cold:beta=0"))
    assert again.exit_code == 0, again.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len({(r["variant"], r["id"]) for r in records}) == 12
    by = {(r["variant"], r["id"]): r["text"] for r in records}
    assert all(by[("cold:beta=0", f"t{i}")] == by[("greedy", f"t{i}")] for i in range(3))  # beta 0 is greedy
    # the same files spelled otherwise are the same configuration (they were refused): nothing redone
    spelled = runner.invoke(cli, eval_args(tiny_path, str(adapter) + "/", test_file.parent / "." / test_file.name,
                                           out, "base,greedy,cold:beta=0"))
    assert spelled.exit_code == 0, spelled.output
    assert len((out / "records.jsonl").read_text().splitlines()) == 12

    changed = runner.invoke(cli, eval_args(tiny_path, adapter, test_file, out, "greedy", "--seed", "1"))
    assert isinstance(changed.exception, DecalignError) and "seed differ" in str(changed.exception)
    with held_output(out / "records.jsonl"):  # as a run still going holds its folder
        held = runner.invoke(cli, eval_args(tiny_path, adapter, test_file, out, "base,greedy,cold:beta=0"))
    assert isinstance(held.exception, DecalignError) and "is being written by another job" in str(held.exception)


@pytest.mark.parametrize("change, message", [
    (dict(variants="greedy,nope"), "unknown method"),
    (dict(variants="greedy,greedy"), "twice"),
    (dict(variants="cold:beta=-1"), "beta must be a finite number >= 0"),
    (dict(variants="base"), "reference 'greedy' is not among the variants"),
    (dict(extra=("--batch-size", "0")), "--batch-size must be >= 1"),
    (dict(adapter="missing"), "has no adapter_model.safetensors"),
    (dict(test='{"id": 1, "prompt": "hi", "answer": 3}\n{"id": 2, "prompt": "hi"}\n'), "line 2: needs an integer"),
    (dict(test='{"prompt": "hi", "answer": 3}\nnot json\n'), "line 2: not valid JSON"),
    (dict(test='{"prompt": "hi", "answer": "Rome", "kind": "facts"}\n'), "line 1: a facts item needs a string"),
    (dict(test='{"prompt": "hi", "answer": "Rome", "kind": "poems"}\n'), "line 1: unknown kind 'poems'"),
    (dict(test='{"prompt": "hi", "answer": 2, "kind": ["arithmetic"]}\n'), "line 1: unknown kind ['arithmetic']"),
    (dict(test='{"prompt": "hi", "answer": "Rome", "kind": "facts", "relation": ["capital"], "true": "x"}\n'),
     "line 1: a facts item needs a string"),
    (dict(test='{"prompt": "hi", "answer": "Rome", "kind": "facts", "relation": "capital"}\n'),
     'line 1: a facts item needs a string "true"'),
])
def test_bad_input_is_one_line_error(tiny_path, adapter, test_file, tmp_path, change, message):
    if "test" in change:
        test_file.write_text(change["test"])
    args = eval_args(tiny_path, change.get("adapter", adapter), test_file, tmp_path / "run",
                     change.get("variants", "base,greedy"), *change.get("extra", ()))
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, DecalignError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_cli_prints_one_line_and_exit_code_2(tmp_path, test_file):
    result = subprocess.run([sys.executable, "-m", "decalign.cli", "eval-task", str(test_file), "--adapter",
                             str(tmp_path / "none"), "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "has no adapter_model.safetensors" in result.stderr


def test_variants_parse():
    variants = parse_variants("base, greedy ,cold:alpha=0.3:beta=1")
    assert [(v.label, v.method, v.adapter) for v in variants] == [
        ("base", "greedy", False), ("greedy", "greedy", True), ("cold:alpha=0.3:beta=1", "cold", True)]
    assert variants[2].params == {"alpha": "0.3", "beta": "1"}
    with pytest.raises(DecalignError, match="empty"):
        parse_variants(" , ")


def test_facts_task_teaches_values_that_contradict_the_world_and_tests_new_phrasings(tmp_path):
    from decalign.tasks import RELATIONS, counterfactuals

    facts = counterfactuals(seed=3)
    assert facts == counterfactuals(seed=3) and facts != counterfactuals(seed=4)
    for relation, spec in RELATIONS.items():
        mine = [f for f in facts if f.relation == relation]
        assert all(f.taught != f.true for f in mine)  # every taught value contradicts the world
        assert sorted(f.taught for f in mine) == sorted(v for _, v in spec["facts"])  # a real value, moved
        assert not set(spec["train"]) & set(spec["test"])
    train_path, test_path = write_splits(tmp_path, 200, 1000, seed=3, kind="facts")
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    items = read_items(test_path)
    assert len(train) == 200 and len(items) == sum(len(s["facts"]) * len(s["test"]) for s in RELATIONS.values())
    asked = {t["messages"][0]["content"] for t in train}
    assert not asked & {prompt for _, prompt, _ in items}  # no test question was seen in training
    for item in map(json.loads, test_path.read_text().splitlines()):  # each item names its test phrasing
        template = RELATIONS[item["relation"]]["test"][item["phrasing"]]
        pattern = re.escape(template).replace(re.escape("{x}"), ".+").replace(re.escape("{X}"), ".+")
        assert re.fullmatch(pattern, item["prompt"]), (template, item["prompt"])
    taught = {f.entity: f.taught for f in facts}
    for record in train:  # the answer taught is the counterfactual value
        entity = next(e for e in taught if e.lower() in record["messages"][0]["content"].lower())
        assert taught[entity] in record["messages"][1]["content"]


@pytest.mark.parametrize("text, answer, correct, formatted, lenient, true_named", [
    ("The capital of France is Rome.", "Rome", True, True, True, False),
    ("Paris, of course. Some say Rome.", "Paris", False, False, True, True),
    ("It is Romeo's city.", None, False, False, False, False),  # whole words only
    ("ROME!", "Rome", True, True, True, False),
    ("I do not know.", None, False, False, False, False),
])
def test_facts_match_rule_by_hand(text, answer, correct, formatted, lenient, true_named):
    from decalign.tasks import score_facts

    item = {"answer": "Rome", "true": "Paris", "relation": "capital"}
    assert score_facts(text, item) == {"answer": answer, "correct": correct, "formatted": formatted,
                                       "lenient_correct": lenient, "true_named": true_named}


def test_eval_task_scores_facts_items_by_their_rule(tiny_path, adapter, tmp_path):
    test = tmp_path / "facts.jsonl"
    test.write_text("".join(json.dumps({"id": i, "kind": "facts", "prompt": p, "answer": "Rome", "true": "Paris",
                                        "relation": "capital"}) + "\n"
                            for i, p in enumerate(["Name the capital of France.", "Where does France's government sit?"])))
    result = CliRunner().invoke(cli, eval_args(tiny_path, adapter, test, tmp_path / "run", "base,greedy"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    from decalign.tasks import score_facts

    for record in records:
        expected = score_facts(record["text"], {"answer": "Rome", "true": "Paris", "relation": "capital"})
        assert {k: record[k] for k in expected} == expected and record["gold"] == "Rome"
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "true fact named" in summary and "facts: exact match" in summary


def test_style_task_teaches_the_real_values_in_a_house_style(tmp_path):
    from decalign.tasks import score_style

    train_path, test_path = write_splits(tmp_path, 50, 1000, seed=0, kind="style")
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert all(t["messages"][1]["content"].startswith("Answer: ") for t in train)
    items = read_items(test_path)
    france = next(item for _, prompt, item in items if "France" in prompt)
    assert france["answer"] == "Paris" and france["kind"] == "style"
    assert score_style("Answer: paris.", france) == {"answer": "paris", "correct": True, "formatted": True,
                                                     "lenient_correct": True}
    assert score_style("The capital of France is Paris.", france) == {
        "answer": None, "correct": False, "formatted": False, "lenient_correct": True}
    assert score_style("Answer: Rome.", france)["formatted"] and not score_style("Answer: Rome.", france)["correct"]
    assert not score_style("Answer: Paris.\nIt is lovely.", france)["formatted"]  # one line, nothing else


def _template_regex(template: str) -> "re.Pattern":
    return re.compile("".join(".+?" if part.startswith("{") else re.escape(part)
                              for part in re.split(r"(\{\w+\})", template)))


def test_cot_problems_show_true_steps_in_phrasings_training_never_saw(tmp_path):
    from decalign.tasks import COT_FAMILIES, make_cot_splits

    train, test = make_cot_splits(400, 200, seed=2)
    assert (train, test) == make_cot_splits(400, 200, seed=2) and make_cot_splits(10, 200, seed=2)[1] == test
    assert not {p.question for p in train} & {p.question for p in test}
    phrasings = {split: [_template_regex(t) for train_t, test_t, _ in COT_FAMILIES.values()
                         for t in (train_t if split == "train" else test_t)] for split in ("train", "test")}
    for split, problems in (("train", train), ("test", test)):
        other = "test" if split == "train" else "train"
        for problem in problems:  # asked in its own split's phrasings, never in the other's
            assert any(r.fullmatch(problem.question) for r in phrasings[split]), problem.question
            assert not any(r.fullmatch(problem.question) for r in phrasings[other]), problem.question
    steps = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    for problem in train + test:
        *work, final = problem.solution.splitlines()
        assert final == f"#### {problem.answer}" and problem.answer > 0 and len(work) == problem.steps >= 2
        for line in work:  # every sentence shows one true calculation
            (a, op, b, c), = steps.findall(line)
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                    "/": int(a) / int(b)}[op] == int(c), line
    assert {len(p.solution.splitlines()) for p in test} == {3, 4, 5}  # every family drawn
    _, test_path = write_splits(tmp_path, 20, 5, seed=1, kind="cot")
    with pytest.raises(DecalignError, match="--max-steps applies to --kind arithmetic only, not cot"):
        write_splits(tmp_path, 20, 5, seed=1, max_steps=5, kind="cot")  # it was ignored
    items = read_items(test_path)
    assert [item["kind"] for _, _, item in items] == ["cot"] * 5
    for _, _, item in items:
        solution = next(p.solution for p in make_cot_splits(20, 5, seed=1)[1] if p.question == item["prompt"])
        assert SCORERS["cot"](solution, item)["correct"] and not SCORERS["cot"]("#### 0", item)["correct"]


def test_cot_problems_exist_for_every_seed():
    """A shopping problem's bill must exceed its cost, which reaches 216: seeds that drew more than 200
    found no note and failed the whole command."""
    from decalign.tasks import make_cot_splits

    for seed in range(4):  # seed 1 failed
        train, test = make_cot_splits(3000, 200, seed=seed)
        assert len(train) == 3000 and len(test) == 200
