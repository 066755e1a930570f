"""decalign serve: the real `openai` client against a server on a free loopback port, tiny model."""

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(engine, **options):
    import uvicorn

    from decalign.server import ServerConfig, create_app

    config = ServerConfig(**{"model_name": "tiny", "max_tokens_limit": 64, **options})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(engine):
    server, url = start(engine, reward="sentiment")
    yield url
    server.should_exit = True


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_matches_the_library(client, engine):
    from decalign import generate

    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           temperature=0)
    (expected,) = generate([[{"role": "user", "content": "hi"}]], model=engine, max_new_tokens=8)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.prompt_tokens == len(engine.render("hi"))
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.model_extra["alignment"]["method"] == "greedy"


def test_openai_sampling_fields_mean_what_they_mean_there(client, engine):
    """With no method named, temperature > 0 (1 unless given) samples and 0 is greedy; a seed makes a
    sample repeatable; n asks for independent answers, the first of them the n = 1 answer."""
    from decalign import generate

    messages = [{"role": "user", "content": "hi"}]
    one = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=7, temperature=0.9)
    (expected,) = generate([messages], method="sample", model=engine, max_new_tokens=8, seed=[7], temperature=0.9)
    assert one.choices[0].message.content == expected.text and one.model_extra["alignment"]["method"] == "sample"
    several = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=7, temperature=0.9,
                                             n=4)
    texts = [choice.message.content for choice in several.choices]
    assert [choice.index for choice in several.choices] == [0, 1, 2, 3]
    assert texts[0] == expected.text and len(set(texts)) > 1
    assert several.usage.completion_tokens > one.usage.completion_tokens
    unseeded = {client.chat.completions.create(model="tiny", messages=messages, max_tokens=8).choices[0].message.content
                for _ in range(3)}
    assert len(unseeded) > 1  # OpenAI's default temperature is 1: it samples
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=7,
                                                 temperature=0.9, n=4, stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(4)]
    assert streamed == texts


def test_logprobs_are_the_policys_log_probabilities_of_the_answer(client, engine):
    from decalign import generate

    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=3, temperature=0.8,
                                           logprobs=True)
    (expected,) = generate([messages], method="sample", model=engine, max_new_tokens=6, seed=[3], temperature=0.8)
    content = reply.choices[0].logprobs.content
    assert [item.logprob for item in content] == pytest.approx(expected.logprobs)
    assert "".join(item.token for item in content) == engine.tokenizer.decode(expected.tokens)
    assert all(item.logprob <= 0 and item.top_logprobs == [] for item in content)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=3, temperature=0.8)
    assert plain.choices[0].logprobs is None


def test_top_logprobs_list_the_policys_most_likely_tokens_at_each_position(client, engine):
    """Greedy's token is the first of its position's list, with its own log-probability; each list is
    the policy's k largest, in order, and a sampled answer's token is listed whenever it is among them."""
    import math

    messages = [{"role": "user", "content": "hi"}]
    for temperature in (0, 1.0):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=5,
                                               temperature=temperature, logprobs=True, top_logprobs=4)
        content = reply.choices[0].logprobs.content
        assert len(content) == reply.usage.completion_tokens
        for item in content:
            values = [alt.logprob for alt in item.top_logprobs]
            assert len(values) == 4 and values == sorted(values, reverse=True)
            assert sum(math.exp(v) for v in values) <= 1 + 1e-5
            same_text = [alt.logprob for alt in item.top_logprobs if alt.token == item.token]  # ids can share a text
            if temperature == 0:
                assert item.top_logprobs[0].token == item.token
                assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
            if any(abs(lp - item.logprob) < 1e-4 for lp in same_text):
                continue
            assert item.logprob < values[-1] + 1e-4  # not listed: less likely than the k listed


def test_streamed_logprobs_equal_the_unstreamed_ones(client):
    """With stream=true the text still grows chunk by chunk, and each choice's logprobs (top ones too)
    arrive whole once its answer is final: the same figures as without streaming, for chat and completions."""
    request = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, seed=4, temperature=0.9,
                   n=2, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(stream=True, **request))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        streamed = [item for c in mine if c.logprobs for item in c.logprobs.content]
        assert [(i.token, i.logprob, [(t.token, t.logprob) for t in i.top_logprobs]) for i in streamed] == \
            [(i.token, i.logprob, [(t.token, t.logprob) for t in i.top_logprobs]) for i in choice.logprobs.content]
        assert sum(1 for c in mine if c.logprobs) == 1
    legacy = dict(model="tiny", prompt="The answer is", max_tokens=5, temperature=0, logprobs=2)
    whole = client.completions.create(**legacy).choices[0].logprobs
    pieces = [c.choices[0].logprobs for c in client.completions.create(stream=True, **legacy) if c.choices and c.choices[0].logprobs]
    assert len(pieces) == 1 and pieces[0] == whole


def test_completions_give_the_legacy_logprobs_shape(client, engine):
    from decalign import generate

    reply = client.completions.create(model="tiny", prompt="The answer is", max_tokens=5, temperature=0, logprobs=2)
    (expected,) = generate(["The answer is"], method="greedy", model=engine, max_new_tokens=5, chat=False)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs)
    assert "".join(logprobs.tokens) == engine.tokenizer.decode(expected.tokens)
    assert logprobs.text_offset[0] == len("The answer is")
    assert all(b - a == len(t) for a, b, t in zip(logprobs.text_offset, logprobs.text_offset[1:], logprobs.tokens))
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp, abs=1e-4)  # greedy: its token is the best
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    bare = client.completions.create(model="tiny", prompt="The answer is", max_tokens=5, temperature=0, logprobs=0)
    assert bare.choices[0].logprobs.top_logprobs is None
    assert bare.choices[0].logprobs.token_logprobs == pytest.approx(expected.logprobs)


def test_a_list_of_prompts_gets_each_prompts_own_answers_in_openais_order(client, served):
    """/v1/completions with several prompts (a batch, as lm-eval's local-completions sends): choice
    i * n + j is prompt i's answer j, the one it gets alone with the same seed; usage counts each
    prompt once; streamed the same; legacy logprobs' offsets start at each choice's own prompt's end."""
    prompts = ["The answer is", "hi", "Tell me about bread"]
    common = dict(model="tiny", max_tokens=6, seed=4, temperature=0.9, n=2)
    batch = client.completions.create(prompt=prompts, logprobs=1, **common)
    alone = [client.completions.create(prompt=p, logprobs=1, **common) for p in prompts]
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [c.text for reply in alone for c in reply.choices]
    assert batch.usage.prompt_tokens == sum(reply.usage.prompt_tokens for reply in alone)
    assert batch.usage.completion_tokens == sum(reply.usage.completion_tokens for reply in alone)
    for i, choice in enumerate(batch.choices):
        if choice.logprobs.text_offset:
            assert choice.logprobs.text_offset[0] == len(prompts[i // 2])
    streamed = {}
    for chunk in client.completions.create(prompt=prompts, stream=True, **common):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(6)] == [c.text for c in batch.choices]
    for body, fragment in [({"prompt": [1, 2, 3]}, "token ids are not taken"),
                           ({"prompt": ["hi"] * 33}, "a list of 1 to 32 strings"),
                           ({"prompt": ["hi", "x " * 600]}, "prompt 1: ")]:
        reply = httpx.post(served + "/v1/completions", json={"max_tokens": 4, **body}, timeout=30)
        assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text


def test_completion_uses_raw_text(client, engine):
    from decalign import generate

    reply = client.completions.create(model="tiny", prompt="The answer is", max_tokens=6, temperature=0)
    (expected,) = generate("The answer is", model=engine, max_new_tokens=6, chat=False)
    assert reply.choices[0].text == expected.text
    assert reply.object == "text_completion"


def test_streaming_chunks_add_up_to_the_answer(client):
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "bread"}],
                                           max_tokens=10, seed=5)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "bread"}],
                                                 max_tokens=10, stream=True, seed=5))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_stream_options_include_usage_puts_usage_in_a_last_chunk_of_its_own(client, route):
    """OpenAI's stream_options.include_usage: the usage comes once, in a last chunk with no choices
    (clients that sum usage over chunks, such as LangChain's, count it once)."""
    if route == "chat":
        create, common = client.chat.completions.create, dict(messages=[{"role": "user", "content": "bread"}])
    else:
        create, common = client.completions.create, dict(prompt="bread")
    common.update(model="tiny", max_tokens=10, seed=5, n=2, temperature=0.9)
    plain = create(**common)
    chunks = list(create(**common, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert {c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason} == {0, 1}


def test_logprobs_list_the_tokens_of_the_text_without_the_end_token(engine):
    """An answer ended by end-of-text: its logprobs' tokens join to its text, in both routes' shapes
    (the end token, which has no text, was listed last)."""
    from decalign.result import Result
    from decalign.server.app import completion_logprobs, token_logprobs

    words = engine.tokenizer.encode("hello there", add_special_tokens=False)
    tokens = [*words, min(engine.eos_ids)]
    result = Result(text=engine.decode(words), tokens=tokens, reward=None, stats={}, method="greedy",
                    finish_reason="eos", logprobs=[-0.5] * len(tokens))
    top = [[(t, -0.5)] for t in tokens]
    chat = token_logprobs(engine, result, top)
    assert "".join(t.token for t in chat.content) == result.text and len(chat.content) == len(words)
    legacy = completion_logprobs(engine, result, top, offset=3)
    assert "".join(legacy.tokens) == result.text
    assert len(legacy.token_logprobs) == len(legacy.top_logprobs) == len(legacy.text_offset) == len(words)


def test_text_content_parts_are_one_message_and_others_are_refused(client):
    """OpenAI's list-of-parts content: text parts are the message's text, one per line (as vLLM
    joins them); an image part gets a 400 naming the message."""
    def ask(content):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=6, temperature=0)

    parts = ask([{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}])
    assert parts.choices[0].message.content == ask("hi\nthere").choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="message 0: only text content parts are supported, got image_url"):
        ask([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])


@pytest.mark.parametrize("fields, param, fragment", [
    (dict(max_completion_tokens=-1), "max_completion_tokens", "max_completion_tokens must be a positive integer"),
    (dict(max_completion_tokens=1000), "max_completion_tokens", "max_completion_tokens 1000 is over"),
    (dict(stream_options={"include_usage": True}), "stream_options", "only allowed with stream=true"),
    (dict(stream=True, stream_options={"include_usage": "yes"}), "stream_options", "must be an object"),
    (dict(top_p=1.5), "top_p", "top_p must be in (0, 1]"),  # a method's own check, named as OpenAI's field
    (dict(temperature=2.5), "temperature", "temperature must be between 0 and 2, got 2.5"),  # OpenAI's range
    (dict(alignment={"method": "bon", "n": 0}), "alignment.n", "n must be >= 1"),
    (dict(alignment={"method": "sample", "top_p": 0}), "alignment.top_p", "top_p must be in (0, 1]"),
])
def test_errors_name_the_openai_field_that_is_wrong(served, fields, param, fragment):
    reply = httpx.post(served + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and fragment in error["message"], error


def test_openai_fields_it_does_not_honour_are_refused_unless_left_at_their_defaults(client):
    """An answer that ignored tools, a JSON format or a penalty would be wrong without saying so; the
    same fields at their defaults, as clients send them, change nothing."""
    messages = [{"role": "user", "content": "hi"}]
    refused = [(dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
               (dict(response_format={"type": "json_object"}), "response_format"),
               (dict(presence_penalty=0.5), "presence_penalty"), (dict(frequency_penalty=-1), "frequency_penalty"),
               (dict(logit_bias={"5": 10}), "logit_bias"), (dict(tool_choice="required"), "tool_choice")]
    for fields, name in refused:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **fields)
        error = info.value.response.json()["error"]
        assert error["param"] == name and error["message"].startswith(f"{name} is not supported"), error
    with pytest.raises(openai.BadRequestError, match="alignment"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, best_of=3)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    defaults = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                              presence_penalty=0, frequency_penalty=0, logit_bias={},
                                              response_format={"type": "text"}, tool_choice="none")
    assert defaults.choices[0].message.content == plain.choices[0].message.content


def test_cards_streams_segments(client):
    body = {"alignment": {"method": "cards", "tau_u": 1.0, "r_star": 0.2, "min_segment": 2}}
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=24, stream=True, seed=3, extra_body=body))
    final = chunks[-1].model_extra["alignment"]
    assert final["method"] == "cards" and final["stats"]["segments"] >= 1
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 1


def test_smc_streams_the_prefix_its_particles_agree_on(client):
    body = {"alignment": {"method": "smc", "reward": "length:target=200:unit=chars", "budget": 6, "block": 2,
                          "beta": 0.001, "ess_threshold": 1.0}}
    request = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=24, seed=3, extra_body=body)
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **request))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole
    assert len(pieces) >= 3 and chunks[-1].model_extra["alignment"]["stats"]["resamples"] >= 5


def test_extra_body_chooses_the_method(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           seed=1, extra_body={"alignment": {"method": "bon", "n": 3}})
    info = reply.model_extra["alignment"]
    assert info["method"] == "bon" and info["params"] == {"n": 3}
    assert info["stats"]["reward_calls"] == 3 and info["reward"] is not None


def test_metrics_count_the_partial_answers_a_prefix_value_scored(client, served, tiny_path, tmp_path):
    """`decalign_value_calls_total` adds up each answer's value_calls, as the reward calls are added
    (the serving issue's "reward and value calls"); a value costs no reward call for a partial answer."""
    from decalign.values.train import train_value

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {word} {i}."}) + "\n"
                               for i in range(3) for word in ("kind", "sad", "odd", "new")))
    train_value(prompts=prompts, reward_spec="sentiment", out=tmp_path / "value", model=str(tiny_path), n=3,
                max_new_tokens=8, temperature=1.0, top_k=0, batch_size=12, validation=0.25, progress=False,
                log=lambda line: None)
    before = metric_total(served, "decalign_value_calls_total")
    body = {"alignment": {"method": "blockwise", "value": str(tmp_path / "value"), "budget": 3, "block": 2}}
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, seed=1, extra_body=body)
    stats = reply.model_extra["alignment"]["stats"]
    assert stats["value_calls"] > 0
    assert metric_total(served, "decalign_value_calls_total") - before == stats["value_calls"]


@pytest.mark.parametrize("kwargs, status, fragment", [
    (dict(extra_body={"alignment": {"method": "nope"}}), 400, "unknown method 'nope'"),
    (dict(extra_body={"alignment": {"method": "bon", "m": 2}}), 400, "bon has no parameter m"),
    (dict(extra_body={"alignment": {"method": "bon", "reward": "nope"}}), 400, "unknown reward"),
    (dict(max_tokens=1000), 400, "over this server's limit of 64"),
    (dict(messages=[]), 400, "messages must be a non-empty list"),
    (dict(messages=[{"role": "user", "content": ""}]), 400, "empty prompt"),
    (dict(messages=[{"role": "usr", "content": "hi"}]), 400, "message 0 has role 'usr'; roles are system, developer"),
    (dict(n=0), 400, "n must be an integer from 1 to 16"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_logprobs=3), 400, "top_logprobs needs logprobs=true"),
    (dict(logprobs=True, top_logprobs=21), 400, "top_logprobs must be an integer from 0 to 20"),
    (dict(max_tokens=True), 400, "max_tokens must be a positive integer"),
    (dict(seed=True), 400, "seed must be an integer"),
    (dict(extra_body={"min_tokens": 8}), 400, "min_tokens must be from 0 to the answer's maximum length (4 tokens)"),
    (dict(extra_body={"min_tokens": -1}), 400, "min_tokens must be a non-negative integer"),
    (dict(extra_body={"stream": "false"}), 400, "stream must be true or false"),
])
def test_bad_requests_get_clear_4xx(client, kwargs, status, fragment):
    request = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    request.update(kwargs)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    assert fragment in info.value.response.json()["error"]["message"]


def test_committed_text_holds_back_what_later_tokens_can_change():
    from decalign.server.app import committed

    assert committed("Hello wor", ()) == "Hello wor"
    assert committed("Smile \ufffd", ()) == "Smile "  # a multi-byte character still arriving
    assert committed("a \ufffd b", ()) == "a \ufffd b"  # a settled replacement character stays
    assert committed("The waves of the oc", ("ocean, a",)) == "The waves of the "
    assert committed("say aa", ("aab", "x")) == "say "
    assert committed("say ab", ("aab",)) == "say ab"
    assert committed("done.", (".",)) == "done."  # a one-character stop is cut, never pending


def test_streamed_text_with_a_stop_string_adds_up_to_the_answer(client):
    """A stop string that starts mid-answer: the stream must not send the text it later cuts."""
    request = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0)
    full = client.chat.completions.create(**request).choices[0].message.content
    for stop in (full[4:12], full[9:16]):
        whole = client.chat.completions.create(stop=stop, **request).choices[0].message.content
        chunks = client.chat.completions.create(stop=stop, stream=True, **request)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole and len(whole) < len(full)


def test_max_completion_tokens_null_leaves_max_tokens_standing(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           temperature=0, extra_body={"max_completion_tokens": None})
    assert reply.usage.completion_tokens <= 3


def test_a_request_without_max_tokens_gets_the_default_capped_by_the_limit(client):
    """The served limit (64) is below the default answer length (128): a request that names no
    length is answered within the limit, not refused for a length it never asked for."""
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert 1 <= reply.usage.completion_tokens <= 64


@pytest.mark.parametrize("options, fragment", [
    (dict(max_batch=0), "max_batch (--max-batch) must be >= 1, got 0"),
    (dict(default_max_tokens=0), "default_max_tokens must be >= 1"),
    (dict(timeout=0), "timeout (--timeout) must be > 0"),
    (dict(batching="waves"), "batching (--batching) must be one of continuous, static, grouped, got 'waves'"),
    (dict(admission="fifo"), "admission (--admission) must be one of shortest, arrival"),
    (dict(join="later"), "join (--join) must be one of in-step, own-pass, got 'later'"),
    (dict(max_join_tokens=0), "max_join_tokens (--max-join-tokens) must be >= 1, got 0"),
])
def test_server_settings_are_checked_in_python_too(options, fragment):
    from decalign.errors import DecalignError
    from decalign.server import ServerConfig

    with pytest.raises(DecalignError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig(**options)


def test_malformed_json_and_unknown_route(served):
    reply = httpx.post(served + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    deep = httpx.post(served + "/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=10)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    for route, body in (("chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
                        ("completions", b'{"prompt": "hi \\ud800"}')):  # JSON escapes make a lone surrogate
        reply = httpx.post(f"{served}/v1/{route}", content=body, timeout=10)
        assert reply.status_code == 400 and "not valid Unicode text" in reply.json()["error"]["message"]
    assert httpx.get(served + "/v1/nothing", timeout=10).status_code == 404


def test_models_health_metrics(client, served):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(served + "/health", timeout=10).json()["status"] == "ok"
    joined = metric_total(served, "decalign_request_queue_seconds_count")
    greedy_first = 'decalign_time_to_first_token_seconds_count{method="greedy"}'
    streamed = metric_total(served, greedy_first)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        temperature=0, stream=True))
    text = httpx.get(served + "/metrics", timeout=10).text
    assert 'decalign_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "decalign_queue_depth 0" in text
    assert metric_total(served, "decalign_request_queue_seconds_count") == joined + 2
    assert metric_total(served, greedy_first) == streamed + 1  # a time to first token per method


def test_methods_endpoint_serves_the_parameters_help(served):
    from decalign.methods import METHODS

    listing = httpx.get(served + "/v1/methods", timeout=10).json()
    assert sorted(listing["methods"]) == sorted(METHODS)
    value = listing["methods"]["cards"]["parameters"]["value"]
    assert value["default"] is None and "prefix value" in value["help"]
    assert listing["methods"]["bon"]["needs_reward"] and listing["default"]["method"] is None


def test_api_key_is_required_when_set(engine):
    server, url = start(engine, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
    finally:
        server.should_exit = True


def test_concurrent_requests_share_steps_and_a_full_queue_says_429(engine):
    server, url = start(engine, queue_size=2, max_batch=8)
    try:
        replies = []

        def ask(i):
            replies.append(httpx.post(url + "/v1/chat/completions", timeout=60,
                                      json={"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = [reply.status_code for reply in replies]
        assert set(statuses) <= {200, 429} and 200 in statuses
        tokens = sum(reply.json()["usage"]["completion_tokens"] for reply in replies if reply.status_code == 200)
        assert steps_total(url) < tokens or statuses.count(200) == 1  # requests in flight together shared steps
        if 429 in statuses:
            reply = httpx.post(url + "/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
            assert reply.status_code in (200, 429)
    finally:
        server.should_exit = True


def test_the_queue_bound_holds_while_the_engine_is_busy(engine):
    """Requests that cannot join the running batch stay queued, so a full queue answers 429 even
    while the engine is decoding (a request leaves the queue only when it joins the batch)."""
    server, url = start(engine, queue_size=2, max_batch=1, max_tokens_limit=200)
    try:
        long = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0}))
        long.start()
        wait_until(lambda: running_requests(url) >= 1, "the long answer to start")
        statuses = concurrently(lambda i: httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": f"hi {i}", "max_tokens": 2}).status_code, list(range(5)))
        long.join()
        assert statuses.count(429) >= 2 and statuses.count(200) >= 1, statuses
    finally:
        server.should_exit = True


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_hangs_up_stops_its_work(engine, streamed):
    """Streaming or not, a request whose client hangs up stops its rows at the next step (a
    non-streaming one ran to its end while the server's middleware hid the disconnect)."""
    server, url = start(engine, max_tokens_limit=200)
    try:
        request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0}
        started = time.perf_counter()
        full = httpx.post(url + "/v1/chat/completions", json=request, timeout=60).json()
        took = time.perf_counter() - started
        assert full["usage"]["completion_tokens"] > 100  # left alone, this answer is long
        if streamed:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                              json={**request, "stream": True}) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: ") and "content" in line:
                        break  # hang up after the first token
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url + "/v1/chat/completions", json=request, timeout=min(0.1, took / 10))
        time.sleep(max(1.0, took))
        metrics = httpx.get(url + "/metrics", timeout=10).text
        tokens = int(float(next(line.split()[-1] for line in metrics.splitlines()
                                if line.startswith("decalign_generated_tokens_total"))))
        assert tokens - full["usage"]["completion_tokens"] < full["usage"]["completion_tokens"] / 2
        if not streamed:
            assert 'decalign_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in metrics
    finally:
        server.should_exit = True


def test_an_unexpected_error_is_a_counted_500_without_a_traceback(engine, monkeypatch, caplog):
    from decalign.server import app as app_module

    def broken(**kwargs):
        raise TypeError("a bug")

    server, url = start(engine)
    try:
        monkeypatch.setattr(app_module, "ModelList", broken)
        with caplog.at_level("ERROR"):
            reply = httpx.get(url + "/v1/models", timeout=10)
        assert reply.status_code == 500 and reply.json()["error"]["message"] == "internal error: TypeError"
        assert "Traceback" not in caplog.text and "internal error on GET /v1/models: TypeError: a bug" in caplog.text
        httpx.get(url + "/v1/no/such/route", timeout=10)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'decalign_requests_total{endpoint="/v1/models",status="500"} 1.0' in metrics
        assert 'endpoint="other",status="404"' in metrics and "/v1/no/such/route" not in metrics
    finally:
        server.should_exit = True


def test_a_prompt_over_the_context_is_a_400_streamed_or_not(served):
    """The prompt's length is checked before the request waits in line: a streamed request gets its
    400 before the stream begins (it used to get a 200 stream holding an error event)."""
    body = {"messages": [{"role": "user", "content": "The quick brown fox. " * 200}], "max_tokens": 4}
    for stream in (False, True):
        reply = httpx.post(served + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert reply.status_code == 400 and "the model's context is 512" in reply.json()["error"]["message"]


def test_a_failed_step_answers_500_and_leaves_one_log_line(engine, monkeypatch, caplog):
    """When a decoding step itself fails, every running request gets a 500 in OpenAI's shape, the
    log gets one line naming the error (no traceback), and the server goes on answering."""
    from decalign.methods import Driver

    server, url = start(engine)
    try:
        def broken(self):
            raise RuntimeError("the step broke")

        monkeypatch.setattr(Driver, "step", broken)
        with caplog.at_level("ERROR"):
            reply = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert reply.status_code == 500 and reply.json()["error"]["message"] == "decoding failed: RuntimeError"
        assert "decoding step failed: RuntimeError: the step broke" in caplog.text and "Traceback" not in caplog.text
        monkeypatch.undo()
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30).status_code == 200
    finally:
        server.should_exit = True


def test_requests_of_different_methods_share_a_batch(engine):
    """A greedy, a Best-of-N and a CARDS request that arrive together are decoded in one batch (fewer
    steps than one after another), and each answers as it does alone."""
    server, url = start(engine, max_batch=8)
    bodies = [
        {"max_tokens": 6, "temperature": 0},
        {"max_tokens": 8, "seed": 2, "alignment": {"method": "bon", "n": 3, "reward": "sentiment"}},
        {"max_tokens": 10, "seed": 3, "alignment": {"method": "cards", "reward": "sentiment", "max_retries": 2}},
    ]
    try:
        def ask(body):
            return httpx.post(url + "/v1/completions", timeout=60, json={"prompt": "The answer is", **body}).json()

        before = steps_total(url)
        alone = [ask(body) for body in bodies]
        steps_alone, before = steps_total(url) - before, steps_total(url)
        together = concurrently(ask, bodies)
        assert steps_total(url) - before < steps_alone
        assert [a["choices"][0]["text"] for a in together] == [a["choices"][0]["text"] for a in alone]
        assert [a["alignment"]["method"] for a in together] == ["greedy", "bon", "cards"]
    finally:
        server.should_exit = True


@pytest.mark.parametrize("join", ["in-step", "own-pass"])
def test_a_short_request_is_not_held_back_by_a_long_one(engine, join):
    """Continuous batching: a request that arrives while a long answer is being written joins the
    running batch (its prompt encoded in the next step's pass, or at once in its own), answers
    exactly as it does alone, and is back before the long one ends."""
    server, url = start(engine, max_tokens_limit=200, join=join)
    long_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0}  # long
    short_body = {"prompt": "The answer is", "max_tokens": 6, "seed": 4,
                  "alignment": {"method": "bon", "n": 2, "reward": "sentiment"}}
    try:
        def post(body):
            endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            return httpx.post(url + endpoint, timeout=60, json=body).json()

        short_alone = post(short_body)
        finished = {}

        def ask(name, body):
            finished[name] = (post(body), time.monotonic())

        long_thread = threading.Thread(target=ask, args=("long", long_body))
        long_thread.start()
        wait_until(lambda: running_requests(url) >= 1, "the long answer to start")
        ask("short", short_body)
        long_thread.join()
        assert finished["short"][0]["choices"][0]["text"] == short_alone["choices"][0]["text"]
        assert finished["long"][0]["usage"]["completion_tokens"] > 100
        assert finished["short"][1] < finished["long"][1]
    finally:
        server.should_exit = True


@pytest.mark.parametrize("admission, order", [("shortest", ["small 1", "big", "small 2"]),
                                              ("arrival", ["big", "small 1", "small 2"])])
def test_admission_takes_the_cheapest_first_but_overtakes_a_request_at_most_max_batch_times(engine, admission, order,
                                                                                           held_steps):
    """With one request at a time: behind a running long answer wait a Best-of-4 (four rows of 40
    tokens), then two greedy answers of 4 tokens. Shortest-first lets the first small one go ahead;
    the Best-of-4, overtaken once (max_batch), then goes before the second. First come, first
    served keeps arrival order."""
    server, url = start(engine, max_batch=1, max_tokens_limit=200, admission=admission)
    queued = {"big": {"max_tokens": 40, "seed": 1, "alignment": {"method": "bon", "n": 4, "reward": "sentiment"}},
              "small 1": {"max_tokens": 4, "temperature": 0}, "small 2": {"max_tokens": 4, "temperature": 0}}
    try:
        finished = finish_order(url, held_steps, {"max_tokens": 20, "temperature": 0}, queued)
        assert finished == ["running", *order]
        assert metric_total(url, "decalign_request_queue_seconds_count") == 4  # each timed once, as it joined
    finally:
        held_steps.set()
        server.should_exit = True


def finish_order(url: str, held_steps, running: dict, queued: dict[str, dict]) -> list[str]:
    """With the engine's steps held: start the request `running`, queue the `queued` ones in their
    order behind it, then let the engine run; the order in which their answers came back."""
    finished = []

    def ask(name, body):
        reply = httpx.post(url + "/v1/completions", timeout=120, json={"prompt": "The answer is", **body})
        assert reply.status_code == 200, reply.text
        finished.append(name)

    threads = [threading.Thread(target=ask, args=("running", running))]
    threads[0].start()
    wait_until(lambda: running_requests(url) == 1, "the first answer to start")
    for depth, (name, body) in enumerate(queued.items(), start=1):
        threads.append(threading.Thread(target=ask, args=(name, body)))
        threads[-1].start()
        wait_until(lambda: metric(url, "decalign_queue_depth") == depth, f"{depth} queued requests")
    held_steps.set()
    for thread in threads:
        thread.join()
    return finished


@pytest.mark.parametrize("budget_in_prompts, joined_per_step", [(2, [2, 1]), (0, [1, 1, 1])])
def test_a_burst_joins_over_several_steps_within_the_prompt_token_budget(engine, held_steps, budget_in_prompts,
                                                                         joined_per_step):
    """Continuous batching: three requests queued behind a running answer join at most
    --max-join-tokens of prompt at a step (two prompts' worth: two, then one), so a burst's prefill
    is spread over steps; a prompt longer than the budget still joins, alone."""
    prompt_tokens = len(engine.render("The answer is", chat=False))
    server, url = start(engine, max_batch=8, max_tokens_limit=200,
                        max_join_tokens=max(1, budget_in_prompts * prompt_tokens))

    def ask(body):
        reply = httpx.post(url + "/v1/completions", timeout=120, json={"prompt": "The answer is", **body})
        assert reply.status_code == 200, reply.text

    threads = [threading.Thread(target=ask, args=({"max_tokens": 200, "temperature": 0},))]
    try:
        threads[0].start()
        wait_until(lambda: running_requests(url) == 1, "the first answer to start")
        for depth in range(1, 4):
            threads.append(threading.Thread(target=ask, args=({"max_tokens": 6, "temperature": 0},)))
            threads[-1].start()
            wait_until(lambda: metric(url, "decalign_queue_depth") == depth, f"{depth} queued requests")
        running = 1
        for joined in joined_per_step:
            running += joined
            held_steps.allow(1)
            wait_until(lambda: running_requests(url) == running, f"{joined} more to join")
            assert metric(url, "decalign_queue_depth") == 4 - running
    finally:
        held_steps.set()
        for thread in threads:
            thread.join()
        server.should_exit = True


@pytest.mark.parametrize("batching", ["static", "grouped"])
def test_waves_of_the_schedulers_kept_to_compare_against(engine, batching, held_steps):
    """Neither joins a running batch. Behind a running greedy answer wait a Best-of-4, a greedy
    answer like the running one, and a second Best-of-4: static batching runs all three in the next
    wave (the short greedy answer ends first); grouped batching, the scheduler before continuous
    batching, runs the two Best-of-4 together (the first waiting request's decoding), then the greedy one."""
    server, url = start(engine, max_batch=4, max_tokens_limit=200, batching=batching, admission="arrival")
    greedy = {"max_tokens": 4, "temperature": 0}
    best_of_4 = {"max_tokens": 30, "alignment": {"method": "bon", "n": 4, "reward": "sentiment"}}
    try:
        finished = finish_order(url, held_steps, greedy, {"bon 1": best_of_4, "greedy": greedy, "bon 2": best_of_4})
        expected = ["greedy", "bon", "bon"] if batching == "static" else ["bon", "bon", "greedy"]
        assert [name.split()[0] for name in finished] == ["running", *expected]
    finally:
        held_steps.set()
        server.should_exit = True


class StepGate:
    """The server's decoding steps run only as the test allows: `allow(n)` lets n more run, `set()`
    lets every later one run; so a test can queue requests behind a running one however slow the machine."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)

    def allow(self, steps: int = 1) -> None:
        self.permits.release(steps)

    def set(self) -> None:
        self.allow(1_000_000)


@pytest.fixture
def held_steps(monkeypatch):
    from decalign.methods import Driver

    gate, driver_step = StepGate(), Driver.step
    monkeypatch.setattr(Driver, "step", lambda self: gate.permits.acquire(timeout=60) and driver_step(self))
    return gate


@pytest.mark.parametrize("batching", ["continuous", "static", "grouped"])
def test_a_request_given_up_while_queued_leaves_the_queue(engine, batching, held_steps):
    """A queued request whose client hangs up leaves the queue at the next step, in every batching
    mode (the wave schedulers kept it, and its place in the bounded queue, until their wave ended)."""
    server, url = start(engine, queue_size=1, max_batch=1, max_tokens_limit=200, batching=batching)
    try:
        def ask(body, timeout=60):
            return httpx.post(url + "/v1/completions", timeout=timeout, json={"prompt": "The answer is", **body})

        running = threading.Thread(target=ask, args=({"max_tokens": 200, "temperature": 0},))
        running.start()
        wait_until(lambda: running_requests(url) == 1, "the first answer to start")
        with pytest.raises(httpx.ReadTimeout):
            ask({"max_tokens": 4}, timeout=0.5)  # queued, then its client hangs up

        def left() -> bool:  # one more step each time it is asked, until the server has seen the hang-up
            held_steps.allow(1)
            return metric(url, "decalign_queue_depth") == 0
        wait_until(left, "the abandoned request to leave", seconds=10)
        assert running_requests(url) == 1  # the first answer is still being written
        late = []
        thread = threading.Thread(target=lambda: late.append(ask({"max_tokens": 4, "temperature": 0})))
        thread.start()
        wait_until(lambda: metric(url, "decalign_queue_depth") == 1 or late, "the next request to queue")
        held_steps.set()
        thread.join()
        running.join()
        assert late[0].status_code == 200, late[0].text
    finally:
        held_steps.set()
        server.should_exit = True


def test_past_its_deadline_a_request_gets_504_streamed_or_not(engine, held_steps):
    """A request past the server's timeout gets OpenAI's error JSON with status 504, streamed or not
    (a stream's status goes with its first text, so an error before it gets its own status; the
    same for a request that fails before its first text: 400); each is counted under its status; and
    their rows are gone once the engine steps again."""
    server, url = start(engine, timeout=0.5)
    try:
        bodies = [{"prompt": "hi", "max_tokens": 8}, {"prompt": "hi", "max_tokens": 8, "stream": True},
                  {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}]
        for body in bodies:
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            reply = httpx.post(url + route, json=body, timeout=30)
            assert reply.status_code == 504 and reply.json()["error"]["type"] == "timeout", reply.text
        held_steps.set()
        wait_until(lambda: metric(url, "decalign_live_rows") == 0, "the timed-out rows to leave")
        refused = httpx.post(url + "/v1/completions", timeout=30, json={
            "prompt": "hi", "max_tokens": 4, "stream": True, "alignment": {"method": "contrastive"}})
        assert refused.status_code == 400 and "amateur" in refused.json()["error"]["message"], refused.text
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'endpoint="/v1/completions",status="504"} 2.0' in metrics
        assert 'endpoint="/v1/chat/completions",status="504"} 1.0' in metrics
        assert 'endpoint="/v1/completions",status="400"} 1.0' in metrics
        answer = httpx.post(url + "/v1/completions", timeout=30, json={"prompt": "hi", "max_tokens": 4})
        assert answer.status_code == 200
    finally:
        held_steps.set()
        server.should_exit = True


def wait_until(condition, what: str, seconds: float = 60) -> None:
    """Poll the server until `condition` holds; a test that raced fails with a message instead of hanging."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def concurrently(call, items):
    results: list = [None] * len(items)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, call(items[i]))) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def metric(url: str, name: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name + " ")))


def metric_total(url: str, name: str) -> float:
    """A labelled series summed over its labels (0 before its first sample)."""
    metrics = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith((name + "{", name + " ")))


def steps_total(url: str) -> int:
    return int(metric(url, "decalign_step_seconds_count"))


def running_requests(url: str) -> int:
    return int(metric(url, "decalign_running_requests"))


def test_its_hub_best_of_n_runs_against_the_server_unchanged(served):
    """its_hub's Best-of-N over an OpenAI-compatible model (the client named in the serving issue):
    with a temperature its four answers are samples, not one greedy answer four times, and it picks
    the one its own reward prefers."""
    from its_hub.api import AbstractOutcomeRewardModel
    from its_hub.core.algorithms.bon import BestOfN
    from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

    class LongestAnswer(AbstractOutcomeRewardModel):
        def score(self, messages, **kwargs):
            return [float(len(_content(conversation[-1]))) for conversation in messages]

        async def ascore(self, messages, orchestrator=None, **kwargs):
            return self.score(messages)

    lm = OpenAICompatibleLanguageModel(endpoint=served + "/v1", api_key="unused", model_name="tiny",
                                       temperature=0.8, max_completion_tokens=8)
    result = BestOfN(LongestAnswer()).infer(lm, "Tell me about bread", budget=4, return_response_only=False)
    answers = [_content(response) for response in result.responses]
    assert len(answers) == 4 and len(set(answers)) > 1
    assert _content(result.the_one) == max(answers, key=len)


def _content(message) -> str:
    return message["content"] if isinstance(message, dict) else message.content


@pytest.mark.parametrize("route", ["local-chat-completions", "local-completions"])
def test_lm_eval_harness_runs_against_the_server_unchanged(served, client, tmp_path, route):
    """lm-eval-harness's `local-chat-completions` model, and its `local-completions` model sending
    batches of two prompts, on a task of our own (a local JSONL, no hub): every answer it records is
    the server's greedy answer to that question, and its metric is computed."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    questions = ["What is 2 + 3?", "Name a colour.", "Say hello.", "Is water wet?"]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in questions))
    (tmp_path / "decalign_questions.yaml").write_text(
        "task: decalign_questions\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    chat = route == "local-chat-completions"
    path, extra = ("chat/completions", "num_concurrent=2") if chat else \
        ("completions", "batch_size=2,tokenizer_backend=None,tokenized_requests=False")
    results = lm_eval.simple_evaluate(
        model=route, model_args=f"base_url={served}/v1/{path},model=tiny,max_retries=1,{extra}",
        tasks=["decalign_questions"], task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=chat, log_samples=True)
    samples = results["samples"]["decalign_questions"]
    assert len(samples) == len(questions)
    for sample in samples:
        question = sample["doc"]["question"]
        if chat:
            ours = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                  max_tokens=6, temperature=0).choices[0].message.content
        else:
            ours = client.completions.create(model="tiny", prompt=question, max_tokens=6, temperature=0).choices[0].text
        assert sample["resps"][0][0] == ours.split("\n\n")[0], question
    assert "exact_match,none" in results["results"]["decalign_questions"]


def test_logprob_bytes_are_each_tokens_own_bytes(engine):
    """A character split over tokens decodes to U+FFFD token by token; the tokens' bytes joined must
    give the text back (what OpenAI's `bytes` field is for)."""
    from decalign.server.app import token_bytes

    for text in ("🎉🔥 party", "晨走走, 我们", "plain words, é ü"):
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(token_bytes(engine, token) for token in ids).decode("utf-8") == text


@pytest.mark.parametrize("grace, signals, status", [(60, 1, 200), (60, 2, 503), (0, 1, 503)])
def test_a_signal_gives_requests_in_flight_the_grace_then_503_and_ends_the_engine_thread(engine, held_steps, grace,
                                                                                          signals, status):
    """On Ctrl-C or SIGTERM the requests in flight get --shutdown-grace seconds to finish; past it, or
    at a second signal, each is answered 503 in OpenAI's shape (a stream in an error event), and the
    engine's thread ends. (uvicorn alone waited for them up to --timeout, then on a second Ctrl-C
    dropped them with tracebacks while a forward pass ran, and the process aborted.)"""
    from decalign.server import ServerConfig, create_app
    from decalign.server.shutdown import GracefulServer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(engine, ServerConfig(model_name="tiny", max_tokens_limit=64))
    server = GracefulServer(app, host="127.0.0.1", port=port, grace=grace, log_level="error")
    serving = threading.Thread(target=server.serve_until_stopped)
    serving.start()
    wait_until(lambda: server.started, "the server to start")
    body = {"prompt": "hi", "max_tokens": 32, "min_tokens": 32}  # exactly 32 tokens: in flight until let go
    events: list[str] = []
    replies: list[httpx.Response] = []

    def streamed() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
            events.extend(line[6:] for line in reply.iter_lines() if line.startswith("data: "))

    clients = [threading.Thread(target=streamed),
               threading.Thread(target=lambda: replies.append(httpx.post(url + "/v1/completions", json=body,
                                                                         timeout=60)))]
    clients[0].start()
    wait_until(lambda: running_requests(url) == 1, "the stream to join the batch")
    clients[1].start()
    wait_until(lambda: server.scheduler.depth() == 1, "the second request to queue")
    held_steps.allow(1)  # the stream's first token; the other request joins before the next step
    wait_until(lambda: running_requests(url) == 2, "both requests to be in flight")
    for _ in range(signals):
        server.handle_exit(signal.SIGINT, None)
    if status == 503:
        wait_until(lambda: server.scheduler.closed, "the scheduler to close")
    held_steps.set()
    for thread in (*clients, serving):
        thread.join(timeout=60)
    assert not serving.is_alive() and not server.scheduler.thread.is_alive()
    (reply,) = replies
    assert reply.status_code == status, reply.text
    if status == 200:
        assert reply.json()["usage"]["completion_tokens"] == 32
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 32
    else:
        assert reply.json()["error"]["type"] == "server_error" and "shutting down" in reply.text
        assert "shutting down" in json.loads(events[-1])["error"]["message"]
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/v1/completions", json=body, timeout=10)


def test_the_command_exits_0_without_a_traceback_however_many_signals_come(tiny_path):
    """Ctrl-C pressed again and again: the process ends with status 0 and no traceback (a second
    signal that came while the interpreter shut down killed it; a third printed the lifespan task's
    cancellation as a traceback)."""
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "decalign.cli", "serve", "--model", str(tiny_path), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}") or server.poll() is not None, "the server to start")
        for _ in range(4):
            server.send_signal(signal.SIGINT)
            time.sleep(0.25)
        output, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0 and "Traceback" not in output, output


def test_the_command_serves_named_adapters(tiny_path, two_adapters):
    """`decalign serve --adapter a=A --adapter b=B`: the command loads both by name, lists them and
    answers a request for one as the library does with that adapter."""
    import subprocess
    import sys

    from decalign import Engine, generate

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "decalign.cli", "serve", "--model", str(tiny_path), "--port",
                               str(port), "--adapter", f"a={two_adapters['a']}", "--adapter", f"b={two_adapters['b']}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _healthy(url) or server.poll() is not None, "the server to start")
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]] == [str(tiny_path), "a", "b"]
        body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        only_b = Engine.load(str(tiny_path), adapter=two_adapters["b"])
        assert reply["model"] == "b"
        assert reply["choices"][0]["message"]["content"] == generate([body["messages"]], model=only_b,
                                                                     max_new_tokens=8)[0].text
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert "adapter a, adapter b on http" in output and "Traceback" not in output, output


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_serve_command_bounds_onednn_s_kernel_cache_before_the_model_runs(monkeypatch):
    """oneDNN reads its cache bound once, at its first kernel: the command sets it before loading the
    model (a server met a new kernel shape at almost every join and kept them: memory stayed 5-7%
    above its start after a load), and leaves a bound the environment gives alone."""
    from click.testing import CliRunner

    from decalign.cli import cli
    from decalign.errors import DecalignError

    seen = []

    def no_model(*args, **kwargs):
        seen.append(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
        raise DecalignError("stop here")

    monkeypatch.setattr("decalign.engine.get_engine", no_model)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    CliRunner().invoke(cli, ["serve"])
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    CliRunner().invoke(cli, ["serve"])
    assert seen == ["64", "512"]


def test_the_serve_command_leaves_what_it_holds_at_start_out_of_garbage_collection(monkeypatch, tiny_path):
    """A full garbage collection scanned every object of torch, transformers and the server (0.2 s
    with the interpreter lock held) each time the server went idle: every answer of a one-client
    server came that much later (proxy model: 363 against 74 ms). The command freezes what it holds
    when it starts serving, so a collection scans only what came after."""
    import gc

    from click.testing import CliRunner

    from decalign.cli import cli
    from decalign.server import shutdown

    tracked = []

    def serve_app(app, **_):
        tracked.append((len(gc.get_objects()), gc.get_freeze_count()))

    monkeypatch.setattr(shutdown, "serve_app", serve_app)
    try:
        result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_path)])
    finally:
        gc.unfreeze()
    assert result.exit_code == 0, result.output
    ((scanned, frozen),) = tracked
    assert frozen > 10 * scanned, (scanned, frozen)


def test_memory_goes_back_once_the_server_has_been_idle_a_while_not_between_requests(engine, monkeypatch):
    """Handing memory back costs the next request (on a GPU it allocates its cache on the device
    again), so a client sending one request after another must not pay for it at every answer; a
    server left idle still hands it back."""
    from decalign.server import scheduler

    released = []
    monkeypatch.setattr(scheduler, "release_memory",
                        lambda: released.append((threading.current_thread(), time.monotonic())))
    server, url = start(engine)
    engine_thread = server.config.app.state.server.scheduler.thread
    try:
        ours = lambda: [t for thread, t in released if thread is engine_thread]  # noqa: E731
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        with httpx.Client() as http:
            answered = []
            for _ in range(3):
                assert http.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
                answered.append(time.monotonic())
            assert ours() == []  # back to back: nothing handed back between them
            time.sleep(scheduler.IDLE_RELEASE_SECONDS + 1.0)
        (when,) = ours()
        assert when >= answered[-1] + 0.5 * scheduler.IDLE_RELEASE_SECONDS
    finally:
        server.should_exit = True


def test_release_memory_hands_torch_cuda_cache_back_once_cuda_is_in_use(monkeypatch):
    import torch

    from decalign.memory import release_memory

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    release_memory()
    assert emptied == []  # CUDA never started: nothing to hand back, and nothing starts it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    release_memory()
    assert emptied == [True]


def test_metrics_report_the_allocators_device_memory_for_a_cuda_engine(monkeypatch):
    import torch

    from decalign.server.metrics import Metrics

    readings = {"memory_allocated": 3 * 2**20, "memory_reserved": 8 * 2**20, "max_memory_reserved": 12 * 2**20}
    for name, value in readings.items():
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    metrics = Metrics()
    assert b"decalign_device_memory_bytes" not in metrics.render()  # a CPU engine has no such series
    metrics.watch_device(torch.device("cuda", 0))
    series = dict(line.rsplit(" ", 1) for line in metrics.render().decode().splitlines()
                  if line.startswith("decalign_device_memory_bytes"))
    assert {name: float(value) / 2**20 for name, value in series.items()} == {
        'decalign_device_memory_bytes{kind="allocated"}': 3, 'decalign_device_memory_bytes{kind="reserved"}': 8,
        'decalign_device_memory_bytes{kind="peak_reserved"}': 12}


def test_named_adapters_are_served_by_model_name(served_adapters):
    """`--adapter a=... --adapter b=...`: /v1/models lists them under the served model; concurrent
    requests for each adapter and for the model itself share the running batch, each answered as
    decalign answers it alone with that adapter (answers and top log-probabilities); the answer names
    the model that wrote it; a name not served is a 404 with OpenAI's model_not_found."""
    from decalign import generate

    server, url = start(served_adapters, max_batch=8)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["tiny", "a", "b"]
        assert [m.model_extra.get("parent") for m in listed] == [None, "tiny", "tiny"]
        messages = [{"role": "user", "content": "Tell me about bread."}]
        asks = [("a", 0), ("b", 0), ("tiny", 0), ("a", 0.9), ("b", 0.9), ("tiny", 0.9)]
        replies: dict = {}

        def ask(model, temperature):
            replies[model, temperature] = client.chat.completions.create(
                model=model, messages=messages, max_tokens=8, temperature=temperature, seed=5, logprobs=True,
                top_logprobs=2)

        threads = [threading.Thread(target=ask, args=pair) for pair in asks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for (model, temperature), reply in replies.items():
            name = None if model == "tiny" else model
            (expected,) = generate([messages], method="greedy" if temperature == 0 else "sample", seed=[5],
                                   model=served_adapters, adapter_name=name, max_new_tokens=8,
                                   **({"temperature": temperature} if temperature else {}))
            assert reply.choices[0].message.content == expected.text and reply.model == model
            tops = served_adapters.top_tokens(served_adapters.render(messages), expected.tokens, 2, name)
            assert [alt.logprob for t in reply.choices[0].logprobs.content for alt in t.top_logprobs] == \
                pytest.approx([logprob for position in tops for _, logprob in position], abs=1e-4)
        assert len({replies[m, 0].choices[0].message.content for m in ("a", "b", "tiny")}) == 3
        metrics = httpx.get(url + "/metrics", timeout=10).text
        for model in ("a", "b", "tiny"):  # each model's two answers, and their tokens, counted under its name
            assert f'decalign_answered_requests_total{{model="{model}"}} 2.0' in metrics
            tokens = sum(len(replies[model, t].choices[0].logprobs.content) for t in (0, 0.9))
            assert f'decalign_generated_tokens_total{{model="{model}"}} {float(tokens)}' in metrics
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="c", messages=messages, max_tokens=4)
        error = missing.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model" and "one of: tiny, a, b" in error["message"]
    finally:
        server.should_exit = True


def test_adapters_load_and_unload_at_run_time(tiny_path, two_adapters):
    """With --allow-adapter-loading (vLLM's endpoints): a loaded adapter is listed and answers as a
    model loaded with it alone; loading a name twice is a 409, a bad folder or name a 400; an adapter
    a waiting or running request asks for is not unloaded (409), once they are answered it is, and
    its name is then a 404. Without the flag the endpoints are a 404."""
    from decalign import Engine, generate

    engine = Engine.load(str(tiny_path))  # its own: the test changes it
    server, url = start(engine, allow_adapter_loading=True)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        load = {"lora_name": "a", "lora_path": two_adapters["a"]}
        reply = httpx.post(url + "/v1/load_lora_adapter", json=load, timeout=30)
        assert reply.status_code == 200 and reply.json()["status"] == "loaded"
        assert [m.id for m in client.models.list().data] == ["tiny", "a"]
        messages = [{"role": "user", "content": "hi"}]
        answer = client.chat.completions.create(model="a", messages=messages, max_tokens=8, temperature=0)
        only_a = Engine.load(str(tiny_path), adapter=two_adapters["a"])
        assert answer.choices[0].message.content == generate([messages], model=only_a, max_new_tokens=8)[0].text
        for body, status, words in ((load, 409, "an adapter named a is loaded already"),
                                    ({"lora_name": "b", "lora_path": "/no/such/folder"}, 400, "does not exist"),
                                    ({"lora_name": "b.c", "lora_path": two_adapters["b"]}, 400, "letters, digits"),
                                    ({"lora_name": "b"}, 400, "lora_path must be a non-empty string")):
            reply = httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=30)
            assert reply.status_code == status and words in reply.json()["error"]["message"]
        # hold the engine's thread, queue a request for the adapter, then ask to unload it
        scheduler, hold = server.config.app.state.server.scheduler, threading.Event()
        scheduler.call(hold.wait)
        asked = threading.Thread(target=lambda: client.chat.completions.create(
            model="a", messages=messages, max_tokens=16, extra_body={"min_tokens": 16}))
        asked.start()
        while not scheduler.depth():
            time.sleep(0.01)
        unloading: list = []
        unloader = threading.Thread(target=lambda: unloading.append(
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30)))
        unloader.start()
        while not scheduler.chores:
            time.sleep(0.01)
        hold.set()
        unloader.join()
        asked.join()
        assert unloading[0].status_code == 409 and "in use by 1 request" in unloading[0].json()["error"]["message"]
        reply = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30)
        assert reply.status_code == 200 and engine.adapter_names() == []
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="a", messages=messages, max_tokens=4)
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30).status_code == 404
    finally:
        server.should_exit = True
    server, url = start(engine)
    try:
        reply = httpx.post(url + "/v1/load_lora_adapter", json=load, timeout=30)
        assert reply.status_code == 404 and "--allow-adapter-loading" in reply.json()["error"]["message"]
    finally:
        server.should_exit = True
