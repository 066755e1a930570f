"""`decalign generate --input --ray`: Ray Data actor pools give the single-process job's answers,
resume like it, and survive a worker that dies mid-batch without losing or repeating a record."""

from __future__ import annotations

import importlib.util
import json

import pytest

from decalign.errors import DecalignError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install 'decalign[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    yield ray
    ray.shutdown()


def write_records(path, prompts):
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def read_by_id(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["id"]: row for row in rows}, len(rows)


PROMPTS = ["hi", "The answer is", "bread", "Paris is", "hello there", "The quick brown fox", "Numbers:", "Be kind",
           "I hate this", "Berlin is", "flour and water", "42"]


def request(tiny_path, **kw):
    from decalign.request import Request

    options = dict(method="bon", params={"n": 2}, model=str(tiny_path), reward="length:target=20", max_new_tokens=8,
                   seed=5, batch_size=3)
    return Request.from_options(**{**options, **kw})


def test_ray_job_answers_as_the_single_process_job_and_resumes(local_ray, tiny_path, tmp_path):
    from decalign.batch_job import run_batch
    from decalign.ray_job import run_batch_ray

    source = write_records(tmp_path / "in.jsonl", PROMPTS)
    run_batch(source, tmp_path / "one.jsonl", request(tiny_path))
    # a job killed after 4 records: the rerun on Ray answers only the other 8
    one, _ = read_by_id(tmp_path / "one.jsonl")
    (tmp_path / "ray.jsonl").write_text("".join(json.dumps(one[i]) + "\n" for i in range(4)))
    (tmp_path / "ray.jsonl.config.json").write_text((tmp_path / "one.jsonl.config.json").read_text())  # the job's
    run_batch_ray(source, tmp_path / "ray.jsonl", request(tiny_path), replicas=2)
    answers, count = read_by_id(tmp_path / "ray.jsonl")
    assert count == len(PROMPTS) and sorted(answers) == list(range(len(PROMPTS)))
    for i in range(len(PROMPTS)):
        assert answers[i]["tokens"] == one[i]["tokens"] and answers[i]["text"] == one[i]["text"], i
        assert answers[i]["reward"] == pytest.approx(one[i]["reward"])


def test_a_replica_that_dies_mid_batch_is_retried_nothing_lost_or_repeated(local_ray, tiny_path, tmp_path):
    from decalign.ray_job import run_batch_ray

    prompts = list(PROMPTS)
    prompts[5] = f"crash here CRASH:{tmp_path / 'crashed'} now"
    source = write_records(tmp_path / "in.jsonl", prompts)
    run_batch_ray(source, tmp_path / "out.jsonl", request(tiny_path, reward="python:decalign.testing:crash_once_reward"),
                  replicas=2)
    assert (tmp_path / "crashed").exists()  # a replica did die
    answers, count = read_by_id(tmp_path / "out.jsonl")
    assert count == len(prompts) and sorted(answers) == list(range(len(prompts)))


def test_bad_records_are_named_after_the_others_are_written(local_ray, engine, tiny_path, tmp_path):
    from decalign.ray_job import run_batch_ray

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n" + json.dumps({"id": "b", "prompt": "x " * 5000})
                      + "\n" + json.dumps({"id": "c", "prompt": "bread"}) + "\n{broken\n")
    with pytest.raises(DecalignError, match=r"line 2: the prompt has \d+ tokens"):
        run_batch_ray(source, tmp_path / "out.jsonl", request(tiny_path), replicas=1)
    answers, count = read_by_id(tmp_path / "out.jsonl")
    assert sorted(answers) == ["a", "c"] and count == 2
    with pytest.raises(DecalignError, match="--replicas must be >= 1"):
        run_batch_ray(source, tmp_path / "out.jsonl", request(tiny_path), replicas=0)
    source.write_text(json.dumps({"id": "d", "prompt": "hi"}) + "\n")
    with pytest.raises(DecalignError, match="give the model as a name or path"):
        run_batch_ray(source, tmp_path / "out.jsonl", request(tiny_path).with_prompts(None, model=engine), replicas=1)


def test_value_rollouts_on_ray_are_the_single_process_samples(local_ray, engine, tiny_path, tmp_path):
    from decalign.records import load_output
    from decalign.rewards import load_reward
    from decalign.values.sampling import sample_answers

    items = [(i, p) for i, p in enumerate(PROMPTS[:6])]
    common = dict(n=3, max_new_tokens=6, temperature=1.0, top_k=0, seed=2, batch_size=4, progress=False)
    reward = load_reward("length:target=10")
    one = sample_answers(engine, reward, items, tmp_path / "one" / "samples.jsonl", **common)
    on_ray = sample_answers(engine, reward, items, tmp_path / "ray" / "samples.jsonl", ray={"replicas": 2},
                            ray_reward="length:target=10", **common)
    by_id = {r["id"]: r for r in on_ray}
    assert sorted(by_id) == [i for i, _ in items] and len(on_ray) == len(items)
    assert [by_id[r["id"]] for r in one] == one  # token for token, reward for reward
    _, written = load_output(tmp_path / "ray" / "samples.jsonl")
    assert len(written) == len(items)


def test_bench_on_ray_writes_the_single_process_records_and_resumes(local_ray, tiny_path, tmp_path):
    """Every method's answers, rewards and judge scores equal one process's; a killed run resumes."""
    from decalign.bench import run_bench

    source = write_records(tmp_path / "prompts.jsonl", PROMPTS[:6])
    options = dict(methods="greedy,bon:n=2,cards:tau_u=1.0:proposals=2", prompts=source, reward="length:target=20",
                   judge="length:target=10", model=str(tiny_path), max_new_tokens=8, batch_size=4, progress=False)
    one = run_bench(out=tmp_path / "one", **options)
    first = (tmp_path / "one" / "records.jsonl").read_text().splitlines()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "records.jsonl").write_text("".join(line + "\n" for line in first[:5]))
    (tmp_path / "ray" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    on_ray = run_bench(out=tmp_path / "ray", ray={"replicas": 2, "address": None}, **options)
    key = lambda r: (r["method"], r["id"])  # noqa: E731
    mine = {key(r): r for r in map(json.loads, first)}
    rows = [json.loads(line) for line in (tmp_path / "ray" / "records.jsonl").read_text().splitlines()]
    assert len(rows) == len(mine) == 18 and {key(r) for r in rows} == set(mine)
    for row in rows:
        for field in ("text", "tokens", "reward", "judge", "finish_reason", "params"):
            assert row[field] == mine[key(row)][field], (key(row), field)
    for label, figures in one["methods"].items():
        assert on_ray["methods"][label]["reward"] == figures["reward"]
        assert on_ray["methods"][label]["decode_tokens"] == figures["decode_tokens"]
    assert "on Ray, 2 replicas" in on_ray["header"]


def test_what_cannot_run_on_ray_is_refused_before_ray_starts(tiny_path, tmp_path):
    """An empty input (it returned without a word and left a config file) and a request whose reward
    cannot travel to the replicas (Ray's long serialisation dump, after starting) are one-line errors
    before any replica starts, leaving no output behind."""
    import threading

    from decalign.ray_job import run_batch_ray

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DecalignError, match="empty.jsonl holds no prompts"):
        run_batch_ray(empty, tmp_path / "out.jsonl", request(tiny_path))

    class Locked:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, prompts, responses):
            return [float(len(r)) for r in responses]

    prompts = write_records(tmp_path / "in.jsonl", PROMPTS[:2])
    with pytest.raises(DecalignError, match="cannot pickle '_thread.lock'"):
        run_batch_ray(prompts, tmp_path / "out.jsonl", request(tiny_path, reward=Locked()))
    assert list(tmp_path.glob("out.jsonl*")) == []


def test_a_cluster_or_model_the_replicas_cannot_reach_is_refused_before_ray_starts(tiny_path, tmp_path, monkeypatch):
    """A --ray-address nothing answers at (Ray retried it for minutes, printing core warnings), one
    that is not an address (an 'unexpected ValueError'), and a model the replicas could not load (a
    Ray traceback dump from every replica) are one-line errors before Ray starts, leaving no output."""
    import socket

    from decalign.ray_job import run_batch_ray

    prompts = write_records(tmp_path / "in.jsonl", PROMPTS[:2])
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DecalignError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        run_batch_ray(prompts, tmp_path / "out.jsonl", request(tiny_path), address=f"127.0.0.1:{port}")
    with pytest.raises(DecalignError, match="--ray-address must be HOST:PORT"):
        run_batch_ray(prompts, tmp_path / "out.jsonl", request(tiny_path), address="garbage")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the hub id below: the cache alone
    with pytest.raises(DecalignError, match="cannot load model 'nobody/no-such-model'"):
        run_batch_ray(prompts, tmp_path / "out.jsonl", request(tiny_path, model="nobody/no-such-model"))
    assert list(tmp_path.glob("out.jsonl*")) == []
