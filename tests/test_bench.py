"""decalign bench: resume without loss or duplicates, statistics on hand-made records, plots."""

import json
import math

import pytest

from decalign import DecalignError
from decalign.bench import compare, cost_to_reach, mean_ci, run_bench, summarize, summary_markdown, win_tie, write_plots


def prompts_file(tmp_path, count=3):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about bread {i}."}) + "\n"
                            for i in range(count)))
    return path


def test_resume_after_interruption_writes_each_record_once(tiny_path, tmp_path):
    out = tmp_path / "run"
    common = dict(methods="greedy,bon:n=2", prompts=prompts_file(tmp_path), out=out, reward="sentiment",
                  judge="length:target=5", model=str(tiny_path), max_new_tokens=6, batch_size=1, progress=False)
    seen = []

    def interrupt(record):
        seen.append(record)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(**common, on_record=interrupt)
    first = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(first) == 4
    summary = run_bench(**common)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    keys = [(r["method"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == 6
    assert records[:4] == first  # nothing rewritten
    assert summary["methods"]["bon:n=2"]["n"] == 3
    for name in ("summary.md", "summary.json", "reward_vs_time.png", "cost.png"):
        assert (out / name).stat().st_size > 0
    with pytest.raises(DecalignError, match="another configuration \\(reward differ"):
        run_bench(**{**common, "reward": "json"})
    from decalign.records import held_output

    with held_output(out / "records.jsonl"):  # as a run still going holds its folder
        with pytest.raises(DecalignError, match="records.jsonl is being written by another job"):
            run_bench(**common)
        assert json.loads((out / "config.json").read_text())["reward"] == "sentiment"  # not rewritten
    fresh = tmp_path / "killed"  # a run killed before its first record: its config.json, no records
    fresh.mkdir()
    (fresh / "config.json").write_text((out / "config.json").read_text())
    (fresh / "records.jsonl").write_text("")
    run_bench(**{**common, "out": fresh, "max_new_tokens": 4})  # another configuration: it was refused
    assert json.loads((fresh / "config.json").read_text())["max_new_tokens"] == 4
    edited = common["prompts"].read_text().replace("bread 1.", "cheese 1.")  # an answered id's prompt edited
    common["prompts"].write_text(edited)
    with pytest.raises(DecalignError, match="id 'p1' was answered in .* for another prompt; use a new --out folder"):
        run_bench(**common)
    assert [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()] == records


def test_bad_bench_input(tiny_path, tmp_path):
    good = prompts_file(tmp_path)
    common = dict(prompts=good, out=tmp_path / "x", reward="sentiment", model=str(tiny_path), max_new_tokens=4,
                  progress=False)
    with pytest.raises(DecalignError, match="unknown method 'nope'"):
        run_bench(methods="greedy,nope", **common)
    with pytest.raises(DecalignError, match="bon has no parameter m; its parameters"):
        run_bench(methods="bon:m=3", **common)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DecalignError, match="line 2"):
        run_bench(methods="greedy", **{**common, "prompts": bad})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DecalignError, match="holds no prompts"):
        run_bench(methods="greedy", **{**common, "prompts": empty})
    with pytest.raises(DecalignError, match="--offset 9 skips all .* prompts of"):
        run_bench(methods="greedy", **{**common, "offset": 9})
    with pytest.raises(DecalignError, match="--reward is needed by bon"):
        run_bench(methods="bon", **{**common, "reward": None})


def record(method, id_, reward, judge, wall=2.0, batch=2, tokens=10):
    stats = {"wall_time": wall, "batch_size": batch, "forward_passes": 5, "prefill_tokens": 7, "decode_tokens": 9,
             "discarded_tokens": 1, "reward_calls": 3}
    return {"id": id_, "method": method, "params": {}, "text": "x", "tokens": tokens, "reward": reward,
            "judge": judge, "stats": stats, "trace": None}


def test_statistics_on_hand_made_records():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.182 * math.sqrt(5 / 3) / 2, rel=1e-4)  # t(3) * sd / sqrt(n)
    assert math.isnan(mean_ci([1.0])[1])
    assert win_tie({1: 2.0, 2: 1.0, 3: 0.5}, {1: 1.0, 2: 1.0, 3: 1.0, 4: 9.0}) == {
        "n": 3, "wins": 1, "ties": 1, "losses": 1, "win_tie": 2 / 3}
    records = [record("a", 1, 0.1, 1.0), record("a", 2, 0.3, 2.0), record("b", 1, 0.5, 3.0, wall=4.0),
               record("b", 2, 0.7, 1.0, wall=8.0)]
    records[3]["stats"]["value_calls"] = 12  # a record without the field (written before it) counts 0
    summary = summarize(records, ["a", "b"], "a")
    b = summary["methods"]["b"]
    assert summary["win_tie_by"] == "judge"
    assert b["win_tie"] == {"n": 2, "wins": 1, "ties": 0, "losses": 1, "win_tie": 0.5}
    assert b["reward"][0] == pytest.approx(0.6)
    assert b["time_median"] == pytest.approx(3.0) and b["time_mean"] == pytest.approx(3.0)  # wall / batch
    assert summary["methods"]["a"]["win_tie"]["win_tie"] == 1.0
    assert b["value_calls"] == 6 and "| value calls |" in summary_markdown(summary)
    with pytest.raises(DecalignError, match="baseline 'c'"):
        summarize(records, ["a", "b"], "c")


def test_plots_and_compare(tmp_path):
    records = [record("greedy", 1, 0.1, 1.0), record("greedy", 2, 0.2, 1.5),
               record("cards", 1, 0.5, 2.0, wall=6.0), record("cards", 2, 0.6, 2.5, wall=6.0)]
    records[2]["trace"] = [
        {"segment": 0, "attempt": 1, "reward": 0.1, "threshold": 0.3, "accepted": False},
        {"segment": 0, "attempt": 2, "reward": 0.4, "threshold": 0.3, "accepted": True},
        {"segment": 1, "attempt": 1, "reward": 0.5, "threshold": 0.35, "accepted": True},
    ]
    summary = summarize(records, ["greedy", "cards"], "greedy")
    paths = write_plots(tmp_path, records, summary)
    assert [p.name for p in paths] == ["reward_vs_time.png", "cost.png", "cards_trace.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    first, second = tmp_path / "one", tmp_path / "two"
    for folder, scale in ((first, 1.0), (second, 2.0)):
        folder.mkdir()
        changed = [dict(r, stats=dict(r["stats"], wall_time=r["stats"]["wall_time"] * scale)) for r in records]
        (folder / "summary.json").write_text(json.dumps(summarize(changed, ["greedy", "cards"], "greedy")))
    table = compare(first, second)
    assert "| cards | +0.000 | +0.000 | +0% | 2.00x | 1.00x | 1.00x |" in table
    with pytest.raises(DecalignError, match="no summary.json"):
        compare(first, tmp_path)


def test_cost_to_reach_interpolates_log_linearly_and_says_when_never():
    curve = [(100.0, 0.2), (400.0, 0.6), (200.0, 0.4)]
    assert cost_to_reach(curve, 0.5) == pytest.approx(math.sqrt(200 * 400))  # halfway in log cost
    assert cost_to_reach(curve, 0.1) == 100.0
    assert cost_to_reach(curve, 0.7) is None


def _record(method, i, reward, decode, seconds, calls=1):
    return {"id": i, "method": method, "reward": reward, "judge": None, "tokens": 10,
            "stats": {"wall_time": seconds, "batch_size": 1, "decode_tokens": decode, "reward_calls": calls}}


def test_frontier_table_puts_each_curve_against_best_of_n(tmp_path):
    levels = {1: 0.1, 2: 0.2, 4: 0.3, 8: 0.4, 16: 0.5, 32: 0.6}
    records = [_record(f"bon:n={n}", i, level + 0.01 * i, 100 * n, n, calls=n) for n, level in levels.items()
               for i in range(3)]
    records += [_record("cards:value=v:beta=1", i, 0.41 + 0.01 * i, 200, 2, calls=3) for i in range(3)]
    records += [_record("cards:value=v:beta=2", i, 0.21 + 0.01 * i, 100, 1, calls=3) for i in range(3)]
    labels = [f"bon:n={n}" for n in levels] + ["cards:value=v:beta=1", "cards:value=v:beta=2"]
    summary = summarize(records, labels, "bon:n=1")
    front = summary["frontier"]
    assert front["targets"]["Best-of-8"] == pytest.approx(0.41)
    bon, cards = front["curves"]["bon"], front["curves"]["cards (value=v)"]
    assert bon["Best-of-8 decode_tokens"] == pytest.approx(800)
    # between its beta=2 point (100 tokens, 0.22) and its beta=1 point (200, 0.42), log-linearly
    assert cards["Best-of-8 decode_tokens"] == pytest.approx(100 * 2 ** 0.95)
    assert cards["Best-of-32 decode_tokens"] is None
    assert "| cards (value=v) | 0.420 | 193 (0.24x)" in summary_markdown(summary)
    written = write_plots(tmp_path, records, summary)
    assert {p.name for p in written} >= {"frontier_tokens.png", "frontier_time.png"}
