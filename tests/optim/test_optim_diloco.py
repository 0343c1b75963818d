"""DiLoCo math: outer Nesterov step, quantised pseudo-gradients, delayed updates, outer state."""

from __future__ import annotations

import random

import pytest
import torch

from optim import diloco
from optim.diloco import DelayedOuter, OuterConfig, OuterOptimizer, QuantizedDelta
from optim.errors import ConfigError, NonFiniteValues, StateMismatch


def _tensors(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


SHAPES = [(17, 5), (300,), (2, 3, 4)]


def test_outer_step_matches_a_hand_computation() -> None:
    theta = [torch.tensor([1.0], dtype=torch.float64)]
    outer = OuterOptimizer(theta)  # lr 0.7, momentum 0.9, Nesterov
    outer.step(theta, [torch.tensor([0.5], dtype=torch.float64)])
    # buf = 0.5; g = 0.5 + 0.9*0.5 = 0.95; theta = 1 - 0.7*0.95
    assert theta[0].item() == pytest.approx(1 - 0.7 * 0.95, abs=1e-15)
    outer.step(theta, [torch.tensor([0.2], dtype=torch.float64)])
    # buf = 0.9*0.5 + 0.2 = 0.65; g = 0.2 + 0.9*0.65 = 0.785
    assert theta[0].item() == pytest.approx(1 - 0.7 * 0.95 - 0.7 * 0.785, abs=1e-15)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_is_bit_identical_to_torch_sgd(foreach: bool | None, nesterov: bool) -> None:
    ours = _tensors(0, SHAPES)
    ref = [torch.nn.Parameter(t.clone()) for t in ours]
    sgd = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=nesterov, foreach=foreach)
    outer = OuterOptimizer(ours, OuterConfig(nesterov=nesterov))
    for step in range(6):
        delta = _tensors(10 + step, SHAPES)
        for p, d in zip(ref, delta, strict=True):
            p.grad = d.clone()
        sgd.step()
        outer.step(ours, delta)
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, ref, strict=True))


def test_pseudo_gradient_is_old_minus_new_and_a_round_moves_toward_local() -> None:
    theta = _tensors(0, SHAPES)
    local = [t.clone().requires_grad_(True) for t in theta]
    inner = diloco.inner_optimizer(local)
    group = inner.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (4e-4, 0.1, (0.9, 0.95))
    for _ in range(5):
        inner.zero_grad()
        sum(((p - 3.0) ** 2).sum() for p in local).backward()
        inner.step()
    delta = diloco.pseudo_gradient(theta, local)
    for t, loc, d in zip(theta, local, delta, strict=True):
        assert torch.equal(d, t - loc.detach())
    avg = diloco.average({"a": delta})
    before = [t.clone() for t in theta]
    plain = OuterConfig(momentum=0.0, nesterov=False, lr=1.0)
    OuterOptimizer(theta, plain).step(theta, avg.tensors)
    for t, loc in zip(theta, local, strict=True):
        torch.testing.assert_close(t, loc.detach())  # lr 1, no momentum: theta <- theta_local
    assert not torch.equal(theta[0], before[0])


def test_int8_round_trip_error_is_within_half_a_step_per_block() -> None:
    x = torch.randn(10_000) * torch.linspace(0.01, 10, 10_000)
    x[4096:8192] = 0.0  # an all-zero block
    q = diloco.quantize(x, "int8", block=4096)
    assert q.data.dtype == torch.int8 and q.scales is not None and q.scales.numel() == 3
    back = diloco.dequantize(q)
    blocks = torch.nn.functional.pad(x, (0, 3 * 4096 - x.numel())).reshape(3, 4096)
    bound = (blocks.abs().amax(dim=1) / 127 / 2 * (1 + 1e-6)).repeat_interleave(4096)[:10_000]
    assert bool(((back - x).abs() <= bound).all())
    assert torch.equal(back[4096:8192], torch.zeros(4096))
    assert torch.equal(diloco.dequantize(diloco.quantize(x, "int8", 4096)), back)  # deterministic
    assert q.nbytes() == 3 * 4096 + 3 * 4  # ~4x smaller than fp32
    again = QuantizedDelta.from_arrays(q.to_arrays())
    assert torch.equal(diloco.dequantize(again), back)


def test_fp16_is_lossless_ish_and_refuses_overflow() -> None:
    x = torch.randn(1000, 7) * 1e-2
    back = diloco.dequantize(diloco.quantize(x, "fp16"))
    assert back.shape == x.shape
    assert bool(((back - x).abs() <= x.abs() * 2**-11 + 6e-8).all())
    with pytest.raises(NonFiniteValues, match="fp16"):
        diloco.quantize(torch.tensor([1e5]), "fp16")
    with pytest.raises(NonFiniteValues):
        diloco.quantize(torch.tensor([float("nan")]), "int8")


def test_average_is_order_independent_and_reports_who_counted() -> None:
    deltas = {f"r{i}": _tensors(i, SHAPES) for i in range(5)}
    deltas["bad"] = [torch.full(s, float("nan")) for s in SHAPES]
    ref = diloco.average(deltas, SHAPES)
    keys = list(deltas)
    random.Random(1).shuffle(keys)
    got = diloco.average({k: deltas[k] for k in keys}, SHAPES)
    assert all(torch.equal(a, b) for a, b in zip(ref.tensors, got.tensors, strict=True))
    assert ref.count == 5 and "bad" in ref.dropped


def test_delayed_variant_applies_round_r_at_the_end_of_round_r_plus_1() -> None:
    deltas = [_tensors(20 + r, SHAPES) for r in range(4)]
    sync = _tensors(0, SHAPES)
    sync_outer = OuterOptimizer(sync)
    sync_history = []
    for d in deltas:
        sync_outer.step(sync, d)
        sync_history.append([t.clone() for t in sync])
    theta = _tensors(0, SHAPES)
    start = [t.clone() for t in theta]
    delayed = DelayedOuter(OuterOptimizer(theta))
    delayed.end_round(theta, None)  # round 0: delta_0 is still in flight, theta_1 = theta_0
    assert all(torch.equal(a, b) for a, b in zip(theta, start, strict=True))
    for r in range(1, 4):
        with pytest.raises(ConfigError, match="needs the average"):
            delayed.end_round(theta, None)
        delayed.end_round(theta, deltas[r - 1])  # end of round r applies round r-1
        assert all(torch.equal(a, b) for a, b in zip(theta, sync_history[r - 1], strict=True))
    delayed.flush(theta, deltas[3])
    assert all(torch.equal(a, b) for a, b in zip(theta, sync_history[3], strict=True))


def test_round_zero_refuses_an_average() -> None:
    theta = _tensors(0, SHAPES)
    with pytest.raises(ConfigError, match="round 0"):
        DelayedOuter(OuterOptimizer(theta)).end_round(theta, theta)


def test_outer_state_export_import_round_trip() -> None:
    a = _tensors(0, SHAPES)
    outer_a = OuterOptimizer(a)
    for s in range(3):
        outer_a.step(a, _tensors(30 + s, SHAPES))
    state = outer_a.state_dict()
    assert set(state) == {"steps", "momentum.0", "momentum.1", "momentum.2"}
    b = [t.clone() for t in a]
    outer_b = OuterOptimizer(b)
    outer_b.load_state_dict(state)
    assert outer_b.steps == 3
    last = _tensors(99, SHAPES)
    outer_a.step(a, last)
    outer_b.step(b, last)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(StateMismatch, match="shape"):
        OuterOptimizer(_tensors(0, [(3,)] * 3)).load_state_dict(state)
    with pytest.raises(StateMismatch, match="key"):
        OuterOptimizer(a).load_state_dict({"steps": torch.tensor(1), "moment.0": a[0]})
    delayed = DelayedOuter(OuterOptimizer(a))
    delayed.end_round(a, None)
    again = DelayedOuter(OuterOptimizer(a))
    again.load_state_dict(delayed.state_dict())
    assert again.round == 1


def test_config_and_shapes_are_validated() -> None:
    with pytest.raises(ConfigError):
        OuterConfig(quant="int2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        OuterConfig(momentum=0.0, nesterov=True)
    theta = _tensors(0, SHAPES)
    with pytest.raises(ValueError, match="shapes"):
        OuterOptimizer(theta).step(theta, _tensors(0, [(1,)] * 3))
