"""Tiny random-weight models for tests and examples: no download, a few seconds to build.

`make_tiny_model(path)` writes a 2-layer Llama with a small byte-level BPE tokenizer and a ChatML
chat template, so every code path (chat rendering, EOS, batching) runs as on a real model.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Bread needs flour, water, salt and yeast; knead it and let it rise.",
    "Be kind and helpful. Thank you for asking! I am happy to help you today.",
    "I hate this, it is terrible and awful. Never do that again.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. The answer is 42.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


# Shapes of published models (their layer sizes; the vocabulary is the tokenizer's), for speed checks
# at realistic sizes: random weights cost the same to run as trained ones.
SHAPES = {
    "0.5b": dict(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2),   # Qwen2.5-0.5B
    "1.5b": dict(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2),  # Qwen2.5-1.5B
    "8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8),   # Llama-3-8B
}


def random_model(*, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int | None = None,
                 heads: int = 4, kv_heads: int = 2, context: int = 512, logit_scale: float = 4.0, tokenizer=None,
                 device: str = "cpu", dtype: str = "float32", sliding_window: int | None = None):
    """(model, tokenizer): a random-weight Llama causal LM. The defaults give a 2-layer toy for tests;
    `**SHAPES["8b"]` with device="cuda", dtype="bfloat16" gives one of a real model's size, built on
    the GPU (it takes minutes on a CPU). With `sliding_window`, a Qwen2 of the same shape whose second
    half of layers attends to that many tokens only (full and sliding-window layers mixed, as Gemma's)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = tokenizer or make_tokenizer()
    window = {} if sliding_window is None else dict(use_sliding_window=True, sliding_window=sliding_window,
                                                    max_window_layers=layers // 2)
    config = (LlamaConfig if sliding_window is None else Qwen2Config)(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **window,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    with torch.no_grad():  # default init gives near-uniform next-token distributions; sharpen them
        model.lm_head.weight.normal_(0.0, logit_scale / hidden**0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def make_tiny_model(path: str | Path, **shape) -> Path:
    """Save `random_model(**shape)` and its tokenizer to `path` (safetensors)."""
    path = Path(path)
    model, tokenizer = random_model(**shape)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_classifier(path: str | Path, *, num_labels: int = 1, vocab_size: int = 280, chat: bool = False,
                         seed: int = 0) -> Path:
    """Save a random-weight Llama sequence classifier with its own tokenizer (a reward model)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = Path(path)
    tokenizer = make_tokenizer(vocab_size)
    if not chat:
        tokenizer.chat_template = None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                         id2label={i: f"label{i}" for i in range(num_labels)},
                         label2id={f"label{i}": i for i in range(num_labels)})
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_adapter(model_path: str | Path, out: str | Path, *, seed: int = 0,
                      targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """Save a random LoRA adapter (B not zero, so it changes the outputs) for the model at model_path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # before PEFT draws A: the whole adapter follows the seed, not the global RNG's state
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                                LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():  # LoRA B starts at zero (no effect); give the adapter something to say
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return Path(out)


def crash_once_reward(prompts, responses):
    """A reward for fault-tolerance tests (`python:decalign.testing:crash_once_reward`): the first
    process to score a prompt holding "CRASH:<path>" creates <path> and dies at once, as a worker
    killed mid-batch would; every later call scores answers by their length."""
    import os

    for prompt in prompts:
        text = prompt if isinstance(prompt, str) else " ".join(m.get("content", "") for m in prompt)
        if "CRASH:" in text:
            marker = Path(text.split("CRASH:", 1)[1].split()[0])
            try:
                marker.touch(exist_ok=False)
            except FileExistsError:
                continue
            os._exit(1)
    return [float(len(r)) for r in responses]
