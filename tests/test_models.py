import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from autopar import models  # noqa: E402
from autopar.errors import AutoparError  # noqa: E402


def test_list_presets():
    names = models.list_presets()
    for name in ("gpt2", "gpt3-1.3b", "gpt3-13b", "gpt3-175b", "llama3-8b", "llama3-70b",
                 "mixtral-8x7b", "mixtral-8x22b", "tiny-gpt2", "tiny-llama"):
        assert name in names


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_presets_on_meta(name):
    model, (ids,) = models.build(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert ids.device.type == "meta" and ids.dtype == torch.long and tuple(ids.shape) == (2, 16)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_presets_run_on_cpu(name):
    model, (ids,) = models.build(name, batch=3, seq=8, device="cpu")
    assert tuple(ids.shape) == (3, 8) and ids.device.type == "cpu"
    assert int(ids.max()) < model.config.vocab_size
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False
    logits = model(ids).logits
    assert tuple(logits.shape) == (3, 8, 128)
    assert torch.isfinite(logits).all()


def test_gpt2_preset_has_124m_parameters():
    model, (ids,) = models.build("gpt2")
    n = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < n < 125_000_000
    assert tuple(ids.shape) == (8, 1024)


def test_mixtral_uses_batched_mm_experts():
    model, _ = models.build("mixtral-8x7b", batch=1, seq=32)
    assert model.config.num_local_experts == 8
    assert getattr(model.config, "_experts_implementation", "batched_mm") == "batched_mm"


def test_unknown_preset_lists_presets():
    with pytest.raises(AutoparError) as info:
        models.build("gpt5")
    msg = str(info.value)
    assert "'gpt5'" in msg and "tiny-gpt2" in msg and "llama3-70b" in msg and "file.py:factory" in msg


def test_seq_longer_than_positions():
    with pytest.raises(AutoparError, match="positions"):
        models.build("tiny-gpt2", seq=65)


def test_file_factory(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent("""
        import torch
        from dataclasses import dataclass

        @dataclass
        class Cfg:
            d: int = 4

        def make():
            return torch.nn.Linear(Cfg().d, 2), (torch.randn(3, 4),)
    """))
    model, inputs = models.build(f"{path}:make")
    assert isinstance(model, torch.nn.Linear)
    assert isinstance(inputs, tuple) and tuple(inputs[0].shape) == (3, 4)
    assert tuple(model(*inputs).shape) == (3, 2)


def test_file_factory_errors(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text("def make():\n    return 42\n")
    with pytest.raises(AutoparError, match="has no function 'build'"):
        models.build(f"{path}:build")
    with pytest.raises(AutoparError, match=r"must return \(model, example_inputs\)"):
        models.build(f"{path}:make")
    with pytest.raises(AutoparError, match="does not exist"):
        models.build(f"{tmp_path / 'missing.py'}:make")
