"""--adapter: a PEFT LoRA adapter from safetensors changes the policy; a mismatched one is refused."""

import pytest
import torch

from decalign import DecalignError, Engine, generate
from decalign.testing import make_tiny_adapter


def save_adapter(model_path, out, seed=0):
    return make_tiny_adapter(model_path, out, seed=seed)


def test_adapter_changes_the_policy_and_loads_from_safetensors(tiny_path, tmp_path):
    adapter = save_adapter(tiny_path, tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    base = Engine.load(str(tiny_path))
    adapted = Engine.load(str(tiny_path), adapter=str(adapter))
    ids = base.render("hi")
    base_logits = base.start([ids]).logits[0]
    adapted_logits = adapted.start([ids]).logits[0]
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3)
    with adapted.model.disable_adapter():  # the same weights without the adapter are the base model
        assert torch.allclose(adapted.start([ids]).logits[0], base_logits, atol=1e-5)
    (result,) = generate("hi", model=str(tiny_path), adapter=str(adapter), max_new_tokens=5)
    assert result.tokens


def test_adapter_for_another_model_is_refused(tiny_path, tmp_path):
    from decalign.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "wide", hidden=96)
    adapter = save_adapter(other, tmp_path / "wide-adapter")
    with pytest.raises(DecalignError, match="does not fit model"):
        Engine.load(str(tiny_path), adapter=str(adapter))


def test_pickled_adapter_is_refused(tiny_path, tmp_path):
    adapter = save_adapter(tiny_path, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(DecalignError, match="pickled adapters are refused"):
        Engine.load(str(tiny_path), adapter=str(adapter))


def test_damaged_weights_files_get_one_line_errors(tiny_path, tmp_path):
    """A truncated safetensors file (a copy cut short) names the file that is damaged; it was an
    "unexpected SafetensorError" from the model, and "does not fit model" from an adapter."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DecalignError, match="damaged weights file"):
        Engine.load(str(model))
    adapter = save_adapter(tiny_path, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DecalignError, match="damaged adapter_model.safetensors"):
        Engine.load(str(tiny_path), adapter=str(adapter))


def test_lean_lora_forward_gives_peft_numbers_and_defers_to_peft_elsewhere(tiny_path, tmp_path):
    """The engine's lean LoRA forward gives exactly PEFT's logits: adapter on, row-gated (adapter and
    base rows in one pass), disabled, and through PEFT's adapter_names route; and it is in use."""
    from decalign.engine import BASE, adapters

    adapter = save_adapter(tiny_path, tmp_path / "adapter")
    engine = Engine.load(str(tiny_path), adapter=str(adapter))
    lora = [m for m in engine.model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    assert lora, "no LoRA module got the lean forward"
    ids = [engine.render(t) for t in ("hi", "The answer is")]
    calls = []

    def run():
        plain = engine.start(ids).logits
        gated = engine.start(ids, adapters=["default", BASE]).logits
        with engine.model.disable_adapter():
            off = engine.start(ids).logits
        engine.lora_gate.ok = False  # PEFT's adapter_names route
        routed = engine.start(ids, adapters=["default", BASE]).logits
        engine.lora_gate.ok = None
        return plain, gated, off, routed

    original = adapters._lean_lora_forward
    counting = lambda self, x, *a, **k: calls.append(1) or original(self, x, *a, **k)  # noqa: E731
    for module in lora:
        module.forward = counting.__get__(module)
    lean = run()
    assert calls
    for module in lora:
        del module.forward  # PEFT's own forward
    peft = run()
    for mine, theirs in zip(lean, peft):
        assert torch.equal(mine, theirs)
    assert not torch.equal(lean[0][1], lean[1][1])  # the gate did switch the adapter off on row 1
    assert torch.equal(lean[1][1], lean[2][1])


def test_lean_lora_forward_casts_like_peft_under_a_bfloat16_model(tiny_path, tmp_path, monkeypatch):
    """PEFT keeps adapter weights in float32 under a bfloat16 model (autocast_adapter_dtype): the lean
    forward casts as PEFT does, with PEFT's numbers, instead of falling back to PEFT's forward."""
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from decalign.engine import adapters

    adapter = save_adapter(tiny_path, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    assert layers and layers[0].lora_A["default"].weight.dtype == torch.float32
    assert layers[0].base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, layers[0].in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        theirs = LoraLinear.forward(layers[0], x)
        monkeypatch.setattr(LoraLinear, "forward", lambda *a, **k: pytest.fail("fell back to PEFT's forward"))
        mine = adapters._lean_lora_forward(layers[0], x)
    assert mine.dtype == torch.bfloat16
    assert torch.equal(mine, theirs)


def test_named_adapters_share_a_batch_each_row_with_its_own(tiny_path, two_adapters, served_adapters):
    """Rows of two adapters and of the base model in one batch: each row's logits are exactly those of
    a batch of its adapter alone (the gate, one pass), within float rounding of a model loaded with
    that adapter only and of PEFT's own per-row route; the model as loaded is its base."""
    from decalign.engine import BASE

    engine = served_adapters
    assert engine.adapter_names() == ["a", "b"] and engine.active_adapter() == BASE
    ids = [engine.render(t) for t in ("hi", "Tell me how to bake bread, step by step.", "The answer is")]
    prompts, names = ids * 3, ["a"] * 3 + ["b"] * 3 + [BASE] * 3
    mixed = engine.start(prompts, adapters=names, max_new_tokens=4)
    alone = {name: engine.start(prompts, adapters=[name] * 9).logits for name in ("a", "b", BASE)}
    for name, rows in (("a", slice(0, 3)), ("b", slice(3, 6)), (BASE, slice(6, 9))):
        assert torch.equal(mixed.logits[rows], alone[name][rows])
    assert torch.equal(engine.start(prompts).logits, alone[BASE])  # as loaded: the base model
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-2) and not torch.allclose(alone["a"], alone[BASE], atol=1e-2)
    for name in ("a", "b"):  # the same numbers as a model loaded with that adapter alone
        only = Engine.load(str(tiny_path), adapter=two_adapters[name])
        assert torch.allclose(only.start(prompts).logits, alone[name], atol=1e-5)
    assert torch.allclose(Engine.load(str(tiny_path)).start(prompts).logits, alone[BASE], atol=1e-5)
    engine.lora_gate.ok = False  # PEFT's adapter_names route
    try:
        assert torch.allclose(engine.start(prompts, adapters=names).logits, mixed.logits, atol=1e-5)
    finally:
        engine.lora_gate.ok = None
    # decoding on: each row's continuation keeps reading its own adapter through the cache
    mixed.append({row: 7 for row in range(9)})
    for name, rows in (("a", slice(0, 3)), ("b", slice(3, 6))):
        single = engine.start(prompts, adapters=[name] * 9)
        single.append({row: 7 for row in range(9)})
        assert torch.equal(mixed.logits[rows], single.logits[rows])


def test_a_request_names_its_adapter(tiny_path, two_adapters, served_adapters):
    """generate(adapter_name=) decodes with that adapter (CoLD contrasts it with the base), the same
    answers as a model loaded with it alone; its top tokens are read with it; a name not loaded, or
    CoLD with the base model as loaded, is refused in one line."""
    engine, only_b = served_adapters, Engine.load(str(tiny_path), adapter=two_adapters["b"])
    for method in ("greedy", "cold"):
        (mine,) = generate("hi", method=method, model=engine, adapter_name="b", max_new_tokens=8)
        (theirs,) = generate("hi", method=method, model=only_b, max_new_tokens=8)
        assert mine.tokens == theirs.tokens
    (base,) = generate("hi", model=engine, max_new_tokens=8)
    (named_base,) = generate("hi", model=engine, adapter_name="__base__", max_new_tokens=8)
    assert base.tokens == named_base.tokens != mine.tokens
    ids = engine.render("hi")
    mine_top, theirs_top = engine.top_tokens(ids, mine.tokens, 3, "b"), only_b.top_tokens(ids, mine.tokens, 3)
    assert [[t for t, _ in pos] for pos in mine_top] == [[t for t, _ in pos] for pos in theirs_top]
    assert engine.top_tokens(ids, mine.tokens, 3) != mine_top  # as loaded: the base
    # contrastive decoding: the expert rows run the request's adapter, the amateur (a model of its own) as loaded
    (mine,) = generate("hi", method="contrastive", model=engine, adapter_name="b", amateur=str(tiny_path),
                       max_new_tokens=8)
    (theirs,) = generate("hi", method="contrastive", model=only_b, amateur=str(tiny_path), max_new_tokens=8)
    assert mine.tokens == theirs.tokens
    with pytest.raises(DecalignError, match="adapter_name: no adapter named c on the model"):
        generate("hi", model=engine, adapter_name="c", max_new_tokens=4)
    with pytest.raises(DecalignError, match="method cold needs a LoRA adapter"):
        generate("hi", method="cold", model=engine, max_new_tokens=4)


def test_adapter_names_are_checked(tiny_path, two_adapters):
    for name, message in (("default", "adapter name default is reserved"), ("__base__", "is reserved"),
                          ("a.b", "use letters, digits, - and _ only")):
        with pytest.raises(DecalignError, match=message):
            Engine.load(str(tiny_path), adapters={name: two_adapters["a"]})


def test_the_served_models_own_adapter_and_named_ones_together(tiny_path, two_adapters):
    """`--adapter A --adapter b=B`: the model as loaded runs with A (rows that name none, direct passes
    such as top tokens), b only where named; each as a model loaded with it alone."""
    from decalign.engine import BASE

    engine = Engine.load(str(tiny_path), adapter=two_adapters["a"], adapters={"b": two_adapters["b"]})
    assert engine.active_adapter() == "default" and engine.named_adapters == ("b",)
    ids = [engine.render(t) for t in ("hi", "The answer is")]
    mixed = engine.start(ids * 3, adapters=["default", "default", "b", "b", BASE, BASE]).logits
    plain = engine.start(ids * 3).logits
    assert torch.equal(mixed[:2], plain[:2])
    for folder, rows in ((two_adapters["a"], slice(0, 2)), (two_adapters["b"], slice(2, 4))):
        assert torch.allclose(Engine.load(str(tiny_path), adapter=folder).start(ids * 3).logits[rows], mixed[rows],
                              atol=1e-5)
    assert torch.allclose(Engine.load(str(tiny_path)).start(ids * 3).logits[4:], mixed[4:], atol=1e-5)
    (answer,) = generate("hi", model=engine, max_new_tokens=6)
    only_a = Engine.load(str(tiny_path), adapter=two_adapters["a"])
    assert answer.tokens == generate("hi", model=only_a, max_new_tokens=6)[0].tokens
    assert engine.top_tokens(ids[0], answer.tokens, 2) == engine.top_tokens(ids[0], answer.tokens, 2, "default")


def test_dexperts_anti_expert_beside_named_adapters(tiny_path, two_adapters, served_adapters, tmp_path):
    """DExperts on a named adapter loads its anti-expert onto the shared model for the request's
    length: its answer is the one a model loaded with that adapter alone gives, and afterwards the
    model is as it was (the same adapters, the base as loaded, the same greedy answers)."""
    from decalign.engine import BASE

    engine = served_adapters
    anti = save_adapter(tiny_path, tmp_path / "anti", seed=3)
    (before,) = generate("hi", model=engine, adapter_name="a", max_new_tokens=6)
    (mine,) = generate("hi", method="dexperts", model=engine, adapter_name="b", anti_adapter=str(anti),
                       max_new_tokens=8)
    only_b = Engine.load(str(tiny_path), adapter=two_adapters["b"])
    (theirs,) = generate("hi", method="dexperts", model=only_b, anti_adapter=str(anti), max_new_tokens=8)
    assert mine.tokens == theirs.tokens and mine.stats["branches"] == 3
    assert engine.adapter_names() == ["a", "b"] and engine.active_adapter() == BASE
    assert generate("hi", model=engine, adapter_name="a", max_new_tokens=6)[0].tokens == before.tokens
    (base,) = generate("hi", model=engine, max_new_tokens=6)
    assert base.tokens == generate("hi", model=Engine.load(str(tiny_path)), max_new_tokens=6)[0].tokens
