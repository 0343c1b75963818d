"""Export: stage states back into one model, the files on disk, refusing bad ones, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peer.pipeline.checkpoint import (
    ExportError,
    assemble,
    decode,
    generate,
    kept_layers,
    load_config,
    load_model,
    save_model,
)
from peer.pipeline.hf_format import byte_chars, to_hf_name
from peer.pipeline.model import Decoder, ModelConfig
from peer.pipeline.stages import split

TINY = ModelConfig(d_model=32, n_layers=4, n_heads=4, seq_len=16, ffn_multiple_of=16, seed=3)


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    stage_zero, stages = split(TINY, 3, edge_copies=True)
    state = assemble(stage_zero.state_dict(), [s.state_dict() for s in stages])
    return save_model(tmp_path / "model", TINY, state, metadata={"step": 12})


def test_assemble_of_split_is_the_decoder_state_dict() -> None:
    stage_zero, stages = split(TINY, 3, edge_copies=True)
    state = assemble(stage_zero.state_dict(), [s.state_dict() for s in stages])
    reference = Decoder(TINY).state_dict()
    assert set(state) == set(reference)  # edge copies dropped, nothing else added
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_assemble_refuses_missing_and_duplicated_stages() -> None:
    stage_zero, stages = split(TINY, 3)
    states = [s.state_dict() for s in stages]
    with pytest.raises(ExportError, match=r"no block stage holds layers \[2\]"):
        assemble(stage_zero.state_dict(), [states[0], states[2]])
    with pytest.raises(ExportError, match="comes from both block stage 0 and 1"):
        assemble(stage_zero.state_dict(), [states[0], states[0], *states[1:]])
    with pytest.raises(ExportError, match=r"stage 0's state lacks 'norm\.weight'"):
        assemble({"embedding.weight": torch.zeros(256, 32)}, states)


def test_save_then_load_gives_identical_logits(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    description = config["shoal"]
    assert description["format"] == "shoal-decoder" and description["metadata"] == {"step": "12"}
    assert ModelConfig.from_dict(description["model"]) == TINY
    assert not list(exported.glob(".*.tmp"))
    loaded = load_model(exported)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), Decoder(TINY)(x))


def test_corrupt_or_truncated_weights_are_refused(exported: Path) -> None:
    weights = exported / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) // 2])
    with pytest.raises(ExportError, match=r"corrupt or truncated.*export the model again"):
        load_model(exported)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ExportError, match="corrupt or truncated"):
        load_model(exported)


def _rewrite(directory: Path, change: dict[str, torch.Tensor | None]) -> None:
    state = Decoder(TINY).state_dict()
    for name, tensor in change.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file({to_hf_name(k): v.contiguous() for k, v in state.items()},
              str(directory / "model.safetensors"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers.1.attn.wq.weight": torch.zeros(32, 16)}, r"has shape \(32, 16\) but"),
        ({"layers.3.mlp.up.weight": None}, "missing tensors layers.3.mlp.up.weight"),
        ({"lm_head.weight": torch.zeros(256, 32)}, "unexpected tensors lm_head.weight"),
        ({"norm.weight": torch.full((32,), float("nan"))}, "norm.weight holds 32 non-finite"),
        ({"norm.weight": torch.ones(32, dtype=torch.int32)}, "weights must be float"),
    ],
)
def test_mismatched_weights_are_refused(exported: Path, change: dict, message: str) -> None:
    _rewrite(exported, change)
    with pytest.raises(ExportError, match=message):
        load_model(exported)


def test_bad_config_is_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not an exported model"):
        load_model(tmp_path / "nowhere")
    config = exported / "config.json"
    description = json.loads(config.read_text())
    description["shoal"]["model"]["d_model"] = 64
    config.write_text(json.dumps(description))
    with pytest.raises(ExportError, match="different models"):
        load_model(exported)
    description["shoal"]["model"]["dmodel"] = 64
    config.write_text(json.dumps(description))
    with pytest.raises(ExportError, match="unknown model config keys"):
        load_model(exported)
    config.write_text("{")
    with pytest.raises(ExportError, match="not readable JSON"):
        load_model(exported)


def test_save_refuses_a_bad_state_without_writing(tmp_path: Path) -> None:
    state = Decoder(TINY).state_dict()
    state["embedding.weight"] = state["embedding.weight"] * float("inf")
    with pytest.raises(ExportError, match="non-finite"):
        save_model(tmp_path / "out", TINY, state)
    assert not (tmp_path / "out").exists()


def test_generate_is_deterministic_for_a_seed(exported: Path) -> None:
    model = load_model(exported)
    out = generate(model, b"def ", max_new_tokens=20, temperature=0.8, top_k=40, seed=1)
    assert isinstance(out, bytes) and len(out) == 20
    assert out == generate(model, b"def ", max_new_tokens=20, temperature=0.8, top_k=40, seed=1)
    assert out != generate(model, b"def ", max_new_tokens=20, temperature=0.8, top_k=40, seed=2)
    greedy = generate(model, b"x" * 40, max_new_tokens=5, temperature=0)  # longer than seq_len
    assert greedy == generate(model, b"x" * 40, max_new_tokens=5, temperature=0, seed=9)
    assert len(generate(model, b"", max_new_tokens=3)) == 3
    with pytest.raises(ValueError, match=r"top_k in 1\.\.256"):
        generate(model, b"a", 1, top_k=0)


def test_generate_with_skipped_layers(exported: Path) -> None:
    model = load_model(exported)
    assert kept_layers(8, 0.5) == [0, 2, 5, 7] and kept_layers(8, 0.0) == list(range(8))
    assert kept_layers(4, 0.9) == [0]
    layers = kept_layers(TINY.n_layers, 0.5)
    skipped = generate(model, b"import ", 16, temperature=0, layers=layers)
    assert len(skipped) == 16
    assert skipped == generate(model, b"import ", 16, temperature=0, layers=layers)
    prompt = torch.tensor([list(b"import ")])
    assert not torch.equal(model(prompt), model(prompt, layers))


def test_decode_replaces_invalid_utf8() -> None:
    assert decode("héllo".encode()) == "héllo"
    assert decode(b"ok\xff\xfe") == "ok\ufffd\ufffd"


def test_version_one_exports_still_load(tmp_path: Path) -> None:
    """Exports written before the Hugging Face layout: Shoal's names, its own config.json."""
    state = Decoder(TINY).state_dict()
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(old / "model.safetensors"),
              metadata={"format": "shoal-decoder"})
    (old / "config.json").write_text(json.dumps(
        {"format": "shoal-decoder", "version": 1, "model": TINY.to_dict(), "metadata": {}}))
    assert load_config(old) == TINY
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_model(old)(x), Decoder(TINY)(x))
    (old / "config.json").write_text(json.dumps({"format": "shoal-decoder", "version": 2}))
    with pytest.raises(ExportError, match="reads version 1"):
        load_model(old)
    (old / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="does not describe a Shoal model"):
        load_model(old)


def test_sharded_export_has_an_index_and_loads(tmp_path: Path) -> None:
    state = Decoder(TINY).state_dict()
    out = save_model(tmp_path / "m", TINY, state, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == {to_hf_name(k) for k in state}
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    assert not (out / "model.safetensors").exists()
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(load_model(out)(x), Decoder(TINY)(x))
    save_model(out, TINY, state)  # one file again: the shards and index of before are gone
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    save_model(out, TINY, state, max_shard_bytes=20_000)
    (out / shards[1]).unlink()
    with pytest.raises(ExportError, match=f"{shards[1]} does not exist"):
        load_model(out)


def test_byte_tokenizer_file_maps_bytes_to_ids(exported: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert tok.get_vocab_size() == 256 and len(set(byte_chars())) == 256
    for text in ["héllo, wörld", "\x00\x01\n\t\x7f ", "🐟 ∑ 中文", "".join(map(chr, range(256)))]:
        ids = tok.encode(text).ids
        assert ids == list(text.encode()), text
        assert tok.decode(ids) == text
    assert tok.decode([104, 0xFF, 0xFE]) == decode(bytes([104, 0xFF, 0xFE]))
    assert [tok.id_to_token(b) for b in range(256)] == byte_chars()
