"""`shoal demo --model DIR`: a tiny random Llama and Qwen2 made with transformers'
`save_pretrained` (no hub) train in a 3-peer swarm of 2 block stages, the export loads with
`AutoModelForCausalLM.from_pretrained` and its logits equal Shoal's own stage-split forward,
the loss fell, and `shoal generate --greedy` decodes what transformers' greedy `generate` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peer.pipeline.hf import build_stage, run_stages
from tests.shoal.entry import shoal

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              {"attention_bias": True, "tie_word_embeddings": False, "rope_theta": 500.0}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"tie_word_embeddings": True}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_demo_trains_a_hugging_face_model_and_exports_it(name: str, tmp_path: Path) -> None:
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    source = tmp_path / "source"
    original = model_cls(config_cls(**COMMON, **extra)).float().eval()
    original.save_pretrained(str(source))
    out = tmp_path / "run"
    done = shoal("demo", "--model", source, "--stages", "2", "--peers", "3", "--steps", "10",
                 "--out", out, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["initial_loss"] - 0.2, summary["loss_by_step"]

    model_dir = out / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    assert type(hf) is model_cls
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    stages = [build_stage(model_dir, s, 2) for s in range(3)]
    with torch.no_grad():
        theirs, ours = hf(x).logits, run_stages(stages[0], stages[1:], x)
        assert not torch.allclose(theirs, original(x).logits, atol=1e-3)  # it trained
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())

    text = shoal("generate", "--model", model_dir, "--prompt", "def ", "--max-new-tokens", "32",
                 "--greedy", check=True, timeout=120).stdout
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("def ", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = hf.generate(ids, max_new_tokens=32, do_sample=False)
    assert text == "def " + tok.decode(greedy[0, ids.shape[1]:]) + "\n"


def test_save_hf_model_writes_what_transformers_loads(tmp_path: Path) -> None:
    from peer.pipeline.checkpoint import ExportError
    from shoal.hf_export import save_hf_model

    config_cls, model_cls, extra = MODELS["llama"]
    torch.manual_seed(1)
    original = model_cls(config_cls(**COMMON, **extra)).float().eval()
    original.save_pretrained(str(tmp_path / "source"))
    states = [build_stage(tmp_path / "source", s, 2).state_dict() for s in range(3)]
    out = save_hf_model(tmp_path / "out", str(tmp_path / "source"), states, {"run": "t"},
                        max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, original(x).logits)
    with pytest.raises(ExportError, match="missing tensors"):
        save_hf_model(tmp_path / "bad", str(tmp_path / "source"), states[:2], {})
