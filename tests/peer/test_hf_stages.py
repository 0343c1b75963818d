"""Hugging Face decoders in (peer/pipeline/hf.py): a tiny random Llama and Qwen2 made locally
with transformers' `save_pretrained` (no hub), cut into stages that each read only their own
tensors; the stages run in order give transformers' logits (fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peer.pipeline.hf import HFConfig, HFModelError, build_stage, read_tensors, run_stages

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6}
MODELS = {
    "llama-bias-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          {"attention_bias": True, "mlp_bias": True, "rope_theta": 500.0,
                           "tie_word_embeddings": False}),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   {"rope_theta": 1e6, "tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_dir(request, tmp_path_factory: pytest.TempPathFactory):
    config_cls, model_cls, extra = MODELS[request.param]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra)).float().eval()
    with torch.no_grad():  # move norms and biases off their init so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(0.2 * torch.randn(p.shape))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(directory), max_shard_size="40KB")
    return model, directory


def test_stage_split_forward_equals_transformers(hf_dir) -> None:
    model, directory = hf_dir
    assert (directory / "model.safetensors.index.json").exists()  # sharded: per-tensor reads
    stage_zero = build_stage(directory, 0, 2)
    blocks = [build_stage(directory, s, 2) for s in (1, 2)]
    assert [list(b.layer_indices) for b in blocks] == [[0, 1], [2]]
    assert all(k.startswith("model.layers.2.") for k in blocks[1].state_dict())
    assert not any(k.startswith("model.layers") for k in stage_zero.state_dict())
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = run_stages(stage_zero, blocks, x), model(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())


def test_from_the_config_alone_every_stage_draws_the_same_weights(hf_dir) -> None:
    model, directory = hf_dir
    c = HFConfig.read(directory)
    parts = [build_stage(directory, s, 3, weights=False, seed=4) for s in range(4)]
    again = build_stage(directory, 2, 3, weights=False, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(parts[2].state_dict().values(),
                                                  again.state_dict().values(), strict=True))
    full = {k: v for p in parts for k, v in p.state_dict().items()}
    fresh = type(model)(model.config).float().eval()
    missing, unexpected = fresh.load_state_dict(full, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (c.tied or not missing)
    if c.tied:
        fresh.tie_weights()
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(run_stages(parts[0], parts[1:], x), fresh(x).logits, atol=1e-5)


def test_unsupported_or_broken_folders_are_refused(hf_dir, tmp_path: Path) -> None:
    _, directory = hf_dir
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHead"]}))
    with pytest.raises(HFModelError, match="'GPT2LMHead' is not supported"):
        HFConfig.read(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFModelError, match="does not exist: the folder has no weights"):
        build_stage(tmp_path, 1, 2)
    with pytest.raises(HFModelError, match="index names no file"):
        read_tensors(directory, ["model.layers.9.mlp.up_proj.weight"])


def test_a_run_spec_names_the_folder_and_stage_hosts_build_from_it(hf_dir) -> None:
    from peer.pipeline.stage_host import StageHost
    from protocols.runspec import RunSpec, RunSpecError

    model, directory = hf_dir
    keys = {"model.hf": str(directory), "model.d_model": 32, "model.n_layers": 3,
            "model.n_heads": 4, "model.vocab": 300, "pipeline.stages": 2}
    spec = RunSpec().replace(**keys)
    assert RunSpec.from_toml(spec.to_toml()) == spec
    with pytest.raises(RunSpecError, match=r"model\.vocab must be >= 256"):
        RunSpec().replace(**{**keys, "model.vocab": 100})
    with pytest.raises(RunSpecError, match=r"pipeline\.checkfree_plus must be false"):
        RunSpec().replace(**{**keys, "pipeline.checkfree_plus": True})
    hosts = [StageHost(spec, s) for s in range(3)]
    try:
        x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
        h = hosts[0].embed("mb", x[:, :-1], 0)
        for host in hosts[1:]:
            h = host.forward("mb", h, 0)
        loss, grad = hosts[0].head("mb", h, x[:, 1:])
        with torch.no_grad():
            logits = model(x[:, :-1]).logits
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), x[:, 1:].reshape(-1))
        assert abs(loss - float(expected)) < 1e-5 and grad.shape == h.shape
    finally:
        for host in hosts:
            host.close()
    fresh = StageHost(spec.replace(**{"model.hf_weights": False}), 2)
    try:  # --init-model / --resume with a Hugging Face folder: this stage's tensors from it
        assert not torch.equal(fresh.params()["model.layers.2.mlp.up_proj.weight"],
                               model.model.layers[2].mlp.up_proj.weight)
        fresh.load_exported(str(directory))
        for name, p in fresh.params().items():
            assert torch.equal(p, model.state_dict()[name]), name
    finally:
        fresh.close()
