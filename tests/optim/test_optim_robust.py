"""Robust aggregation: honest mean, one bad replica (huge or NaN), determinism, reporting."""

from __future__ import annotations

import math
import random

import pytest
import torch

from optim import robust
from optim.errors import NoContributions

SHAPES = [(20, 10), (50,)]


def _honest(n: int) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in SHAPES]
    return {f"r{i}": [b + 0.1 * torch.randn(b.shape, generator=g) for b in base]
            for i in range(n)}


def _honest_mean(c: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([c[k][i] for k in c]).mean(0) for i in range(len(SHAPES))]


def _error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return robust.global_norm([x - y for x, y in zip(a, b, strict=True)])


def test_mean_of_honest_replicas() -> None:
    c = _honest(4)
    agg = robust.aggregate(c)
    assert agg.count == 4 and agg.dropped == {} and agg.included == ("r0", "r1", "r2", "r3")
    for a, b in zip(agg.tensors, _honest_mean(c), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["mean", "clipped_mean", "trimmed_mean"])
def test_nan_and_misshapen_replicas_are_dropped_and_reported(method: robust.Method) -> None:
    c = _honest(5)
    honest = robust.aggregate(c, method)
    c["nan"] = [torch.full(s, float("nan")) for s in SHAPES]
    c["a-shape"] = [torch.zeros(3, 3), torch.zeros(50)]  # sorts first: cannot set the shapes
    c["few"] = [torch.zeros(20, 10)]
    agg = robust.aggregate(c, method)
    assert agg.count == 5
    assert "non-finite" in agg.dropped["nan"] and "shape" in agg.dropped["a-shape"]
    assert "tensors" in agg.dropped["few"]
    assert all(torch.equal(a, b) for a, b in zip(agg.tensors, honest.tensors, strict=True))


def test_one_huge_replica_wrecks_the_mean_but_not_the_robust_rules() -> None:
    c = _honest(7)
    truth = _honest_mean(c)
    scale = robust.global_norm(truth)
    c["evil"] = [torch.full(s, 1e6) for s in SHAPES]
    assert _error(robust.aggregate(c, "mean").tensors, truth) > 1e3 * scale
    clipped = robust.aggregate(c, "clipped_mean")
    assert _error(clipped.tensors, truth) < 0.3 * scale and "max_norm" in clipped.detail
    trimmed = robust.aggregate(c, "trimmed_mean", trim=1)
    assert _error(trimmed.tensors, truth) < 0.05 * scale
    fixed = robust.aggregate(c, "clipped_mean", max_norm=scale)
    assert _error(fixed.tensors, truth) < 0.3 * scale


def test_bit_identical_whatever_the_order() -> None:
    c = _honest(6)
    for method in ("mean", "clipped_mean", "trimmed_mean"):
        ref = robust.aggregate(c, method)
        keys = list(c)
        random.Random(5).shuffle(keys)
        got = robust.aggregate({k: c[k] for k in keys}, method)
        assert all(torch.equal(a, b) for a, b in zip(ref.tensors, got.tensors, strict=True))


def test_trim_is_lowered_for_small_groups_and_reported() -> None:
    c = _honest(2)
    agg = robust.aggregate(c, "trimmed_mean", trim=2)
    assert agg.detail == "trim=0 of 2"
    stack = torch.tensor([[1.0], [2.0], [100.0]])
    assert robust.trimmed_mean(stack, 1).item() == 2.0


def test_norms_and_sums_are_deterministic_and_right() -> None:
    x = torch.randn(1001, dtype=torch.float64)
    assert robust.deterministic_sum(x) == pytest.approx(math.fsum(x.tolist()), rel=1e-12)
    ts = [torch.randn(7, 3), torch.randn(5)]
    assert robust.global_norm(ts) == pytest.approx(
        torch.linalg.norm(torch.cat([t.reshape(-1) for t in ts])).item(), rel=1e-6)
    clipped = robust.clip_by_norm(ts, 0.5)
    assert robust.global_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    assert robust.deterministic_sum(torch.zeros(0)) == 0.0


def test_nothing_valid_raises() -> None:
    with pytest.raises(NoContributions, match="skip this round"):
        robust.aggregate({"a": [torch.tensor([float("inf")])]}, shapes=[(1,)])
    with pytest.raises(NoContributions):
        robust.aggregate({})
