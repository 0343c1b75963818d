"""coordinator/pacing.py: the heartbeat period and lease told to peers, and Join back-pressure."""

from __future__ import annotations

import math

import pytest

from coordinator.pacing import (
    CPU_BUDGET,
    FALL_BELOW,
    MAX_BEATS_PER_S,
    MIN_PACED_PEERS,
    MIN_SAMPLE_BEATS,
    RETRY_AFTER_RANGE_S,
    JoinGate,
    Pace,
    Pacer,
)


def test_small_swarms_get_exactly_the_spec_values() -> None:
    pacer = Pacer(0.5, 3.0, cost_s=0.05)  # a cost that would slow even 10 peers
    for live in (0, 1, 5, MIN_PACED_PEERS):
        assert pacer.update(live) == Pace(0.5, 3.0)


def test_period_keeps_the_total_rate_under_the_budget() -> None:
    pacer = Pacer(1.0, 5.0, cost_s=0.0006, max_beats_per_s=math.inf)  # the CPU rule alone
    budget = CPU_BUDGET / 0.0006
    for live in (100, 500, 1000, 5000, 10_000, 20_000):
        pace = pacer.target(live)
        assert pace.heartbeat_s >= 1.0  # never faster than the spec
        assert live / pace.heartbeat_s <= budget + 1e-9
        # the lease covers as many missed beats as the spec's
        assert pace.lease_s / pace.heartbeat_s == pytest.approx(5.0 / 1.0)
        # quantized to quarter periods, at most a quarter slower than needed
        assert pace.heartbeat_s - max(1.0, live / budget) < 0.25 + 1e-9
    assert pacer.target(500) == Pace(1.0, 5.0)  # 500 beats/s fit the budget of ~833
    assert pacer.target(5000).heartbeat_s == 6.0  # 5000 * 0.6 ms / 0.5


def test_the_call_rate_caps_the_budget_when_cpu_is_cheap() -> None:
    """The CPU budget would allow ~833 beats/s; the server's accepted call rate is the lower
    bound (MAX_BEATS_PER_S), so 5000 peers beat every 20 s, not every 6."""
    pacer = Pacer(1.0, 5.0, cost_s=0.0006)
    assert pacer.budget_per_s == MAX_BEATS_PER_S < CPU_BUDGET / 0.0006
    assert pacer.target(5000) == Pace(5000 / MAX_BEATS_PER_S, 5 * 5000 / MAX_BEATS_PER_S)
    assert pacer.target(200) == Pace(1.0, 5.0)  # 200 beats/s fit
    with pytest.raises(ValueError):
        Pacer(1.0, 5.0, max_beats_per_s=0.0)


def test_period_is_capped() -> None:
    pacer = Pacer(1.0, 4.0, cost_s=0.01, max_heartbeat_s=30.0)
    assert pacer.target(1_000_000) == Pace(30.0, 120.0)


def test_cost_is_learned_from_pooled_samples_and_clamped() -> None:
    pacer = Pacer(1.0, 5.0, cost_s=0.001)
    pacer.observe(10.0, MIN_SAMPLE_BEATS - 1)  # too few beats: nothing learned yet
    assert pacer.cost_s == 0.001
    pacer.observe(0.0, 1)  # pooled: 10 s over MIN_SAMPLE_BEATS beats, clamped to the range
    assert 0.001 < pacer.cost_s <= 0.02
    before = pacer.cost_s
    pacer.observe(-1.0, 1000)  # nonsense is ignored
    pacer.observe(math.nan, 1000)
    assert pacer.cost_s == before
    for _ in range(50):  # converges on a steady measurement
        pacer.observe(0.0004 * 1000, 1000)
    assert pacer.cost_s == pytest.approx(0.0004, rel=1e-3)


def test_period_rises_at_once_and_falls_with_hysteresis() -> None:
    pacer = Pacer(1.0, 5.0, cost_s=0.0005, max_beats_per_s=math.inf)  # budget 1000 beats/s
    assert pacer.update(3000).heartbeat_s == 3.0
    assert pacer.update(2600).heartbeat_s == 3.0  # 2.75 would do: not enough of a drop
    assert pacer.update(2500).heartbeat_s == 3.0  # 2.5 s > FALL_BELOW * 3 s
    assert pacer.update(2000).heartbeat_s == 2.0 <= FALL_BELOW * 3.0
    assert pacer.update(4000).heartbeat_s == 4.0
    assert pacer.update(10) == Pace(1.0, 5.0)  # small again: the spec's values at once


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Pacer(0.0, 5.0)
    with pytest.raises(ValueError):
        Pacer(1.0, 5.0, cpu_budget=0.0)


def test_gate_admits_small_swarms_whatever_the_load() -> None:
    gate = JoinGate(max_in_flight=1)
    for _ in range(10):
        assert gate.admit(0.0, MIN_PACED_PEERS, lag_s=5.0) is None
    assert gate.in_flight == 10 and gate.turned_away == 0


def test_gate_turns_away_beyond_in_flight_and_spreads_retries() -> None:
    gate = JoinGate(max_in_flight=2, rate=10.0, min_peers=0)
    assert gate.admit(100.0, 1000, 0.0) is None
    assert gate.admit(100.0, 1000, 0.0) is None
    waits = [gate.admit(100.0, 1000, 0.0) for _ in range(5)]
    assert all(w is not None for w in waits)
    # slots 1 / rate apart, the first no sooner than the floor
    assert waits == pytest.approx([max(RETRY_AFTER_RANGE_S[0], 0.1 * (i + 1)) for i in range(5)])
    assert gate.turned_away == 5
    gate.done()
    assert gate.admit(100.0, 1000, 0.0) is None  # room again
    gate.done()
    gate.done()
    assert gate.in_flight == 0


def test_gate_turns_away_while_the_loop_lags() -> None:
    gate = JoinGate(lag_limit_s=0.5, min_peers=0)
    assert gate.admit(0.0, 1000, lag_s=0.6) is not None
    assert gate.admit(0.0, 1000, lag_s=0.1) is None


def test_gate_admits_at_most_its_rate() -> None:
    gate = JoinGate(rate=100.0, min_peers=0, max_in_flight=10**6)
    admitted = 0
    for k in range(1000):  # 1000 Joins over 2 s, all answered at once
        if gate.admit(k * 0.002, 1000, 0.0) is None:
            admitted += 1
            gate.done()
    assert 150 <= admitted <= 2 * 100 + 100 * 0.5 + 1  # two seconds at the rate, plus a burst
    assert gate.turned_away == 1000 - admitted


def test_gate_rate_follows_the_measured_cost_of_a_join() -> None:
    from coordinator.pacing import JOIN_CPU_BUDGET, MIN_SAMPLE_JOINS

    gate = JoinGate(rate=100.0)
    gate.observe(1.0, MIN_SAMPLE_JOINS - 1)  # too few to say
    assert gate.rate == 100.0
    for _ in range(60):
        gate.observe(0.002 * 200, 200)  # 2 ms a Join
    assert gate.rate == pytest.approx(JOIN_CPU_BUDGET / 0.002, rel=1e-3)
    gate.observe(math.nan, 200)
    assert gate.rate == pytest.approx(JOIN_CPU_BUDGET / 0.002, rel=1e-3)
    for _ in range(60):
        gate.observe(10.0 * 200, 200)  # absurd: clamped
    assert gate.rate >= 10.0


def test_view_budget_bounds_view_bytes_in_large_swarms_only() -> None:
    from coordinator.pacing import ViewBudget

    budget = ViewBudget(bytes_per_s=1000.0, min_peers=10)
    assert all(budget.take(10**6, 0.0, 10) for _ in range(5))  # small swarm: never limited
    assert budget.take(600, 0.0, 1000)
    assert not budget.take(600, 0.1, 1000)  # 400 + 100 left: withheld
    assert budget.withheld == 1
    assert budget.take(600, 0.3, 1000)  # refilled at 1000 bytes/s
    sent = sum(budget.take(100, 0.3 + k / 100, 1000) * 100 for k in range(1000))
    assert sent <= 1000 * 10 + 1000  # ten seconds at the rate, plus the bucket
    big = ViewBudget(bytes_per_s=1000.0, min_peers=0)  # a view bigger than a second's worth
    assert not big.take(5000, 0.0, 1)  # waits until the bucket holds a whole one
    assert big.take(5000, 4.0, 1)


def test_gate_counts_as_busy_for_a_while_after_turning_a_join_away() -> None:
    from coordinator.pacing import STORM_GRACE_S

    gate = JoinGate(max_in_flight=0, min_peers=0)
    assert gate.busy_until == 0.0 and not gate.busy(0.0)
    assert gate.admit(50.0, 1000, 0.0, "p1") is not None
    assert gate.busy_until == 50.0 + STORM_GRACE_S
    assert gate.busy(50.0 + STORM_GRACE_S - 1)
    # and for as long as a joiner told to come back has not (here: until its slot is a
    # horizon old, when it counts as having given up)
    assert gate.busy(50.0 + STORM_GRACE_S + 1)
    assert not gate.busy(50.0 + 2 * 60.0 + 1)


def test_sweep_grace_keeps_leases_that_lapsed_during_the_coordinators_own_lag() -> None:
    from coordinator.membership import Membership
    from protocols.coordinator_client import Benchmark
    from protocols.identity import Identity
    from protocols.runspec import RunSpec

    m = Membership(RunSpec().replace(**{"membership.lease_s": 5.0}), "s")
    ident = Identity.generate()
    m.join(ident.peer_id, ident.public_key, "127.0.0.1:9", Benchmark(samples_per_s=1.0), -1, 0,
           100.0, lease_s=8.0)
    assert m.get(ident.peer_id).lease_expires == 108.0  # the lease it was told
    assert m.sweep(110.0, grace_s=3.0) == []
    assert m.sweep(110.0) == [ident.peer_id]


@pytest.mark.parametrize("joiners, rate", [(5000, 100.0), (10_000, 20.0)])
def test_a_join_storm_gets_everyone_in_within_the_clients_window(joiners: int,
                                                                 rate: float) -> None:
    """N joiners ask at once; each turned-away one comes back when told (plus the client's
    jitter, at most a second), and each admitted Join is answered 5 ms later. At 10,000
    joiners and 20 Joins/s the measured rate alone would take 500 s, past the client's 300 s:
    the gate admits faster instead. Nobody is told to wait past the horizon, nobody waits
    past the client's window, and everyone gets in."""
    import heapq
    import random

    from coordinator.pacing import JOIN_HORIZON_S

    rng = random.Random(1)
    gate = JoinGate(rate=rate, min_peers=0)
    asks = [(rng.uniform(0.0, 0.05), i) for i in range(joiners)]  # (time, joiner)
    heapq.heapify(asks)
    answers: list[float] = []  # times admitted Joins are answered
    joined: dict[int, float] = {}
    waits = []
    while asks:
        t, i = heapq.heappop(asks)
        while answers and answers[0] <= t:
            heapq.heappop(answers)
            gate.done()
        wait = gate.admit(t, 10_000, 0.0, f"p{i}")
        if wait is None:
            joined[i] = t
            heapq.heappush(answers, t + 0.005)
        else:
            waits.append(wait)
            heapq.heappush(asks, (t + wait + rng.uniform(0, min(0.5 * wait, 1.0)), i))
    assert len(joined) == joiners
    assert max(waits) <= JOIN_HORIZON_S
    assert max(joined.values()) < 300.0  # CoordinatorClient.join's retry_s
