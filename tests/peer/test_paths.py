"""peer/pipeline/paths.py: every SkipPipe rule holds in every plan of random swarms, and collision
avoidance shortens the planned iteration on a heterogeneous swarm."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.pipeline.paths import (
    Link,
    Path,
    PlanError,
    ReplicaTiming,
    count_swaps,
    is_full_depth,
    makespan,
    path_length,
)
from peer.pipeline.planner import plan_iteration

EPS = 1e-9


@dataclass
class Case:
    stages: dict[int, list[ReplicaTiming]]
    iteration: int
    n_microbatches: int
    skip_ratio: float
    full_depth_every: int | None
    max_swaps: int
    max_held: int
    checkfree_plus: bool
    activation_bytes: float
    seed: int


@st.composite
def swarms(draw: st.DrawFn) -> Case:
    n_stages = draw(st.integers(1, 12))
    stages: dict[int, list[ReplicaTiming]] = {}
    for s in range(1, n_stages + 1):
        n = 0 if draw(st.floats(0, 1)) < 0.15 else draw(st.integers(1, 4))
        stages[s] = [
            ReplicaTiming(
                f"s{s}r{i}",
                forward_s=draw(st.floats(0.05, 5.0)),
                latency_s=draw(st.floats(0.0, 0.3)),
                bandwidth_Bps=draw(st.sampled_from([1e6, 1e7, 1e8, 1e9])),
                ready_at=draw(st.sampled_from([0.0, 0.0, 1.5])),
            )
            for i in range(n)
        ]
    return Case(
        stages=stages,
        iteration=draw(st.integers(0, 40)),
        n_microbatches=draw(st.integers(0, 24)),
        skip_ratio=draw(st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9])),
        full_depth_every=draw(st.sampled_from([None, 1, 3, 10])),
        max_swaps=draw(st.integers(0, 2)),
        max_held=draw(st.integers(1, 4)),
        checkfree_plus=draw(st.booleans()),
        activation_bytes=draw(st.sampled_from([0.0, 1e6, 8e6])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _plan(case: Case, **kw) -> list[Path]:
    return plan_iteration(
        case.iteration, case.n_microbatches, case.stages, case.skip_ratio,
        random.Random(case.seed), case.full_depth_every, case.max_swaps, case.max_held,
        case.checkfree_plus, activation_bytes=case.activation_bytes, **kw)


def peak_held(paths: list[Path]) -> dict[str, int]:
    """Independent sweep: most activations held at once per peer (forward arrival until the
    end of that microbatch's backward there)."""
    events: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for p in paths:
        for h in p.hops:
            events[h.peer_id] += [(h.forward_arrival, 1), (h.backward_end, -1)]
    peaks = {}
    for peer, evs in events.items():
        live = peak = 0
        for _, d in sorted(evs):
            live += d
            peak = max(peak, live)
        peaks[peer] = peak
    return peaks


def assert_rules(case: Case, paths: list[Path]) -> None:
    live = [s for s in sorted(case.stages) if case.stages[s]]
    owner = {r.peer_id: (s, r) for s, rs in case.stages.items() for r in rs}
    full = is_full_depth(case.iteration, case.full_depth_every) or case.skip_ratio == 0
    length = path_length(len(case.stages), len(live), 0.0 if full else case.skip_ratio)
    assert [p.microbatch for p in paths] == list(range(case.n_microbatches))
    busy: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in paths:
        stages = p.stages
        # rule 1: stage 0 at both ends (implied), live stages only, each once, fixed length
        assert len(stages) == length == len(set(stages))
        assert set(stages) <= set(live)
        assert p.bypassed == tuple(s for s in sorted(case.stages) if not case.stages[s])
        assert p.full_depth == full
        # rule 3: adjacent swaps only, at most max_swaps; none unless SkipPipe or CheckFree+
        swaps = count_swaps(stages)
        assert swaps is not None and swaps == p.swaps <= case.max_swaps
        if case.checkfree_plus:
            expected = _checkfree_order(sorted(stages), len(case.stages), case.max_swaps,
                                        p.microbatch)
            assert stages == expected
        elif full:
            assert swaps == 0
            assert stages == tuple(live)  # rule 5: full depth visits every live stage
        # the timeline is causal and uses the measured times
        t = p.release
        for h in p.hops:
            stage, r = owner[h.peer_id]
            assert stage == h.stage
            assert h.forward_arrival >= t - EPS
            assert h.forward_start >= max(h.forward_arrival, r.ready_at) - EPS
            assert h.forward_end == pytest.approx(h.forward_start + r.forward_s)
            busy[h.peer_id].append((h.forward_start, h.forward_end))
            t = h.forward_end
        assert p.loss_start >= t - EPS
        t = p.loss_end
        for h in reversed(p.hops):
            _, r = owner[h.peer_id]
            assert h.backward_arrival >= t - EPS
            assert h.backward_start >= h.backward_arrival - EPS
            assert h.backward_end == pytest.approx(h.backward_start + 1.5 * r.forward_s)
            busy[h.peer_id].append((h.backward_start, h.backward_end))
            t = h.backward_end
        assert p.finish >= t - EPS
    # rule 4: no replica computes two things at once, none holds more than max_held
    for intervals in busy.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end - EPS
    assert all(n <= case.max_held for n in peak_held(paths).values())
    # rule 2: equal share over the live stages
    visits = Counter(s for p in paths for s in p.stages)
    if live and paths:
        shares = [visits[s] for s in live]
        assert max(shares) - min(shares) <= 1


def _checkfree_order(ordered: list[int], n_stages: int, max_swaps: int,
                     microbatch: int) -> tuple[int, ...]:
    seq = list(ordered)
    if microbatch % 2:
        pairs = [(1, 2), (n_stages - 1, n_stages)] if n_stages >= 4 else [(1, 2)]
        if n_stages == 3 and microbatch % 4 == 3:
            pairs = [(2, 3)]  # S = 3 alternates the two overlapping pairs
        for a, b in pairs[:max_swaps]:
            if a in seq and b in seq:
                i = seq.index(a)
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
    return tuple(seq)


@given(swarms())
@settings(max_examples=300, deadline=None)
def test_every_rule_holds_on_random_swarms(case: Case) -> None:
    assert_rules(case, _plan(case))


@given(swarms())
@settings(max_examples=60, deadline=None)
def test_network_blind_baseline_obeys_the_same_rules(case: Case) -> None:
    assert_rules(case, _plan(case, collision_avoidance=False))


@given(swarms())
@settings(max_examples=30, deadline=None)
def test_same_seed_same_plan(case: Case) -> None:
    assert _plan(case) == _plan(case)


def test_path_length_rounds_half_up_and_never_drops_below_one() -> None:
    assert path_length(8, 8, 0.25) == 6
    assert path_length(5, 5, 1 / 3) == 3  # 4 of 6 counting stage 0, the paper's 33 %
    assert path_length(7, 7, 0.25) == 5  # 1.75 rounds to 2 skipped
    assert path_length(4, 4, 0.125) == 3  # 0.5 rounds up
    assert path_length(3, 3, 0.9) == 1
    assert path_length(8, 2, 0.25) == 2  # bypassing forces more skips
    assert path_length(0, 0, 0.5) == 0


def _uniform(n_stages: int, replicas: int, forward_s: float = 1.0) -> dict:
    return {s: [ReplicaTiming(f"s{s}r{i}", forward_s) for i in range(replicas)]
            for s in range(1, n_stages + 1)}


def test_skip_ratio_zero_is_plain_swarm() -> None:
    paths = plan_iteration(7, 10, _uniform(6, 2), 0.0, random.Random(0))
    assert all(p.stages == (1, 2, 3, 4, 5, 6) and p.swaps == 0 for p in paths)


def test_full_depth_every_n_iterations() -> None:
    stages = _uniform(8, 2)
    for it in range(25):
        paths = plan_iteration(it, 6, stages, 0.25, random.Random(it), full_depth_every=10)
        depth = {len(p.stages) for p in paths}
        assert depth == ({8} if it % 10 == 0 else {6})
        assert all(p.full_depth == (it % 10 == 0) for p in paths)


def test_equal_share_example_from_the_paper() -> None:
    # 5 block stages, 33 % skip: each path visits 3, each stage sees 60 % of 15 microbatches
    paths = plan_iteration(1, 15, _uniform(5, 3), 1 / 3, random.Random(2))
    assert Counter(s for p in paths for s in p.stages) == {s: 9 for s in range(1, 6)}


def test_swaps_appear_only_when_skipping_and_stay_adjacent() -> None:
    rng = random.Random(5)
    stages = {s: [ReplicaTiming(f"s{s}r{i}", rng.uniform(0.2, 4.0), rng.uniform(0, 0.5))
                  for i in range(2)] for s in range(1, 9)}
    swapped = [p for it in range(1, 10)
               for p in plan_iteration(it, 12, stages, 0.25, random.Random(it))
               if p.swaps]
    assert swapped  # the planner does use swaps on a heterogeneous swarm
    for p in swapped:
        assert count_swaps(p.stages) == p.swaps <= 2
    assert count_swaps((2, 1, 3, 5, 4)) == 2
    assert count_swaps((3, 1, 2)) is None
    assert count_swaps((1, 4, 3)) == 1
    assert count_swaps((4, 2)) is None  # 2 and 4 are not adjacent stages


def test_checkfree_plus_swaps_exactly_the_odd_microbatches() -> None:
    paths = plan_iteration(3, 8, _uniform(6, 2), 0.0, random.Random(0), checkfree_plus=True)
    for p in paths:
        if p.microbatch % 2:
            assert p.stages == (2, 1, 3, 4, 6, 5) and p.swaps == 2
        else:
            assert p.stages == (1, 2, 3, 4, 5, 6) and p.swaps == 0


def test_empty_stages_are_bypassed_and_training_never_stops() -> None:
    stages = _uniform(6, 2)
    stages[2] = []
    stages[5] = []
    paths = plan_iteration(1, 8, stages, 0.0, random.Random(0))
    assert all(p.stages == (1, 3, 4, 6) and p.bypassed == (2, 5) for p in paths)
    # 50 % skip asks for 3 of 6; only 2 are live: every path visits both
    stages = {s: [] for s in range(1, 7)}
    stages[3] = [ReplicaTiming("a", 1.0)]
    stages[4] = [ReplicaTiming("b", 1.0)]
    assert {plan_iteration(1, 4, stages, 0.5, random.Random(0))[0].stages} == {(3, 4)}
    nothing = plan_iteration(1, 3, {1: [], 2: []}, 0.5, random.Random(0))
    assert [p.stages for p in nothing] == [(), (), ()]


def test_planned_timeline_matches_a_hand_calculation() -> None:
    stages = {1: [ReplicaTiming("a", 1.0, latency_s=0.1)], 2: [ReplicaTiming("b", 2.0)]}
    origin = ReplicaTiming("me", 0.4)
    [p] = plan_iteration(1, 1, stages, 0.0, random.Random(0), origin=origin,
                         activation_bytes=1e6, links={("a", "b"): Link(0.5, 1e6)})
    a, b = p.hops
    assert (a.forward_arrival, a.forward_end) == pytest.approx((0.1, 1.1))
    assert (b.forward_arrival, b.forward_end) == pytest.approx((2.6, 4.6))  # 0.5 + 1 s
    assert (p.loss_start, p.loss_end) == pytest.approx((4.6, 5.6))  # 2.5 x 0.4
    assert (b.backward_start, b.backward_end) == pytest.approx((5.6, 8.6))
    assert (a.backward_arrival, a.backward_end) == pytest.approx((8.7, 10.2))
    assert p.finish == pytest.approx(10.3)


def test_memory_bound_delays_a_single_replica_pipeline() -> None:
    paths = plan_iteration(1, 7, _uniform(3, 1), 0.0, random.Random(0), max_held=3)
    assert max(peak_held(paths).values()) == 3
    assert paths[3].release > 0  # the 4th waits for the 1st to leave stage 1


def test_bad_inputs_are_rejected_by_name() -> None:
    with pytest.raises(PlanError, match=r"keyed 1\.\.S"):
        plan_iteration(0, 1, {0: [ReplicaTiming("x", 1.0)]}, 0.0, random.Random(0))
    with pytest.raises(PlanError, match="skip_ratio"):
        plan_iteration(0, 1, _uniform(2, 1), 1.0, random.Random(0))
    with pytest.raises(PlanError, match="twice"):
        plan_iteration(0, 1, {1: [ReplicaTiming("x", 1.0)], 2: [ReplicaTiming("x", 1.0)]},
                       0.0, random.Random(0))


def _heterogeneous(seed: int, n_stages: int = 6) -> dict[int, list[ReplicaTiming]]:
    """Three tiers of machines per stage (fast GPU, small GPU, CPU) on links from LAN to WAN."""
    rng = random.Random(seed)
    return {s: [ReplicaTiming(f"s{s}r{i}", forward_s=f * rng.uniform(0.8, 1.25),
                              latency_s=rng.choice([0.005, 0.04, 0.15]),
                              bandwidth_Bps=rng.choice([1.25e7, 1.25e8]))
                for i, f in enumerate(rng.sample([0.3, 1.0, 4.0], 3))]
            for s in range(1, n_stages + 1)}


def test_collision_avoidance_beats_network_blind_planning() -> None:
    ratios = []
    for seed in range(8):
        stages = _heterogeneous(seed)
        aware = makespan(plan_iteration(seed, 12, stages, 1 / 3, random.Random(seed),
                                        activation_bytes=4e6))
        blind = makespan(plan_iteration(seed, 12, stages, 1 / 3, random.Random(seed),
                                        activation_bytes=4e6, collision_avoidance=False))
        assert aware < blind
        ratios.append(aware / blind)
    assert sum(ratios) / len(ratios) < 0.6


def test_skipping_shortens_the_planned_iteration() -> None:
    # the paper's shape: 5 block stages of 3 replicas, 33 % skip vs the full pipeline
    stages = _heterogeneous(11, n_stages=5)
    full = makespan(plan_iteration(0, 15, stages, 1 / 3, random.Random(0), activation_bytes=4e6))
    skip = makespan(plan_iteration(1, 15, stages, 1 / 3, random.Random(0), activation_bytes=4e6))
    assert skip < 0.85 * full
