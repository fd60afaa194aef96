"""Built-in model presets for the CLI, and the ``file.py:factory`` form.

``build("gpt2")`` returns ``(model, example_inputs)`` with the model built from a HuggingFace
``transformers`` config (nothing is downloaded) on the ``meta`` device by default, so even
``gpt3-175b`` builds on a laptop. ``build("path/to/models.py:make")`` loads that file and calls
``make()``, which must return ``(model, example_inputs)``.

Every preset sets dropout to 0, ``attn_implementation="sdpa"`` and ``use_cache=False``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import AutoparError


@dataclass(frozen=True)
class Preset:
    family: str  # "gpt2" | "llama" | "mixtral"
    config: dict[str, Any]  # kwargs of the transformers config
    batch: int  # default batch size
    seq: int  # default sequence length


_GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}


def _gpt(layers: int, hidden: int, heads: int, *, vocab: int = 50257, positions: int = 2048) -> dict[str, Any]:
    return {
        "n_layer": layers,
        "n_embd": hidden,
        "n_head": heads,
        "vocab_size": vocab,
        "n_positions": positions,
        "bos_token_id": vocab - 1,  # GPT-2's <|endoftext|> is the last token
        "eos_token_id": vocab - 1,
    }


def _llama(
    layers: int, hidden: int, inter: int, heads: int, kv: int, *, vocab: int, positions: int, theta: float
) -> dict[str, Any]:
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rms_norm_eps": 1e-5,
    }


PRESETS: dict[str, Preset] = {
    "gpt2": Preset("gpt2", _gpt(12, 768, 12, positions=1024), batch=8, seq=1024),
    "gpt3-1.3b": Preset("gpt2", _gpt(24, 2048, 16), batch=8, seq=2048),
    "gpt3-13b": Preset("gpt2", _gpt(40, 5120, 40), batch=8, seq=2048),
    "gpt3-175b": Preset("gpt2", _gpt(96, 12288, 96), batch=8, seq=2048),
    "llama3-8b": Preset(
        "llama", _llama(32, 4096, 14336, 32, 8, vocab=128256, positions=8192, theta=500000.0), batch=4, seq=8192
    ),
    "llama3-70b": Preset(
        "llama", _llama(80, 8192, 28672, 64, 8, vocab=128256, positions=8192, theta=500000.0), batch=4, seq=8192
    ),
    "mixtral-8x7b": Preset(
        "mixtral",
        {
            **_llama(32, 4096, 14336, 32, 8, vocab=32000, positions=32768, theta=1e6),
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
        batch=4,
        seq=4096,
    ),
    "mixtral-8x22b": Preset(
        "mixtral",
        {
            **_llama(56, 6144, 16384, 48, 8, vocab=32768, positions=65536, theta=1e6),
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
        batch=4,
        seq=4096,
    ),
    "tiny-gpt2": Preset("gpt2", _gpt(2, 64, 4, vocab=128, positions=64), batch=2, seq=16),
    "tiny-llama": Preset("llama", _llama(2, 64, 128, 4, 2, vocab=128, positions=64, theta=10000.0), batch=2, seq=16),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def build(name_or_spec: str, *, batch: int | None = None, seq: int | None = None, device="meta") -> tuple[Any, tuple]:
    """Build a preset (or call ``file.py:factory``) and return ``(model, example_inputs)``.

    ``batch`` and ``seq`` override a preset's defaults; they do not apply to ``file.py:factory``.
    """
    if _is_file_spec(name_or_spec):
        if batch is not None or seq is not None:
            raise AutoparError(
                f"--batch/--seq apply to built-in presets only; {name_or_spec!r} makes its own example inputs"
            )
        return _build_from_file(name_or_spec)
    preset = PRESETS.get(name_or_spec)
    if preset is None:
        raise AutoparError(
            f"unknown model {name_or_spec!r}: use a built-in preset ({', '.join(PRESETS)}) "
            "or path/to/file.py:factory, where factory() returns (model, example_inputs)"
        )
    batch = preset.batch if batch is None else batch
    seq = preset.seq if seq is None else seq
    for what, n in (("batch", batch), ("seq", seq)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise AutoparError(f"{what} must be a positive int, got {n!r}")
    return _build_preset(preset, batch, seq, device)


def _build_preset(preset: Preset, batch: int, seq: int, device) -> tuple[Any, tuple]:
    import torch

    try:
        import transformers
    except ImportError as e:  # transformers is an optional dependency
        raise AutoparError(
            f"built-in model presets need HuggingFace transformers ({e}); pip install 'autopar[hf]'"
        ) from None

    common = {"attn_implementation": "sdpa", "use_cache": False}
    if preset.family == "gpt2":
        config = transformers.GPT2Config(**preset.config, **_GPT2_NO_DROPOUT, **common)
        cls = transformers.GPT2LMHeadModel
    elif preset.family == "llama":
        config = transformers.LlamaConfig(**preset.config, attention_dropout=0.0, **common)
        cls = transformers.LlamaForCausalLM
    elif preset.family == "mixtral":
        config = transformers.MixtralConfig(
            **preset.config, attention_dropout=0.0, experts_implementation="batched_mm", **common
        )
        cls = transformers.MixtralForCausalLM
    else:
        raise AssertionError(f"unknown preset family {preset.family!r}")

    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and seq > limit:
        raise AutoparError(f"seq {seq} is longer than the model's {limit} positions")

    with torch.device(device):
        model = cls(config)
        input_ids = torch.randint(0, config.vocab_size, (batch, seq), dtype=torch.long)
    return model, (input_ids,)


def _is_file_spec(spec: str) -> bool:
    file_part, sep, _ = spec.rpartition(":")
    return bool(sep) and file_part.endswith(".py")


def _build_from_file(spec: str) -> tuple[Any, tuple]:
    file_part, _, factory_name = spec.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise AutoparError(f"model file {file_part!r} does not exist (from {spec!r})")
    if not factory_name.isidentifier():
        raise AutoparError(f"bad factory name {factory_name!r} in {spec!r}: expected path/to/file.py:function_name")
    module_name = f"autopar_user_model_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise AutoparError(f"cannot load {file_part!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # so that dataclasses / pickling inside the file work
    try:
        loader_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    factory: Callable | None = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AutoparError(f"{file_part!r} has no function {factory_name!r}; its callables are {names}")
    result = factory()
    import torch.nn as nn

    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise AutoparError(
            f"{spec} must return (model, example_inputs) with model an nn.Module, got {_describe(result)}"
        )
    model, example_inputs = result
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return model, tuple(example_inputs)


def _describe(x: Any) -> str:
    if isinstance(x, tuple):
        return "(" + ", ".join(type(v).__name__ for v in x) + ")"
    return type(x).__name__
