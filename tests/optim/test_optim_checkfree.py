"""CheckFree recovery: key mapping, weighted/uniform averages, copies, re-init, LR boost, plans."""

from __future__ import annotations

import math

import pytest
import torch

from optim import checkfree
from optim.checkfree import CheckFreeConfig
from optim.errors import ConfigError, NonFiniteValues, ShapeMismatch, StateMismatch


def _stage(first_layer: int, n_layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(first_layer, first_layer + n_layers):
        out[f"layers.{layer}.attn.wq.weight"] = torch.randn(8, 8, generator=g)
        out[f"layers.{layer}.norm.weight"] = torch.randn(8, generator=g)
    return out


def test_canonical_keys_replace_layer_indices_by_position() -> None:
    keys = checkfree.canonical_keys(["layers.7.mlp.w1", "layers.6.mlp.w1", "norm.weight",
                                     "layers.12.experts.3.w"])
    assert keys == {"layers.1.mlp.w1": "layers.7.mlp.w1", "layers.0.mlp.w1": "layers.6.mlp.w1",
                    "norm.weight": "norm.weight", "layers.2.experts.3.w": "layers.12.experts.3.w"}


def test_weighted_average_matches_the_formula_and_uses_the_lost_stages_names() -> None:
    prev, nxt, lost = _stage(0, seed=1), _stage(4, seed=2), _stage(2, seed=3)
    prev_copy = {k: v.clone() for k, v in prev.items()}
    rec = checkfree.weighted_average(prev, nxt, 0.3, 0.9, like=lost)
    assert rec.method == "weighted" and rec.note == "" and set(rec.state) == set(lost)
    a, b = 0.3 + 1e-4, 0.9 + 1e-4
    got = rec.state["layers.3.attn.wq.weight"]
    want = (a * prev["layers.1.attn.wq.weight"] + b * nxt["layers.5.attn.wq.weight"]) / (a + b)
    torch.testing.assert_close(got, want)
    assert all(torch.equal(prev[k], prev_copy[k]) for k in prev)  # neighbours untouched
    assert rec.weights == (a, b)


def test_unusable_norms_fall_back_to_uniform() -> None:
    prev, nxt = _stage(0, seed=1), _stage(4, seed=2)
    uniform = checkfree.uniform_average(prev, nxt)
    assert uniform.method == "uniform"
    for w in [(float("nan"), 1.0), (1.0, float("inf")), (-1.0, 1.0)]:
        rec = checkfree.weighted_average(prev, nxt, *w)
        assert rec.method == "uniform" and "unusable" in rec.note
        assert all(torch.equal(rec.state[k], uniform.state[k]) for k in uniform.state)
    zero = checkfree.weighted_average(prev, nxt, 0.0, 0.0)  # floor makes them equal
    for k in uniform.state:
        torch.testing.assert_close(zero.state[k], uniform.state[k])
    no_floor = CheckFreeConfig(norm_floor=0)
    both_zero = checkfree.weighted_average(prev, nxt, 0.0, 0.0, config=no_floor)
    assert both_zero.method == "uniform" and "zero" in both_zero.note


def test_mismatches_are_clear_errors() -> None:
    prev, nxt = _stage(0), _stage(4)
    bad_shape = dict(nxt)
    bad_shape["layers.4.norm.weight"] = torch.zeros(9)
    with pytest.raises(ShapeMismatch, match=r"layers\.0\.norm\.weight"):
        checkfree.weighted_average(prev, bad_shape, 1.0, 1.0)
    with pytest.raises(StateMismatch, match="copy_neighbor"):
        checkfree.weighted_average(prev, _stage(4, n_layers=3), 1.0, 1.0)
    nan = {k: v.clone() for k, v in nxt.items()}
    nan["layers.5.norm.weight"][0] = float("nan")
    with pytest.raises(NonFiniteValues):
        checkfree.weighted_average(prev, nan, 1.0, 1.0)
    with pytest.raises(StateMismatch, match="lost stage"):
        checkfree.weighted_average(prev, nxt, 1.0, 1.0, like=_stage(2, n_layers=1))


def test_copy_neighbor_clones_and_renames() -> None:
    nxt = _stage(4)
    rec = checkfree.copy_neighbor(nxt, like=list(_stage(6)))
    assert rec.method == "copy"
    assert torch.equal(rec.state["layers.6.attn.wq.weight"], nxt["layers.4.attn.wq.weight"])
    rec.state["layers.6.attn.wq.weight"].add_(1.0)
    assert not torch.equal(rec.state["layers.6.attn.wq.weight"], nxt["layers.4.attn.wq.weight"])


def test_random_reinit_is_seeded_and_keeps_shapes() -> None:
    like = _stage(2)
    a, b = checkfree.random_reinit(like, seed=3), checkfree.random_reinit(like, seed=3)
    assert a.method == "random"
    for k, v in like.items():
        assert a.state[k].shape == v.shape and torch.equal(a.state[k], b.state[k])
    assert not torch.equal(a.state["layers.2.attn.wq.weight"], like["layers.2.attn.wq.weight"])
    assert torch.equal(a.state["layers.2.norm.weight"], like["layers.2.norm.weight"])


def test_lr_boost() -> None:
    assert checkfree.LR_BOOST == 1.1
    assert checkfree.boosted_lr(1e-3) == pytest.approx(1.1e-3)
    assert checkfree.boosted_lr(1e-3, CheckFreeConfig(lr_boost=1.2)) == pytest.approx(1.2e-3)
    with pytest.raises(ConfigError, match=r"1\.1-1\.2"):
        CheckFreeConfig(lr_boost=3.0)


def test_plan_recovery() -> None:
    alive = {1, 2, 3, 5, 6}
    assert checkfree.plan_recovery(4, 6, alive, replica_alive=True).method == "copy_replica"
    mid = checkfree.plan_recovery(4, 6, alive)
    assert (mid.method, mid.sources, mid.lr_boost) == ("weighted_average", (3, 5), True)
    assert checkfree.plan_recovery(1, 6, {2, 3, 4, 5, 6}).sources == (2,)
    assert checkfree.plan_recovery(2, 6, {1, 3, 4, 5, 6}).sources == (1,)
    assert checkfree.plan_recovery(6, 6, {1, 2, 3, 4, 5}).sources == (5,)
    assert checkfree.plan_recovery(5, 6, {1, 2, 3, 4, 6}).method == "copy_neighbor"
    adjacent = checkfree.plan_recovery(3, 6, {1, 2, 5, 6})
    assert adjacent.method == "snapshot" and adjacent.sources == (2,)
    assert "snapshot" in adjacent.note
    plain = checkfree.plan_recovery(1, 6, {2, 3, 4, 5, 6}, checkfree_plus=False)
    assert plain.method == "snapshot" and "edge" in plain.note
    assert checkfree.plan_recovery(2, 6, {1, 3}, checkfree_plus=False).method == "weighted_average"
    with pytest.raises(ConfigError):
        checkfree.plan_recovery(7, 6, alive)


def test_plan_recovery_at_three_block_stages_follows_the_alternating_swaps() -> None:
    # stages 1 and 3 each swap with 2 (on alternate odd microbatches): each copies 2; stage 2,
    # trained in by both, averages them, or copies the one left
    assert checkfree.plan_recovery(3, 3, {1, 2}).sources == (2,)
    assert checkfree.plan_recovery(1, 3, {2, 3}).sources == (2,)
    mid = checkfree.plan_recovery(2, 3, {1, 3})
    assert (mid.method, mid.sources) == ("weighted_average", (1, 3))
    one = checkfree.plan_recovery(2, 3, {3})
    assert (one.method, one.sources) == ("copy_neighbor", (3,))
    assert checkfree.plan_recovery(3, 3, {1}).method == "snapshot"
    assert checkfree.plan_recovery(2, 2, {1}).sources == (1,)


def test_plan_recovery_of_stage_zero_takes_an_edge_stages_copy() -> None:
    plan = checkfree.plan_recovery(0, 6, {1, 2, 3, 4, 5, 6})
    assert (plan.method, plan.sources, plan.lr_boost) == ("edge_copy", (1, 6), True)
    assert checkfree.plan_recovery(0, 6, {2, 3, 6}).sources == (6,)
    assert checkfree.plan_recovery(0, 1, {1}).sources == (1,)
    gone = checkfree.plan_recovery(0, 6, {2, 3, 4, 5})
    assert gone.method == "snapshot" and "were lost too" in gone.note
    off = checkfree.plan_recovery(0, 6, {1, 6}, checkfree_plus=False)
    assert off.method == "snapshot" and "CheckFree+ is off" in off.note


def test_post_clip_norm_is_what_clip_grad_norm_leaves() -> None:
    for norm in (0.2, 1.0, 3.5, 40.0):
        g = torch.full((4,), norm / 2)  # its norm is `norm`
        pre = float(torch.nn.utils.clip_grad_norm_([_with_grad(g)], 1.0))
        assert pre == pytest.approx(norm)
    for norm, clip in ((0.2, 1.0), (3.5, 1.0), (40.0, 0.5), (2.0, None), (2.0, 0.0)):
        p = _with_grad(torch.full((4,), norm / 2))
        torch.nn.utils.clip_grad_norm_([p], clip if clip else float("inf"))
        after = float(p.grad.norm())
        assert checkfree.post_clip_norm(norm, clip) == pytest.approx(after, rel=1e-5)
    assert math.isnan(checkfree.post_clip_norm(float("nan"), 1.0))


def _with_grad(g: torch.Tensor) -> torch.Tensor:
    p = torch.zeros_like(g, requires_grad=True)
    p.grad = g.clone()
    return p


def test_stage_zero_from_an_edge_copy_checks_what_it_takes() -> None:
    like = {"embedding.weight": torch.zeros(5, 3), "norm.weight": torch.ones(3)}
    copy = {"edge_embedding": torch.randn(5, 3), "edge_norm": torch.rand(3),
            "layers.7.attn.wq.weight": torch.randn(3, 3)}
    rec = checkfree.stage_zero_from_edge_copy(copy, like=like)
    assert set(rec.state) == set(like) and rec.method == "copy"
    assert torch.equal(rec.state["embedding.weight"], copy["edge_embedding"])
    assert torch.equal(rec.state["norm.weight"], copy["edge_norm"])
    rec.state["norm.weight"].add_(1.0)
    assert not torch.equal(rec.state["norm.weight"], copy["edge_norm"])  # a copy, not a view
    with pytest.raises(StateMismatch, match="no copy of stage 0"):
        checkfree.stage_zero_from_edge_copy({"layers.0.w": torch.zeros(1)}, like=like)
    with pytest.raises(ShapeMismatch):
        checkfree.stage_zero_from_edge_copy({**copy, "edge_norm": torch.ones(4)}, like=like)
    with pytest.raises(NonFiniteValues):
        checkfree.stage_zero_from_edge_copy(
            {**copy, "edge_embedding": torch.full((5, 3), float("nan"))}, like=like)
