"""DeMo's robust rules (`optim.demo.aggregate` with method trimmed_mean / clipped_mean): each
replica's packets decoded on their own, combined by `optim.robust.aggregate`; deterministic,
and one sign-flipped x10 replica cannot set the signs of the step."""

from __future__ import annotations

import random

import pytest
import torch

from optim import dct, demo
from optim.demo import DemoConfig, DemoPacket, DemoState
from optim.errors import ConfigError

SHAPES = [(128, 96), (100,), (4, 6, 8), ()]


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _replica_packets(cfg: DemoConfig, n: int = 4, noise: float = 0.5) -> dict[str, list]:
    """n replicas whose gradients share a common part (as replicas of one stage do)."""
    g = torch.Generator().manual_seed(1)
    params = _params()
    common = [torch.randn(p.shape, generator=g) for p in params]
    packets = {}
    for r in range(n):
        grads = [c + noise * torch.randn(c.shape, generator=g) for c in common]
        packets[f"replica-{r}"] = DemoState(params, cfg).compress([p.clone() for p in params],
                                                                  grads)
    return packets


def _flipped_x10(packets: list[DemoPacket]) -> list[DemoPacket]:
    return [DemoPacket(p.shape, p.chunk, p.indices, values=p.values * -10.0) for p in packets]


def _sign_agreement(tensors: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    same = sum(int((torch.sign(t) == torch.sign(r)).sum()) for t, r in
               zip(tensors, reference, strict=True))
    return same / sum(r.numel() for r in reference)


def _packet(n: int, idx: list[int], vals: list[float]) -> DemoPacket:
    return DemoPacket((n,), (1, n), torch.tensor([idx]).to(torch.uint16),
                      values=torch.tensor([vals], dtype=torch.float32))


def test_one_replica_decode_is_its_chooser_mean() -> None:
    cfg = DemoConfig(lr=1e-3, topk=8)
    packets = _replica_packets(cfg, n=1)
    agg = demo.aggregate(packets, SHAPES, cfg)
    for pk, shape, t in zip(packets["replica-0"], SHAPES, agg.tensors, strict=True):
        assert torch.equal(demo.decode_packet(pk, shape, cfg), t)


def test_trimmed_mean_is_coordinatewise_over_the_replicas_decodes() -> None:
    cfg = DemoConfig(lr=1.0, topk=1, chunk=8)
    packets = {"a": [_packet(8, [0], [1.0])], "b": [_packet(8, [0], [2.0])],
               "c": [_packet(8, [0], [100.0])], "d": [_packet(8, [3], [-5.0])]}
    basis = dct.dct_basis(8, torch.float64)
    decodes = torch.stack([basis.T[:, 0] * 1.0, basis.T[:, 0] * 2.0, basis.T[:, 0] * 100.0,
                           basis.T[:, 3] * -5.0]).to(torch.float32)
    want = torch.sort(decodes, dim=0).values[1:3].to(torch.float64).mean(dim=0)
    agg = demo.aggregate(packets, [(8,)], cfg, "trimmed_mean", trim=1)
    torch.testing.assert_close(agg.tensors[0].to(torch.float64), want, rtol=0, atol=1e-6)
    assert agg.included == ("a", "b", "c", "d") and agg.method == "demo/trimmed_mean"
    assert agg.detail == "trim=1 of 1"
    # the chooser mean lets c's 100 through at index 0: (1 + 2 + 100) / 3
    mean = demo.aggregate(packets, [(8,)], cfg)
    assert float(mean.tensors[0][0]) == pytest.approx(float(basis.T[0, 0] * 103 / 3
                                                            + basis.T[0, 3] * -5.0))


@pytest.mark.parametrize("method", ["trimmed_mean", "clipped_mean"])
@pytest.mark.parametrize("sign_bits", [False, True])
def test_robust_rules_are_bit_identical_whatever_the_dict_order(method: str,
                                                                sign_bits: bool) -> None:
    cfg = DemoConfig(lr=1e-3, topk=8, sign_bits=sign_bits)
    packets = _replica_packets(cfg, n=5)
    ref = demo.aggregate(packets, SHAPES, cfg, method, trim=1)  # type: ignore[arg-type]
    assert all(t.dtype == torch.float32 for t in ref.tensors)
    for seed in range(3):
        keys = list(packets)
        random.Random(seed).shuffle(keys)
        got = demo.aggregate({k: packets[k] for k in keys}, SHAPES, cfg, method,  # type: ignore[arg-type]
                             trim=1)
        assert got.included == ref.included
        assert all(torch.equal(a, b) for a, b in zip(ref.tensors, got.tensors, strict=True))


def test_one_sign_flipped_x10_replica_sets_the_signs_under_the_mean_but_not_robust_rules() -> None:
    cfg = DemoConfig(lr=1e-3, topk=32)
    packets = _replica_packets(cfg)
    honest_three = {k: v for k, v in packets.items() if k != "replica-3"}
    reference = demo.aggregate(honest_three, SHAPES, cfg).tensors  # what the honest agree on
    attacked = {**packets, "replica-3": _flipped_x10(packets["replica-3"])}
    mean = demo.aggregate(attacked, SHAPES, cfg)
    assert _sign_agreement(mean.tensors, reference) < 0.6
    for method in ("trimmed_mean", "clipped_mean"):
        honest = demo.aggregate(packets, SHAPES, cfg, method, trim=1)  # type: ignore[arg-type]
        hostile = demo.aggregate(attacked, SHAPES, cfg, method, trim=1)  # type: ignore[arg-type]
        assert hostile.included == honest.included  # counted, but bounded
        assert _sign_agreement(hostile.tensors, reference) > 0.75, method
        assert (_sign_agreement(honest.tensors, reference)
                - _sign_agreement(hostile.tensors, reference)) < 0.05, method


def test_small_groups_lower_the_trim_and_bad_replicas_are_still_dropped() -> None:
    cfg = DemoConfig(lr=1e-3, topk=8, value_bound=1e3)
    packets = _replica_packets(cfg, n=2)
    bad = packets["replica-1"]
    packets["replica-1"] = [DemoPacket(p.shape, p.chunk, p.indices, values=p.values * 1e9)
                            for p in bad]
    agg = demo.aggregate(packets, SHAPES, cfg, "trimmed_mean", trim=1)
    assert agg.included == ("replica-0",) and "value_bound" in agg.dropped["replica-1"]
    assert agg.detail == "trim=0 of 1"
    for pk, shape, t in zip(packets["replica-0"], SHAPES, agg.tensors, strict=True):
        assert torch.equal(demo.decode_packet(pk, shape, cfg).to(torch.float32), t)


def test_unknown_method_is_refused() -> None:
    cfg = DemoConfig(lr=1e-3, topk=8)
    with pytest.raises(ConfigError, match="median"):
        demo.aggregate(_replica_packets(cfg, n=2), SHAPES, cfg, "median")  # type: ignore[arg-type]
