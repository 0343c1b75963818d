"""The decoder and its cut into stages: exactness, names, skips, CheckFree+ copies, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peer.pipeline.data import holdout, inputs_targets, load_corpus, shard
from peer.pipeline.model import Decoder, ModelConfig
from peer.pipeline.stages import (
    block_stage_from_state,
    count_params,
    init_block_stage,
    measure_throughput,
    run_pipeline,
    split,
    stage_layers,
)

TINY = ModelConfig(d_model=32, n_layers=5, n_heads=4, seq_len=16, ffn_multiple_of=16, seed=7)


def tokens(batch: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, TINY.seq_len + 1), generator=gen, dtype=torch.uint8)


def test_stages_in_order_equal_the_decoder_bit_for_bit_with_equal_gradients() -> None:
    full = Decoder(TINY)
    stage_zero, stages = split(TINY, 3)
    x, y = inputs_targets(tokens())
    loss_full, logits_full = full.loss(x, y)
    loss_staged, logits_staged = run_pipeline(stage_zero, stages, x, y)
    assert torch.equal(logits_full, logits_staged)
    assert torch.equal(loss_full, loss_staged)

    loss_full.backward()
    loss_staged.backward()
    staged_grads = {n: p.grad for m in (stage_zero, *stages) for n, p in m.named_parameters()}
    full_grads = {n: p.grad for n, p in full.named_parameters()}
    assert staged_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.equal(grad, staged_grads[name]), name


def test_layers_are_spread_evenly_with_extra_layers_on_the_earliest_stages() -> None:
    assert stage_layers(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layers(5, 5)[-1] == range(4, 5)
    _, stages = split(TINY, 2)
    assert [list(s.layer_indices) for s in stages] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="cannot cut 5 layers into 6"):
        stage_layers(5, 6)


def test_stage_state_names_are_global_layer_indices() -> None:
    stage_zero, stages = split(TINY, 2)
    assert set(stage_zero.state_dict()) == {"embedding.weight", "norm.weight"}
    keys = stages[1].state_dict()
    assert "layers.3.attn.wq.weight" in keys and "layers.4.mlp.down.weight" in keys
    assert not any("rotary" in k or k.endswith(("cos", "sin")) for k in keys)


def test_weights_are_a_function_of_the_config_and_leave_torch_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = Decoder(TINY), Decoder(TINY)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    other = Decoder(dataclasses.replace(TINY, seed=8))
    assert not torch.equal(a.embedding.weight, other.embedding.weight)


def test_a_stage_built_alone_equals_the_slice_split_cuts_out() -> None:
    _, stages = split(TINY, 2)
    alone = init_block_stage(TINY, range(3, 5))
    for (name, p), q in zip(stages[1].state_dict().items(), alone.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name


def test_block_stage_from_state_round_trips_and_refuses_another_config() -> None:
    _, stages = split(TINY, 2)
    rebuilt = block_stage_from_state(TINY, stages[1].state_dict())
    assert list(rebuilt.layer_indices) == [3, 4]
    h = torch.randn(2, TINY.seq_len, TINY.d_model)
    assert torch.equal(rebuilt(h), stages[1](h))
    wider = ModelConfig(d_model=64, n_layers=5, n_heads=4, seq_len=16)
    with pytest.raises(ValueError, match="does not fit this model config"):
        block_stage_from_state(wider, stages[1].state_dict())
    with pytest.raises(ValueError, match="contiguous"):
        block_stage_from_state(TINY, {"norm.weight": torch.ones(32)})


def test_skipping_and_swapping_layers_runs_and_changes_logits() -> None:
    full = Decoder(TINY)
    x, y = inputs_targets(tokens())
    logits = full(x)
    skipped = full(x, layers=[0, 2, 4])
    swapped = full(x, layers=[1, 0, 2, 3, 4])
    assert skipped.shape == logits.shape
    assert not torch.equal(skipped, logits) and not torch.equal(swapped, logits)
    assert torch.equal(full(x, layers=range(5)), logits)

    # A SkipPipe path over stages equals the Decoder running those stages' layers.
    stage_zero, stages = split(TINY, 3)  # layers [0, 1], [2, 3], [4]
    _, path_logits = run_pipeline(stage_zero, [stages[2], stages[0]], x, y)
    assert torch.equal(path_logits, full(x, layers=[4, 0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        full(x, layers=[0, 5])


def test_context_longer_than_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds seq_len=16"):
        Decoder(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_checkfree_plus_edge_stages_hold_copies_of_stage_zero() -> None:
    stage_zero, stages = split(TINY, 3, edge_copies=True)
    assert [s.holds_edge_copy for s in stages] == [True, False, True]
    assert "edge_embedding" in stages[0].state_dict()
    plain = split(TINY, 3)[1]
    assert count_params(stages[0]) == count_params(plain[0])  # buffers, not parameters
    restored = stages[2].restore_stage_zero()
    assert torch.equal(restored.embedding.weight, stage_zero.embedding.weight)
    h = torch.randn(2, TINY.seq_len, TINY.d_model)
    assert torch.equal(restored.head(h), stage_zero.head(h))
    with pytest.raises(RuntimeError, match="holds no copy of stage 0"):
        stages[1].restore_stage_zero()
    # A stage rebuilt from a state that carries the copy holds it again.
    assert block_stage_from_state(TINY, stages[0].state_dict()).holds_edge_copy


def test_config_validates_and_round_trips() -> None:
    assert ModelConfig().ffn_hidden == 704  # 2/3 * 4 * 256 = 682.7, rounded up to 64
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"d_model": 32, "dmodel": 3})
    with pytest.raises(ValueError, match="byte-level"):
        ModelConfig.from_dict({"vocab_size": 50257})
    with pytest.raises(ValueError, match=r"d_model must be int, got 32\.0"):
        ModelConfig.from_dict({"d_model": 32.0})
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        ModelConfig(n_layers=0)
    with pytest.raises(ValueError, match="heads of even width"):
        ModelConfig(d_model=30, n_heads=4)


def test_throughput_is_measured_without_touching_gradients() -> None:
    stage_zero, stages = split(TINY, 2)
    for module in (stage_zero, stages[0], Decoder(TINY)):
        assert measure_throughput(module, microbatch=2, seq_len=TINY.seq_len, repeats=1) > 0
        assert all(p.grad is None for p in module.parameters())
    assert count_params(Decoder(TINY)) == count_params(stage_zero) + sum(
        count_params(s) for s in stages)


def test_a_few_sgd_steps_on_the_stdlib_corpus_lower_the_held_out_loss() -> None:
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, seq_len=32)
    corpus = load_corpus(max_bytes=2 * 2**20)
    train, evaluation = shard(corpus, 0, 1, config.seq_len), holdout(corpus, config.seq_len)
    model = Decoder(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    eval_x, eval_y = inputs_targets(evaluation.batch(32, seed=0, step=0))
    with torch.no_grad():
        before = model.loss(eval_x, eval_y)[0].item()
    for step, batch in zip(range(30), train.batches(16, seed=0), strict=False):
        loss, _ = model.loss(*inputs_targets(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss), step
    with torch.no_grad():
        after = model.loss(eval_x, eval_y)[0].item()
    print(f"held-out loss {before:.3f} -> {after:.3f} nats/byte")
    assert after < before - 0.5, (before, after)
