"""coordinator/assignment.py: joins fill the weakest stage, rebalancing raises the bottleneck and
never empties a stage, and a churning heterogeneous swarm stays near the brute-force optimum."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.assignment import (
    Move,
    StageLoad,
    assign_stage,
    bottleneck,
    plan_rebalance,
    rebalance_due,
)

Swarm = dict[int, dict[str, float]]


def loads(swarm: Swarm) -> dict[int, StageLoad]:
    return {i: StageLoad(dict(peers)) for i, peers in swarm.items()}


def apply(swarm: Swarm, move: Move) -> None:
    swarm[move.to_stage][move.peer_id] = swarm[move.from_stage].pop(move.peer_id)


def settle(swarm: Swarm, min_gain: float = 0.0, limit: int = 200) -> int:
    """Rebalance until no move is worth it; returns the number of moves."""
    for n in range(limit):
        move = plan_rebalance(loads(swarm), min_gain=min_gain)
        if move is None:
            return n
        apply(swarm, move)
    raise AssertionError(f"rebalancing did not settle in {limit} moves")


def optimum(throughputs: list[float], n_stages: int) -> float:
    """Brute force: the best bottleneck over every assignment of peers to stages."""
    best = 0.0
    for placement in itertools.product(range(n_stages), repeat=len(throughputs)):
        sums = [0.0] * n_stages
        for stage, t in zip(placement, throughputs, strict=True):
            sums[stage] += t
        best = max(best, min(sums))
    return best


def test_empty_stage_is_filled_first_then_the_weakest_lowest_index() -> None:
    swarm = {0: {"a": 5.0}, 1: {"b": 0.0}, 2: {}, 3: {"c": 9.0}}
    assert assign_stage(loads(swarm), 1.0) == 2  # empty beats a zero-throughput stage
    swarm[2]["d"] = 5.0
    assert assign_stage(loads(swarm), 1.0) == 1
    assert assign_stage(loads({0: {}, 1: {}, 2: {}}), 3.0) == 0  # stage 0 first of all
    assert assign_stage(loads({0: {"a": 2.0}, 1: {"b": 2.0}}), 3.0) == 0  # tie -> low index


def test_visit_share_counts_skipping_stages_as_lighter() -> None:
    # under 50 % skipping a block stage carries twice its throughput in pipeline terms
    stages = {0: StageLoad({"a": 6.0}), 1: StageLoad({"b": 4.0}, visit_share=0.5)}
    assert stages[1].capacity == 8.0
    assert assign_stage(stages, 1.0) == 0


def test_equal_peers_end_balanced_after_joins() -> None:
    swarm: Swarm = {i: {} for i in range(5)}
    for n in range(23):
        swarm[assign_stage(loads(swarm), 2.0)][f"p{n}"] = 2.0
    sizes = [len(p) for p in swarm.values()]
    assert max(sizes) - min(sizes) <= 1
    assert plan_rebalance(loads(swarm)) is None


def test_heterogeneous_joins_keep_stages_close() -> None:
    rng = random.Random(4)
    swarm: Swarm = {i: {} for i in range(4)}
    speeds = [rng.uniform(1, 10) for _ in range(40)]
    for n, t in enumerate(speeds):
        swarm[assign_stage(loads(swarm), t)][f"p{n}"] = t
    caps = [sum(p.values()) for p in swarm.values()]
    assert min(caps) >= max(caps) - max(speeds)  # greedy join: within one peer of each other


def test_rebalance_moves_spare_to_the_bottleneck() -> None:
    swarm = {0: {"a": 10.0}, 1: {"b": 4.0, "c": 4.0, "d": 4.0}, 2: {"e": 2.0}}
    move = plan_rebalance(loads(swarm))
    assert move == Move("b", 1, 2, bottleneck_before=2.0, bottleneck_after=6.0)
    apply(swarm, move)
    assert bottleneck(loads(swarm)) == 6.0


def test_rebalance_refills_an_empty_stage_without_emptying_another() -> None:
    swarm = {0: {"a": 3.0, "b": 1.0, "c": 1.0}, 1: {"d": 8.0}, 2: {}}
    move = plan_rebalance(loads(swarm), min_gain=10.0)  # filling ignores min_gain
    assert move == Move("a", 0, 2, bottleneck_before=0.0, bottleneck_after=2.0)
    assert plan_rebalance(loads({0: {"a": 3.0}, 1: {"c": 8.0}, 2: {}})) is None


def test_rebalance_does_not_move_a_peer_so_big_its_old_stage_becomes_the_bottleneck() -> None:
    swarm = {0: {"big": 10.0, "small": 3.0}, 1: {"x": 6.0}, 2: {"y": 2.0}}
    move = plan_rebalance(loads(swarm))
    assert move is not None and move.peer_id == "small"  # bottleneck 5 (moving big: 3)
    assert move.bottleneck_after == 5.0


def test_no_move_when_balanced_or_when_the_gain_is_small() -> None:
    assert plan_rebalance(loads({0: {"a": 5.0}, 1: {"b": 5.0}, 2: {"c": 2.5, "d": 2.5}})) is None
    # two stages tie at the bottleneck: one move cannot raise it
    assert plan_rebalance(loads({0: {"a": 1.0}, 1: {"b": 1.0}, 2: {"c": 5.0, "d": 5.0}})) is None
    nearly = {0: {"a": 6.0, "b": 6.0, "c": 0.4}, 1: {"d": 11.6}}
    assert plan_rebalance(loads(nearly), min_gain=0.1) is None  # +3.4 % is not worth a download
    assert plan_rebalance(loads(nearly), min_gain=0.0) == Move("c", 0, 1, 11.6, 12.0)


def test_the_last_replica_of_stage_zero_never_moves() -> None:
    swarm = {0: {"solo": 100.0}, 1: {"x": 1.0}}
    assert plan_rebalance(loads(swarm), min_gain=0.0) is None


def test_bad_numbers_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="throughput of p"):
        StageLoad({"p": float("nan")})
    with pytest.raises(ValueError, match="peer_throughput"):
        assign_stage(loads({0: {}}), 0.0)
    with pytest.raises(ValueError, match="no stages"):
        assign_stage({}, 1.0)
    with pytest.raises(ValueError, match="visit_share"):
        StageLoad({}, visit_share=0.0)


def test_rebalance_due_every_period() -> None:
    assert rebalance_due(None, 0.0)
    assert not rebalance_due(100.0, 399.9)
    assert rebalance_due(100.0, 400.0)
    assert rebalance_due(0.0, 61.0, period=60.0)


swarms = st.dictionaries(
    st.integers(0, 6),
    st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.floats(0.0, 50.0),
                    max_size=5),
    min_size=1, max_size=7,
)


def _unique_peers(raw: dict[int, dict[str, float]]) -> Swarm:
    return {i: {f"{i}:{p}": t for p, t in peers.items()} for i, peers in raw.items()}


@given(swarms, st.floats(0.0, 0.5))
@settings(max_examples=300, deadline=None)
def test_any_move_raises_the_bottleneck_and_empties_nothing(raw: dict, min_gain: float) -> None:
    swarm = _unique_peers(raw)
    before = loads(swarm)
    move = plan_rebalance(before, min_gain=min_gain)
    if move is None:
        return
    empty_before = sum(not p for p in swarm.values())
    assert len(swarm[move.from_stage]) >= 2
    apply(swarm, move)
    after = loads(swarm)
    assert sum(not p for p in swarm.values()) <= empty_before
    assert all(swarm[i] for i in swarm if raw[i])  # no stage that had a replica lost its last
    assert move.bottleneck_before == pytest.approx(bottleneck(before))
    assert move.bottleneck_after == pytest.approx(bottleneck(after))
    if empty_before == 0:
        assert bottleneck(after) > bottleneck(before) * (1 + min_gain)


@given(swarms)
@settings(max_examples=100, deadline=None)
def test_repeated_rebalancing_settles(raw: dict) -> None:
    settle(_unique_peers(raw), min_gain=0.0)


def test_churning_heterogeneous_swarm_stays_near_the_optimum() -> None:
    """Random peers join and leave; after each event the coordinator rebalances. Compare the
    bottleneck with the brute-force optimum of the peers alive at that moment."""
    rng = random.Random(7)
    ratios, ratios_joins_only = [], []
    for trial in range(12):
        n_stages = rng.choice([2, 3, 4])
        swarm: Swarm = {i: {} for i in range(n_stages)}
        greedy: Swarm = {i: {} for i in range(n_stages)}
        alive: dict[str, float] = {}
        for step in range(14):
            if alive and (len(alive) >= 7 or rng.random() < 0.3):
                gone = rng.choice(sorted(alive))
                del alive[gone]
                for s in (swarm, greedy):
                    for peers in s.values():
                        peers.pop(gone, None)
            else:
                peer = f"t{trial}p{step}"
                t = rng.choice([1.0, 2.0, 4.0, 8.0]) * rng.uniform(0.8, 1.2)
                alive[peer] = t
                swarm[assign_stage(loads(swarm), t)][peer] = t
                greedy[assign_stage(loads(greedy), t)][peer] = t
            settle(swarm, min_gain=0.0)
            best = optimum(list(alive.values()), n_stages)
            if best > 0:
                got = bottleneck(loads(swarm))
                assert got >= 0.75 * best, (swarm, best)
                ratios.append(got / best)
                ratios_joins_only.append(bottleneck(loads(greedy)) / best)
    mean = sum(ratios) / len(ratios)
    assert mean >= 0.95  # measured here: 0.987; joins alone: 0.82
    assert mean > sum(ratios_joins_only) / len(ratios_joins_only)  # rebalancing pays off


def test_rebuild_method_follows_the_neighbours_that_are_left() -> None:
    from coordinator.assignment import rebuild_method

    # 4 block stages (n_stages 5 with stage 0); stage 2 emptied, both neighbours live
    assert rebuild_method(2, {0, 1, 3, 4}, 5, checkfree_plus=False) == "checkfree"
    # a neighbour gone too: no average is possible
    assert rebuild_method(2, {0, 3, 4}, 5, checkfree_plus=False) == "snapshot"
    # edge stages: only CheckFree+ can rebuild them, from their swap partner
    assert rebuild_method(1, {0, 2, 3, 4}, 5, checkfree_plus=False) == "snapshot"
    assert rebuild_method(1, {0, 2, 3, 4}, 5, checkfree_plus=True) == "checkfree+"
    assert rebuild_method(4, {0, 1, 2, 3}, 5, checkfree_plus=True) == "checkfree+"
    assert rebuild_method(4, {0, 1, 2}, 5, checkfree_plus=True) == "snapshot"
