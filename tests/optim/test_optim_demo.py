"""DeMo math: chunking, DCT, error feedback, chooser averaging, determinism, validation, wire."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from optim import dct, demo
from optim.demo import Chunking, DemoConfig, DemoPacket, DemoState
from optim.errors import ConfigError, NoContributions, PacketRejected


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(128, 96, generator=g), torch.randn(100, generator=g),
            torch.randn(4, 6, 8, generator=g), torch.randn((), generator=g)]


def _grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def test_chunk_size_is_largest_divisor_up_to_target() -> None:
    cases = {128: 64, 96: 48, 100: 50, 37: 37, 64: 64, 50257: 29, 67: 1, 1: 1}
    for n, want in cases.items():
        assert dct.chunk_size(n, 64) == want


def test_dct_is_orthonormal_dct_ii_and_inverts() -> None:
    n = 8
    x = torch.randn(n, dtype=torch.float64)
    ch = Chunking.of((n,), 64)
    coeffs = ch.dct(x)[0]
    ref = [sum(x[i].item() * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
           * (math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)) for k in range(n)]
    torch.testing.assert_close(coeffs, torch.tensor(ref, dtype=torch.float64))
    y = torch.randn(128, 96, dtype=torch.float64)
    ch2 = Chunking.of(y.shape, 64)
    assert (ch2.c1, ch2.c2, ch2.n_chunks) == (64, 48, 4)
    torch.testing.assert_close(ch2.idct(ch2.dct(y), y.shape), y)


def test_every_weight_moves_by_exactly_lr_or_not_at_all() -> None:
    cfg = DemoConfig(lr=1e-3, topk=4)
    params = _params()
    state = DemoState(params, cfg)
    before = [p.clone() for p in params]
    packets = state.compress(params, _grads(params, 1))
    agg = demo.aggregate({"a": packets}, state.shapes, cfg)
    demo.apply(params, agg, cfg.lr)
    for p, b, r in zip(params, before, agg.tensors, strict=True):
        assert torch.equal(p, b - torch.sign(r).to(torch.float32) * cfg.lr)
        moved = (b - p).abs()
        nonzero = r != 0
        torch.testing.assert_close(moved[nonzero], torch.full_like(moved[nonzero], cfg.lr),
                                   rtol=1e-3, atol=1e-7)


def test_sign_of_exact_zero_leaves_weight_in_place() -> None:
    cfg = DemoConfig(lr=0.1)
    params = [torch.randn(16, 16)]
    before = params[0].clone()
    state = DemoState(params, cfg)
    packets = state.compress(params, [torch.zeros(16, 16)])
    agg = demo.aggregate({"a": packets}, state.shapes, cfg)
    assert torch.count_nonzero(agg.tensors[0]) == 0
    demo.apply(params, agg, cfg.lr)
    assert torch.equal(params[0], before)  # torch.sign(0) == 0: no move


@pytest.mark.parametrize("sign_bits", [False, True])
def test_error_feedback_removes_exactly_what_was_sent(sign_bits: bool) -> None:
    cfg = DemoConfig(lr=0.01, beta=0.9, topk=8, sign_bits=sign_bits, weight_decay=0.1)
    params = _params()
    state = DemoState(params, cfg)
    state.compress(params, _grads(params, 1))
    old = [d.clone() for d in state.delta]
    grads = _grads(params, 2)
    p_before = [p.clone() for p in params]
    packets = state.compress(params, grads)
    for p, pb in zip(params, p_before, strict=True):
        assert torch.equal(p, pb * (1 - 0.01 * 0.1))  # decoupled weight decay first
    for d_old, g, d_new, pk, ch in zip(old, grads, state.delta, packets, state.chunkings,
                                       strict=True):
        updated = d_old * cfg.beta + cfg.lr * g
        dense = torch.zeros(ch.n_chunks, ch.per_chunk)
        dense.scatter_(1, pk.indices.to(torch.int64), pk.decoded())
        torch.testing.assert_close(d_new + ch.idct(dense, d_new.shape), updated,
                                   rtol=1e-5, atol=1e-6)
        # and what was sent really is the top-k of the updated momentum's DCT
        coeffs = ch.dct(updated)
        k = ch.k(cfg.topk)
        kth = coeffs.abs().topk(k, dim=1).values[:, -1:]
        chosen = coeffs.abs().gather(1, pk.indices.to(torch.int64))
        assert bool((chosen >= kth * (1 - 1e-5)).all())


def _packet(n: int, idx: list[int], vals: list[float]) -> DemoPacket:
    return DemoPacket((n,), (1, n), torch.tensor([idx]).to(torch.uint16),
                      values=torch.tensor([vals], dtype=torch.float32))


def test_average_is_over_the_replicas_that_chose_each_index() -> None:
    cfg = DemoConfig(lr=1.0, topk=2, chunk=8)
    packets = {"a": [_packet(8, [0, 3], [1.0, 2.0])], "b": [_packet(8, [3, 5], [4.0, -6.0])]}
    agg = demo.aggregate(packets, [(8,)], cfg)
    coeffs = torch.zeros(8, dtype=torch.float64)
    coeffs[0], coeffs[3], coeffs[5] = 1.0, (2.0 + 4.0) / 2, -6.0  # not /W: 0.5, 3, -3
    basis = dct.dct_basis(8, torch.float64)
    torch.testing.assert_close(agg.tensors[0], basis.T @ coeffs, rtol=0, atol=1e-15)
    assert agg.included == ("a", "b") and agg.count == 2


def test_aggregate_is_bit_identical_whatever_the_dict_order() -> None:
    cfg = DemoConfig(lr=1e-3, topk=8)
    params = _params()
    packets = {}
    for r in range(5):
        state = DemoState(params, cfg)
        packets[f"replica-{r}"] = state.compress([p.clone() for p in params], _grads(params, r))
    ref = demo.aggregate(packets, [tuple(p.shape) for p in params], cfg)
    for seed in range(4):
        keys = list(packets)
        random.Random(seed).shuffle(keys)
        got = demo.aggregate({k: packets[k] for k in keys}, [p.shape for p in params], cfg)
        assert all(torch.equal(a, b) for a, b in zip(ref.tensors, got.tensors, strict=True))


@pytest.mark.parametrize("sign_bits", [False, True])
def test_two_replicas_stay_bit_identical(sign_bits: bool) -> None:
    cfg = DemoConfig(lr=1e-3, topk=8, sign_bits=sign_bits, weight_decay=0.01)
    a, b = _params(), _params()
    sa, sb = DemoState(a, cfg), DemoState(b, cfg)
    for step in range(5):
        pa = sa.compress(a, _grads(a, 100 + step))
        pb = sb.compress(b, _grads(b, 200 + step))
        agg_a = demo.aggregate({"a": pa, "b": pb}, sa.shapes, cfg)
        agg_b = demo.aggregate({"b": pb, "a": pa}, sb.shapes, cfg)
        demo.apply(a, agg_a, cfg.lr)
        demo.apply(b, agg_b, cfg.lr)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(sa.delta, sb.delta, strict=True))


def test_bad_packets_are_refused_and_the_replica_dropped() -> None:
    cfg = DemoConfig(lr=1.0, topk=2, chunk=8, value_bound=100.0)
    good = _packet(8, [0, 3], [1.0, 2.0])
    nan = _packet(8, [0, 3], [float("nan"), 2.0])
    with pytest.raises(PacketRejected, match="NaN"):
        demo.validate_packet(nan, (8,), cfg)
    bad = {
        "nan": nan,
        "huge": _packet(8, [0, 3], [1e6, 2.0]),
        "range": _packet(8, [0, 9], [1.0, 2.0]),
        "dup": _packet(8, [3, 3], [1.0, 2.0]),
        "shape": _packet(4, [0, 1], [1.0, 2.0]),
    }
    agg = demo.aggregate({"good": [good], **{k: [v] for k, v in bad.items()}}, [(8,)], cfg)
    assert agg.included == ("good",)
    assert set(agg.dropped) == set(bad)
    assert "value_bound" in agg.dropped["huge"] and "ascending" in agg.dropped["dup"]
    alone = demo.aggregate({"good": [good]}, [(8,)], cfg)
    assert torch.equal(agg.tensors[0], alone.tensors[0])
    with pytest.raises(NoContributions):
        demo.aggregate({"nan": [nan]}, [(8,)], cfg)


@pytest.mark.parametrize("sign_bits", [False, True])
def test_wire_round_trip_and_compact_size(sign_bits: bool) -> None:
    cfg = DemoConfig(lr=1e-3, topk=32, sign_bits=sign_bits)
    params = [torch.randn(64, 64)]
    packet = DemoState(params, cfg).compress(params, [torch.randn(64, 64)])[0]
    arrays = packet.to_arrays()
    assert arrays["indices"].dtype == np.uint16 and arrays["indices"].shape == (1, 32)
    back = DemoPacket.from_arrays(arrays)
    demo.validate_packet(back, (64, 64), cfg)
    assert torch.equal(back.decoded(), packet.decoded())
    size = demo.packet_nbytes(packet)
    if sign_bits:
        assert size == 2 * 32 + 32 // 8 + 4  # uint16 idx + 1 bit each + one fp32 scale: 2.25 k
        assert torch.equal(packet.decoded().abs(), packet.scales[:, None].expand(1, 32))
    else:
        assert size == 6 * 32  # uint16 idx + fp32 value
    assert size < 12 * 32  # the reference's int64 + fp32 encoding


def test_from_arrays_rejects_wrong_dtypes() -> None:
    arrays = _packet(8, [0, 3], [1.0, 2.0]).to_arrays()
    arrays["indices"] = arrays["indices"].astype(np.int64)
    with pytest.raises(PacketRejected, match="dtype"):
        DemoPacket.from_arrays(arrays)


def test_demo_lowers_a_quadratic_loss() -> None:
    torch.manual_seed(0)
    target = torch.randn(32, 32)
    cfg = DemoConfig(lr=2e-2, topk=16, chunk=16)
    replicas = {r: [torch.zeros(32, 32)] for r in "ab"}
    states = {r: DemoState(p, cfg) for r, p in replicas.items()}
    loss0 = float(((replicas["a"][0] - target) ** 2).mean())
    for _ in range(200):
        packets = {}
        for r, p in replicas.items():
            noisy = 2 * (p[0] - target) + 0.1 * torch.randn(32, 32)
            packets[r] = states[r].compress(p, [noisy])
        agg = demo.aggregate(packets, [(32, 32)], cfg)
        for p in replicas.values():
            demo.apply(p, agg, cfg.lr)
    assert torch.equal(replicas["a"][0], replicas["b"][0])
    assert float(((replicas["a"][0] - target) ** 2).mean()) < 0.05 * loss0


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="uint16"):
        DemoConfig(lr=1e-3, chunk=512)
    with pytest.raises(ConfigError):
        DemoConfig(lr=1e-3, beta=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_give_cpu_packets_and_identical_steps() -> None:
    cfg = DemoConfig(lr=1e-3, topk=8)
    cpu, gpu = _params(), [p.cuda() for p in _params()]
    s_cpu, s_gpu = DemoState(cpu, cfg), DemoState(gpu, cfg)
    pk_cpu = s_cpu.compress(cpu, _grads(cpu, 1))
    pk_gpu = s_gpu.compress(gpu, [g.cuda() for g in _grads(cpu, 1)])
    assert all(pk.indices.device.type == "cpu" for pk in pk_gpu)
    agg = demo.aggregate({"cpu": pk_cpu, "gpu": pk_gpu}, s_cpu.shapes, cfg)
    demo.apply(cpu, agg, cfg.lr)
    demo.apply(gpu, agg, cfg.lr)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu, strict=True))
