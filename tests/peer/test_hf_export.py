"""An export is a Hugging Face model: transformers loads it as it is, with Shoal's numbers.

A tiny Shoal decoder (norm gains moved off 1 so a norm mix-up shows) is saved with
``save_model``, then loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``: the logits equal
Shoal's forward (fp32), the sharded layout loads too, and the tokenizer maps text to its UTF-8
bytes. (Greedy decoding against transformers' ``generate``: tests/shoal/test_generate_cli.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer.pipeline.checkpoint import save_model
from peer.pipeline.model import Decoder, ModelConfig

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=48, ffn_multiple_of=16,
                   rope_theta=500.0, norm_eps=1e-6, seed=5)


def _model() -> Decoder:
    model = Decoder(TINY)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Decoder, Path]:
    model = _model()
    return model, save_model(tmp_path_factory.mktemp("hf") / "model", TINY, model.state_dict())


def _hf(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    return model.float().eval()


def test_transformers_logits_equal_shoals(exported, tmp_path: Path) -> None:
    model, directory = exported
    hf = _hf(directory)
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 256, (2, TINY.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())
    sharded = save_model(tmp_path / "sharded", TINY, model.state_dict(), max_shard_bytes=30_000)
    assert (sharded / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(_hf(sharded)(x).logits, theirs)


def test_auto_tokenizer_round_trips_text_as_bytes(exported) -> None:
    _, directory = exported
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in ["héllo, wörld", "\x00\x01\n\t\x7f  two  spaces", "🐟 ∑ 中文 def f(x):"]:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode()), text
        assert tok.decode(ids) == text
    assert tok.decode([104, 0xFF]) == "h\ufffd"

