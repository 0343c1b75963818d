"""protocols/memory.py counts parameters without torch; this holds its arithmetic to the stages
the peers actually build (the built-in decoder, with CheckFree+'s edge copies, and Hugging Face
Llama / Qwen2 configs drawn from the config alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peer.pipeline.stage_host import build_stage_module
from protocols.memory import shape_of, stage_params
from protocols.runspec import RunSpec


def counted(spec: RunSpec) -> list[int]:
    return [sum(p.numel() for p in build_stage_module(spec, i).parameters())
            for i in range(spec.pipeline.stages + 1)]


@pytest.mark.parametrize("keys", [{}, {"model.n_layers": 5, "pipeline.stages": 3},
                                  {"model.d_model": 96, "model.n_heads": 3,
                                   "pipeline.checkfree_plus": True}])
def test_the_built_in_decoder(keys: dict) -> None:
    spec = RunSpec().replace(**keys)
    assert stage_params(spec) == counted(spec)


@pytest.mark.parametrize("arch,extra", [
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True,
                          "tie_word_embeddings": False}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True, "head_dim": 24}),
    ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
])
def test_hugging_face_configs(tmp_path: Path, arch: str, extra: dict) -> None:
    config = {"architectures": [arch], "vocab_size": 300, "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = RunSpec().replace(**{"model.hf": str(tmp_path), "model.hf_weights": False,
                                "model.d_model": 32, "model.n_layers": 3, "model.n_heads": 4,
                                "model.vocab": 300, "pipeline.stages": 2})
    assert shape_of(spec).source.endswith("config.json")
    assert stage_params(spec) == counted(spec)
