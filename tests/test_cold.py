"""CoLD and the contrastive family: mixed-adapter batches, the logit-arithmetic step, train-lora."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from decalign import DecalignError, Engine, generate
from decalign.testing import make_tiny_adapter
from decalign.methods.contrast import contrast_scores


def save_adapter(model_path, out, seed=0, targets=("q_proj", "v_proj", "down_proj")):
    return make_tiny_adapter(model_path, out, seed=seed, targets=targets)


@pytest.fixture(scope="module")
def adapter(tiny_path, tmp_path_factory):
    # seeded whole (A and B): on this one, the ungated contrast flips tokens in the first 12 steps
    return save_adapter(tiny_path, tmp_path_factory.mktemp("cold") / "adapter", seed=2)


@pytest.fixture(scope="module")
def adapted(tiny_path, adapter):
    return Engine.load(str(tiny_path), adapter=str(adapter))


@pytest.fixture(scope="module")
def ids(adapted):
    texts = ["hi", "Tell me how to bake bread with flour and water, step by step please.", "The answer is"]
    return [adapted.render(t) for t in texts]


def both_ways(engine, prompts):
    """Logits of the same rows with the adapter on everywhere and off everywhere."""
    on = engine.start(prompts).logits
    with engine.model.disable_adapter():
        off = engine.start(prompts).logits
    return on, off


@pytest.mark.parametrize("route", ["gate", "peft"])
def test_mixed_batch_rows_equal_adapter_on_and_off_exactly(adapted, ids, route):
    """Expert rows see exactly the adapted model, base rows exactly the model without the adapter,
    in one forward pass (the engine's own gate, and PEFT's adapter_names route)."""
    prompts = ids + ids
    names = ["default"] * 3 + ["__base__"] * 3
    adapted.lora_gate.ok = None if route == "gate" else False
    try:
        mixed = adapted.start(prompts, adapters=names, max_new_tokens=6)
        on, off = both_ways(adapted, prompts)
        if route == "gate":
            assert torch.equal(mixed.logits[:3], on[:3]) and torch.equal(mixed.logits[3:], off[3:])
        else:  # PEFT runs the LoRA on a gathered sub-batch, through transformers' forward (the
            # engine's decoder serves the other route): equal up to float rounding
            assert torch.allclose(mixed.logits[:3], on[:3], atol=1e-5)
            assert torch.allclose(mixed.logits[3:], off[3:], atol=1e-5)
        assert not torch.allclose(on[0], off[0], atol=1e-2)  # the adapter does change the logits
        # decoding carries the names along: each row's cached continuation matches its own model
        mixed.append({r: 7 for r in range(6)})
        mixed.select([0, 3, 0])  # forks copy the names
        assert mixed.adapters == ["default", "__base__", "default"]
    finally:
        adapted.lora_gate.ok = None


def test_mixed_batch_names_are_checked(adapted, engine, ids):
    with pytest.raises(DecalignError, match="no adapter named nope"):
        adapted.start(ids[:1], adapters=["nope"])
    with pytest.raises(DecalignError, match="no adapter named default"):
        engine.start(ids[:1], adapters=["default"])


def test_contrast_step_by_hand():
    torch.manual_seed(0)
    s_e, s_a = torch.randn(3, 50) * 3, torch.randn(3, 50) * 3
    score, plausible = contrast_scores([s_e, s_a], [1.5, -0.5], alpha=0.1)
    expected_mask = s_e >= math.log(0.1) + s_e.max(-1, keepdim=True).values
    assert torch.equal(plausible, expected_mask)
    expected = torch.where(expected_mask, 1.5 * s_e - 0.5 * s_a, torch.tensor(float("-inf")))
    assert torch.allclose(score, expected)
    # log-probabilities instead of logits: the same argmax
    logp, _ = contrast_scores([s_e.log_softmax(-1), s_a.log_softmax(-1)], [1.5, -0.5], alpha=0.1)
    assert torch.equal(logp.argmax(-1), score.argmax(-1))
    # beta = 0 and alpha = 1 are greedy on the expert, even with an infinite amateur logit
    s_a[0, 0] = float("-inf")
    assert torch.equal(contrast_scores([s_e, s_a], [1.0, -0.0])[0].argmax(-1), s_e.argmax(-1))
    assert torch.equal(contrast_scores([s_e, s_a], [1.5, -0.5], alpha=1.0)[0].argmax(-1), s_e.argmax(-1))


@pytest.mark.parametrize("params", [dict(beta=0.0), dict(alpha=1.0), dict(beta=0.0, alpha=0.5)])
def test_beta_zero_or_alpha_one_is_greedy_with_the_adapter(adapted, params):
    prompts = ["hi", "Tell me how to bake bread", "The answer is"]
    greedy = generate(prompts, model=adapted, max_new_tokens=16)
    cold = generate(prompts, method="cold", model=adapted, max_new_tokens=16, **params)
    assert [r.tokens for r in cold] == [r.tokens for r in greedy]


def expert_and_base_logits(adapted, ids):
    """The next-token logits after `ids` with the adapter and without it: two plain forwards."""
    row = torch.tensor([ids])
    with torch.no_grad():
        s_e = adapted.model(row).logits[0, -1].float()
        with adapted.model.disable_adapter():
            s_a = adapted.model(row).logits[0, -1].float()
    return s_e, s_a


def test_cold_token_equals_a_hand_computation_from_two_forwards(tiny_path, adapter, adapted):
    alpha, beta = 0.1, 0.5
    (result,) = generate("Tell me how to bake bread", method="cold", model=adapted, max_new_tokens=12,
                         alpha=alpha, beta=beta, gate=None)  # the paper's rule: every step contrasted
    prompt = adapted.render("Tell me how to bake bread")
    flips, near_ties = 0, 0
    for step, token in enumerate(result.tokens):
        s_e, s_a = expert_and_base_logits(adapted, prompt + result.tokens[:step])
        keep = s_e >= math.log(alpha) + s_e.max()
        score = torch.where(keep, (1 + beta) * s_e - beta * s_a, torch.tensor(float("-inf")))
        top2 = score.topk(2).values
        assert int(score.argmax()) == token or (top2[0] - top2[1]) < 1e-4
        flips += token != int(s_e.argmax())
        near_ties += bool((s_e.topk(2).values[0] - s_e.topk(2).values[1]) < 1e-4)  # argmax up to rounding
    assert abs(result.stats["contrast_flips"] - flips) <= near_ties
    assert flips > 0  # the contrast did change something on this adapter


def test_gate_contrasts_only_where_the_adapter_is_unsure(adapted):
    """gate=g: a step whose expert top-2 margin is >= g takes the expert's own argmax; others take
    the contrast. gate=0 is adapter greedy; a gate above every margin is the ungated rule."""
    prompt = "Tell me how to bake bread"
    (greedy,) = generate(prompt, model=adapted, max_new_tokens=12)
    (ungated,) = generate(prompt, method="cold", model=adapted, max_new_tokens=12, beta=1.0, gate=None)
    assert generate(prompt, method="cold", model=adapted, max_new_tokens=12, beta=1.0, gate=0.0)[0].tokens == \
        greedy.tokens
    assert generate(prompt, method="cold", model=adapted, max_new_tokens=12, beta=1.0, gate=1e9)[0].tokens == \
        ungated.tokens
    ids = adapted.render(prompt)
    first = expert_and_base_logits(adapted, ids)[0].log_softmax(-1).topk(2).values
    margin = float(first[0] - first[1])  # the first step's: shared by every run from this prompt
    kinds = set()
    for gate in (margin / 2, margin * 2):  # the first step is sure under one gate and unsure under the other
        (gated,) = generate(prompt, method="cold", model=adapted, max_new_tokens=12, beta=1.0, gate=gate)
        for step, token in enumerate(gated.tokens):
            s_e, s_a = expert_and_base_logits(adapted, ids + gated.tokens[:step])
            top2 = s_e.log_softmax(-1).topk(2).values
            if top2[0] - top2[1] >= gate:
                kinds.add("sure")
                assert token == int(s_e.argmax())
            else:
                kinds.add("unsure")
                keep = s_e >= math.log(0.1) + s_e.max()
                score = torch.where(keep, 2.0 * s_e - s_a, torch.tensor(float("-inf")))
                best = score.topk(2).values
                assert token == int(score.argmax()) or best[0] - best[1] < 1e-4
    assert kinds == {"sure", "unsure"}  # both kinds of step were checked
    with pytest.raises(DecalignError, match="gate must be >= 0"):
        generate(prompt, method="cold", model=adapted, gate=-1.0)


def test_batched_prompts_equal_single_runs_and_work_is_counted(adapted):
    prompts = ["hi", "Tell me how to bake bread with flour and water, step by step please.", "The answer is"]
    together = generate(prompts, method="cold", model=adapted, max_new_tokens=10)
    for prompt, result in zip(prompts, together):
        (alone,) = generate(prompt, method="cold", model=adapted, max_new_tokens=10)
        assert alone.tokens == result.tokens
        prompt_tokens = len(adapted.render(prompt))
        assert alone.stats["prefill_tokens"] == 2 * prompt_tokens  # expert and base rows
        assert alone.stats["decode_tokens"] == 2 * alone.stats["forward_passes"] - 2
        assert alone.stats["generated_tokens"] == len(alone.tokens)


def test_sampling_variant_is_seeded_and_stays_in_the_plausible_set(adapted):
    kwargs = dict(method="cold", model=adapted, max_new_tokens=12, temperature=1.0, seed=3)
    first = generate(["hi", "The answer is"], **kwargs)
    again = generate(["hi", "The answer is"], **kwargs)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert all(r.finish_reason for r in first)


def test_bad_input_is_refused(tiny_path, engine, adapted):
    with pytest.raises(DecalignError, match="needs a LoRA adapter"):
        generate("hi", method="cold", model=engine, max_new_tokens=4)
    with pytest.raises(DecalignError, match=r"alpha must be in \(0, 1\]"):
        generate("hi", method="cold", model=adapted, alpha=0)
    with pytest.raises(DecalignError, match=r"alpha must be in \(0, 1\]"):
        generate("hi", method="cold", model=adapted, alpha=1.5)
    for beta in (-0.1, float("inf")):
        with pytest.raises(DecalignError, match="beta must be a finite number"):
            generate("hi", method="cold", model=adapted, beta=beta)


def test_only_cold_gates_by_default():
    """The gate's evidence is CoLD's (docs/cold.md): a separate amateur and DExperts keep the papers' rule."""
    from decalign.methods.cold import ColdConfig
    from decalign.methods.contrastive import ContrastiveConfig
    from decalign.methods.dexperts import DExpertsConfig

    assert (ColdConfig().gate, ContrastiveConfig().gate, DExpertsConfig().gate) == (0.5, None, None)


def test_an_adapter_folder_without_a_readable_config_is_refused_offline(tiny_path, adapter, tmp_path):
    """Without adapter_config.json PEFT looked the folder's name up on the Hub (30 s of retries where
    the Hub is unreachable), then raised its own error."""
    import shutil

    for name, config in (("noconfig", None), ("badconfig", "{not json")):
        folder = tmp_path / name
        shutil.copytree(adapter, folder)
        if config is None:
            (folder / "adapter_config.json").unlink()
        else:
            (folder / "adapter_config.json").write_text(config)
        with pytest.raises(DecalignError, match="adapter_config.json") as error:
            Engine.load(str(tiny_path), adapter=str(folder))
        assert "\n" not in str(error.value)


def test_adapter_for_another_base_model_is_refused(tiny_path, tmp_path):
    from decalign.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "wide", hidden=96)
    wrong = save_adapter(other, tmp_path / "wide-adapter")
    with pytest.raises(DecalignError, match="does not fit model"):
        generate("hi", method="cold", model=str(tiny_path), adapter=str(wrong), max_new_tokens=4)


def test_cli_cold_flags(tiny_path, adapter):
    from decalign.cli import cli

    runner = CliRunner()
    args = ["generate", "hi", "--model", str(tiny_path), "--adapter", str(adapter), "--method", "cold",
            "--max-new-tokens", "6", "--seed", "1", "--json"]
    by_param = runner.invoke(cli, args + ["--param", "alpha=0.2", "--param", "beta=0.7"])
    by_flag = runner.invoke(cli, args + ["--cold-alpha", "0.2", "--cold-beta", "0.7"])
    assert by_param.exit_code == 0, by_param.output
    assert json.loads(by_param.stdout)["tokens"] == json.loads(by_flag.stdout)["tokens"]
    assert json.loads(by_flag.stdout)["params"] == {"alpha": 0.2, "beta": 0.7}
    assert json.loads(by_param.stdout)["params"] == {"alpha": 0.2, "beta": 0.7}  # typed, however given
    bad = runner.invoke(cli, args + ["--cold-beta", "-1"])
    assert bad.exit_code != 0 and "beta must be a finite number >= 0" in str(bad.exception)
    for method in ("cold", "dexperts"):  # refused before any model is loaded: the model path is never read
        missing = runner.invoke(cli, ["generate", "hi", "--model", "/nonexistent/model", "--method", method])
        assert missing.exit_code != 0 and "needs a LoRA adapter" in str(missing.exception)


def test_contrastive_amateur_needs_the_same_tokenizer(tiny_path, engine, tmp_path):
    from decalign.testing import make_tiny_model, make_tokenizer

    same = make_tiny_model(tmp_path / "amateur", layers=1, hidden=32, seed=5)
    (result,) = generate("hi", method="contrastive", model=engine, amateur=str(same), max_new_tokens=8)
    assert result.tokens and result.stats["branches"] == 2
    # beta = 0: the amateur is ignored and the answer is greedy
    (plain,) = generate("hi", model=engine, max_new_tokens=8)
    (zero,) = generate("hi", method="contrastive", model=engine, amateur=str(same), beta=0, max_new_tokens=8)
    assert zero.tokens == plain.tokens
    # the amateur's batch reads the chosen tokens lazily: a gate that always opens is the ungated
    # rule token for token; one that never opens leaves the amateur reading nothing after its prompt
    kwargs = dict(method="contrastive", model=engine, amateur=str(same), max_new_tokens=10, min_new_tokens=10)
    (ungated,) = generate("The answer is", gate=None, **kwargs)
    (always,) = generate("The answer is", gate=1e9, **kwargs)
    (never,) = generate("The answer is", gate=0, **kwargs)
    assert always.tokens == ungated.tokens and always.stats["contrast_flips"] == ungated.stats["contrast_flips"]
    read = len(always.tokens) - 1  # the expert's row reads every chosen token but the last
    assert always.stats["decode_tokens"] == ungated.stats["decode_tokens"] == 2 * read
    assert never.stats["decode_tokens"] == read and never.stats["contrast_flips"] == 0
    other = make_tiny_model(tmp_path / "other", layers=1, hidden=32, tokenizer=make_tokenizer(300))
    with pytest.raises(DecalignError, match="different tokenizer"):
        generate("hi", method="contrastive", model=engine, amateur=str(other), max_new_tokens=4)
    with pytest.raises(DecalignError, match="needs an amateur"):
        generate("hi", method="contrastive", model=engine, max_new_tokens=4)


def test_dexperts_with_an_anti_expert_adapter(tiny_path, adapted, tmp_path):
    anti = save_adapter(tiny_path, tmp_path / "anti", seed=1)
    (result,) = generate("hi", method="dexperts", model=adapted, anti_adapter=str(anti), max_new_tokens=8)
    assert result.stats["branches"] == 3 and result.tokens
    assert adapted.adapter_names() == ["default"]  # the anti-expert is unloaded afterwards
    # beta = 0 leaves the base model alone: greedy with the adapter switched off
    (zero,) = generate("hi", method="dexperts", model=adapted, beta=0, max_new_tokens=8)
    with adapted.model.disable_adapter():
        (base,) = generate("hi", model=adapted, max_new_tokens=8)
    assert zero.tokens == base.tokens


def test_train_lora_lowers_the_loss_and_the_adapter_loads(tiny_path, tmp_path):
    from decalign.lora import train_lora

    data = tmp_path / "train.jsonl"
    records = [{"messages": [{"role": "user", "content": f"What is {a} plus 1?"},
                             {"role": "assistant", "content": f"The answer is {a + 1}."}]} for a in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    summary = train_lora(data, tmp_path / "trained", model=str(tiny_path), max_steps=12, batch_size=4, lr=1e-2,
                         progress=False)
    assert summary["steps"] == 12
    assert summary["last_loss"] < summary["first_loss"]
    assert (tmp_path / "trained" / "adapter_model.safetensors").is_file()
    engine = Engine.load(str(tiny_path), adapter=str(tmp_path / "trained"))
    (result,) = generate("What is 3 plus 1?", method="cold", model=engine, max_new_tokens=6)
    assert result.tokens


def test_train_lora_names_the_bad_line(tiny_path, tmp_path):
    from decalign.cli import cli

    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": "oops"}\n')
    result = CliRunner().invoke(cli, ["train-lora", str(data), "-o", str(tmp_path / "out"),
                                      "--model", str(tiny_path)])
    assert isinstance(result.exception, DecalignError)
    assert "line 2" in str(result.exception)


@pytest.mark.parametrize("options, message", [
    (["--new-tokens", "1"], "--new-tokens must be >= 2, got 1"),  # decode cost is (T_N - T_1) / (N - 1)
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--batch-sizes", "abc"], "--batch-sizes must be positive integers"),
    (["--batch-sizes", "0"], "--batch-sizes must be positive integers"),
    (["--batch-sizes", ""], "--batch-sizes must be positive integers"),
])
def test_bench_cold_options_are_checked_before_anything_loads(options, message):
    from decalign.cli import cli

    result = CliRunner().invoke(cli, ["bench-cold", "--model", "/nonexistent", *options])
    assert isinstance(result.exception, DecalignError) and message in str(result.exception)


def test_cold_and_plain_requests_join_each_others_running_batch(adapted, monkeypatch):
    """Continuous batching across adapters: a CoLD request (rows with and without the adapter)
    joining a running plain request's batch, and a plain request joining a running CoLD batch, are
    encoded in the running step's pass (the LoRA gate set per token) and answer as they do alone."""
    from decalign.api import run, start
    from decalign.methods import Driver
    from decalign.request import Request

    cold = Request.build(prompts=["Tell me how to bake bread"], method="cold", max_new_tokens=10, model=adapted)
    plain = Request.build(prompts=["The answer is"], method="sample", params={"temperature": 0.8},
                          max_new_tokens=14, model=adapted, seed=3)
    for first, second in ((plain, cold), (cold, plain)):
        driver = Driver(adapted)
        methods = [start(first), start(second)]
        driver.add(methods[:1])
        driver.step()
        driver.add(methods[1:])
        passes = []
        run_parts = adapted.decoder.run
        monkeypatch.setattr(adapted.decoder, "run", lambda parts: passes.append(len(parts)) or run_parts(parts))
        driver.step()
        monkeypatch.undo()
        assert passes == [2]
        while driver.live:
            driver.step()
        for method, request in zip(methods, (first, second)):
            assert method.results[0].tokens == run(request)[0].tokens


def test_calls_from_several_threads_on_one_adapter_model_answer_as_alone(adapted):
    """A pass sets the adapters' row gates on the shared model, so concurrent calls used to read each
    other's gates (size errors, or rows silently decoded without their adapter); they now take turns."""
    import threading

    prompts = ["Tell me about bread.", "Say something kind."]

    def call(method: str) -> list[str]:
        extra = {"gate": None} if method == "cold" else {}
        return [r.text for r in generate(prompts, model=adapted, method=method, max_new_tokens=12, **extra)]

    alone = {method: call(method) for method in ("greedy", "cold")}
    together: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda m=method, i=i: together.__setitem__(f"{m} {i}", call(m)))
               for i in range(3) for method in ("greedy", "cold")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == {f"{method} {i}": alone[method] for i in range(3) for method in ("greedy", "cold")}
