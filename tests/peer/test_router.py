"""peer/pipeline/router.py: SWARM replica choice, throughput EMA, adaptive timeouts, bans, view
changes."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.pipeline.router import (
    NoReplicaAvailable,
    RoundRobinRouter,
    Router,
    TimeoutPolicy,
)


def _router(seed: int = 0, **kw) -> Router:
    return Router(random.Random(seed), **kw)


def test_new_replica_is_free_now_and_tried_first() -> None:
    r = _router()
    r.update_replicas(1, {"a": 10.0})
    assert r.choose(1, 10, now=0.0) == "a"  # a is now busy until t=1
    r.update_replicas(1, {"a": 10.0, "b": 1.0})  # b is slow but free now
    assert r.choose(1, 10, now=0.5) == "b"
    assert r.estimate("b").expected_finish == pytest.approx(0.5 + 10.0)
    assert r.estimate("a").expected_finish == pytest.approx(1.0)


def test_smallest_expected_finish_then_adds_work_over_throughput() -> None:
    r = _router()
    r.update_replicas(2, {"fast": 30.0, "slow": 10.0})
    picks = [r.choose(2, 30, now=0.0) for _ in range(40)]
    # weighted round-robin: work in proportion to throughput (3:1), within one call
    assert abs(picks.count("fast") - 30) <= 1
    assert r.estimate("fast").outstanding == pytest.approx(30 * picks.count("fast"))


def test_a_direct_replica_is_preferred_and_a_relayed_one_takes_the_overflow() -> None:
    r = _router(relay_factor=2.0)
    r.update_replicas(1, {"direct": 10.0, "relayed": 10.0}, relayed={"relayed"})
    assert r.is_relayed("relayed") and not r.is_relayed("direct")
    # both free: the relayed call is charged one more call's duration (1 s), so direct wins
    assert r.choose(1, 10, now=0.0) == "direct"
    # direct now busy until t=1: a tie with the relayed one's charged finish (0 + 1), then
    # direct busy until t=2 loses to the relayed one
    picks = [r.choose(1, 10, now=0.0) for _ in range(20)]
    assert 5 <= picks.count("relayed") <= 15  # it still takes a share of a backlog
    # whatever the tie-breaking seed, a free direct replica goes first; with no preference
    # (relay_factor 1) the two free replicas tie and either may
    firsts: dict[float, set[str]] = {2.0: set(), 1.0: set()}
    for factor, seen in firsts.items():
        for seed in range(20):
            fresh = _router(seed, relay_factor=factor)
            fresh.update_replicas(1, {"direct": 10.0, "relayed": 10.0}, relayed={"relayed"})
            seen.add(fresh.choose(1, 10, now=0.0))
    assert firsts == {2.0: {"direct"}, 1.0: {"direct", "relayed"}}
    # a view that no longer marks it relayed lifts the charge
    r.update_replicas(1, {"direct": 10.0, "relayed": 10.0})
    assert not r.is_relayed("relayed")
    with pytest.raises(ValueError, match="relay_factor"):
        _router(relay_factor=0.5)


def test_ties_break_with_the_injected_rng() -> None:
    def first(seed: int) -> str:
        r = _router(seed)
        r.update_replicas(1, {p: 5.0 for p in "abcdefgh"})
        return r.choose(1, 1, now=0.0)

    assert first(3) == first(3)
    assert len({first(s) for s in range(40)}) > 3


def test_record_updates_ema_and_reanchors_finish_time() -> None:
    r = _router()
    r.update_replicas(1, {"a": 5.0})
    r.choose(1, 10, now=0.0)
    r.choose(1, 10, now=0.0)
    assert r.estimate("a").expected_finish == pytest.approx(4.0)
    r.record("a", 10, 1.0, now=1.0)  # measured 10 samples/s
    e = r.estimate("a")
    assert e.throughput == pytest.approx(0.9 * 5.0 + 0.1 * 10.0)
    assert e.outstanding == pytest.approx(10)
    assert e.expected_finish == pytest.approx(1.0 + 10 / e.throughput)
    r.record("a", 10, 1.5, now=1.5)  # overlapping call: busy for us only since t=1.0
    assert r.estimate("a").throughput == pytest.approx(0.9 * 5.5 + 0.1 * 20.0)
    assert r.estimate("a").outstanding == 0.0
    assert r.choose(1, 1, now=1.5) == "a"  # free again


def test_simultaneous_completions_do_not_spike_the_estimate() -> None:
    r = _router()
    r.update_replicas(1, {"a": 5.0})
    r.choose(1, 10, now=0.0)
    r.choose(1, 10, now=0.0)
    r.record("a", 10, 2.0, now=2.0)
    r.record("a", 10, 2.0, now=2.0)  # the replica batched both calls
    e = r.estimate("a")
    assert e.throughput == pytest.approx(0.9 * 5.0 + 0.1 * 5.0)
    assert e.outstanding == 0.0


def test_record_from_a_replica_that_left_is_ignored() -> None:
    r = _router()
    r.update_replicas(1, {"a": 5.0})
    r.update_replicas(1, {})
    r.record("a", 10, 1.0, now=1.0)
    with pytest.raises(NoReplicaAvailable, match="stage 1"):
        r.choose(1, 1, now=1.0)


def test_timeout_adapts_to_measured_speed_with_floors() -> None:
    policy = TimeoutPolicy(factor=4.0, forward_floor_s=2.0, backward_floor_s=5.0, ceiling_s=100)
    r = _router(timeouts=policy)
    r.update_replicas(1, {"quick": 100.0, "crawl": 0.1})
    assert r.timeout_for("quick", 10) == 2.0  # 4 * 0.1 s is under the floor
    assert r.timeout_for("quick", 10, backward=True) == 5.0
    assert r.timeout_for("crawl", 1) == pytest.approx(40.0)
    assert r.timeout_for("crawl", 100) == 100.0  # ceiling
    for i in range(60):  # the replica turns out slower than its benchmark: 5 samples/s
        r.choose(1, 10, now=2.0 * i, exclude={"crawl"})
        r.record("quick", 10, 2.0, now=2.0 * i + 2.0)
    assert 7.0 < r.timeout_for("quick", 10) < 8.0
    assert r.timeout_for("unknown", 10) == 2.0


def test_a_measured_replica_gets_the_lower_floors() -> None:
    r = _router()  # the default policy: floors 5 / 12.5 s, 1 / 2.5 s once measured
    r.update_replicas(1, {"a": 100.0})
    for i in range(3):
        assert r.timeout_for("a", 10) == 5.0 and r.timeout_for("a", 10, backward=True) == 12.5
        r.choose(1, 10, now=float(i))
        r.record("a", 10, 0.1, now=i + 0.1)
    # three calls completed: a frozen replica now costs a microbatch about 1 s (2.5 s back)
    assert r.timeout_for("a", 10) == 1.0 and r.timeout_for("a", 10, backward=True) == 2.5
    assert r.estimate("a").completions == 3
    with pytest.raises(ValueError, match="measured floors"):
        TimeoutPolicy(measured_forward_floor_s=0.0)


def test_timeout_counts_our_own_queue_at_the_replica() -> None:
    r = _router(timeouts=TimeoutPolicy(factor=2.0, forward_floor_s=0.1))
    r.update_replicas(1, {"a": 1.0})
    r.choose(1, 3, now=0.0)
    r.choose(1, 3, now=0.0)
    assert r.timeout_for("a", 3) == pytest.approx(2.0 * 6 / 1.0)


def test_on_timeout_resend_goes_to_next_best_and_slows_the_estimate() -> None:
    r = _router()
    r.update_replicas(3, {"a": 10.0, "b": 5.0})
    first = r.choose(3, 10, now=0.0)
    before = r.estimate(first).throughput
    r.on_timeout(first, 10, seconds=30.0, now=30.0)
    again = r.choose(3, 10, now=30.0, exclude={first})
    assert again != first
    assert r.estimate(first).throughput < before
    assert r.estimate(first).timeouts == 1
    assert r.banned_until(first) == float("-inf")  # a timeout never bans
    assert r.estimate(first).outstanding == 0.0


def test_a_timed_out_replica_gets_one_probe_at_a_time_until_a_call_completes() -> None:
    r = _router()
    r.update_replicas(1, {"a": 10.0})
    assert r.choose(1, 4, now=0.0) == "a"
    r.on_timeout("a", 4, seconds=5.0, now=5.0)
    assert r.estimate("a").suspect
    assert r.choose(1, 4, now=5.0) == "a"  # the probe
    with pytest.raises(NoReplicaAvailable, match="1 timed out with a probe call still out"):
        r.choose(1, 4, now=5.1)  # the others go elsewhere, or around the stage
    r.on_timeout("a", 4, seconds=1.0, now=6.0)  # the probe timed out too: one more probe
    assert r.choose(1, 4, now=6.0) == "a"
    with pytest.raises(NoReplicaAvailable):
        r.choose(1, 4, now=6.1)
    r.record("a", 4, seconds=0.5, now=6.5)  # it answered: back to its share, measured slower
    assert not r.estimate("a").suspect
    assert r.choose(1, 4, now=6.5) == "a" and r.choose(1, 4, now=6.5) == "a"


def test_a_suspect_replica_does_not_hold_back_a_healthy_one() -> None:
    r = _router()
    r.update_replicas(1, {"a": 10.0, "b": 10.0})
    r.on_timeout("a", 4, seconds=5.0, now=0.0)
    picks = [r.choose(1, 4, now=1.0) for _ in range(4)]
    assert picks.count("a") == 1 and picks.count("b") == 3, picks


def test_ban_skips_until_expiry() -> None:
    r = _router()
    r.update_replicas(1, {"a": 100.0, "b": 1.0})
    r.choose(1, 1, now=0.0)
    r.ban("a", until=60.0)
    assert all(r.choose(1, 1, now=t) == "b" for t in (1.0, 30.0, 59.9))
    r.ban("b", until=70.0)
    with pytest.raises(NoReplicaAvailable, match="2 banned"):
        r.choose(1, 1, now=59.95)
    assert r.choose(1, 1, now=65.0) == "a"
    assert r.choose(1, 1, now=70.0) in {"a", "b"}


def test_ban_outlives_a_view_refresh() -> None:
    r = _router()
    r.ban("a", until=10.0)  # banned before it is even in the view
    r.update_replicas(1, {"a": 100.0, "b": 1.0})
    assert r.choose(1, 1, now=5.0) == "b"


def test_update_replicas_keeps_known_drops_gone_moves_stage() -> None:
    r = _router()
    r.update_replicas(1, {"a": 10.0, "b": 10.0})
    r.update_replicas(2, {"c": 10.0})
    r.record("a", 5, 1.0, now=1.0)
    kept = r.estimate("a").throughput
    r.update_replicas(1, {"a": 99.0, "d": 7.0})
    assert r.replicas(1) == ["a", "d"]
    assert r.estimate("a").throughput == kept  # measurements beat a new seed
    with pytest.raises(KeyError):
        r.estimate("b")
    r.update_replicas(2, {"c": 10.0, "a": 3.0})  # a peer moved to stage 2 (rebalance)
    assert r.estimate("a").stage == 2 and r.estimate("a").throughput == 3.0
    assert r.replicas(1) == ["d"]


def test_bad_inputs_say_what_is_wrong() -> None:
    r = _router()
    with pytest.raises(ValueError, match="seed throughput of a"):
        r.update_replicas(1, {"a": 0.0})
    r.update_replicas(1, {"a": 1.0})
    with pytest.raises(ValueError, match="work_samples"):
        r.choose(1, 0, now=0.0)
    with pytest.raises(ValueError, match="negative"):
        r.record("a", 1, -1.0, now=0.0)
    with pytest.raises(ValueError, match="seconds"):
        r.on_timeout("a", 1, 0.0, now=0.0)
    with pytest.raises(ValueError, match="factor"):
        TimeoutPolicy(factor=0.5)


def test_round_robin_cycles_blind_to_speed() -> None:
    r = RoundRobinRouter(random.Random(0))
    r.update_replicas(1, {"a": 100.0, "b": 1.0, "c": 1.0})
    assert [r.choose(1, 1, now=0.0) for _ in range(6)] == ["a", "b", "c"] * 2
    r.ban("b", until=10.0)
    picks = [r.choose(1, 1, now=0.0) for _ in range(4)]
    assert "b" not in picks and picks[0] != picks[1] and picks[:2] == picks[2:]


@given(st.lists(st.floats(0.1, 100.0), min_size=1, max_size=8), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_choose_never_returns_banned_or_excluded(speeds: list[float], seed: int) -> None:
    rng = random.Random(seed)
    r = _router(seed)
    peers = {f"p{i}": s for i, s in enumerate(speeds)}
    r.update_replicas(1, peers)
    now = 0.0
    for _ in range(50):
        now += rng.random()
        if rng.random() < 0.1:
            r.ban(rng.choice(list(peers)), until=now + rng.random() * 3)
        exclude = set(rng.sample(list(peers), rng.randint(0, len(peers))))
        usable = {p for p in peers if p not in exclude and r.banned_until(p) <= now}
        if not usable:
            with pytest.raises(NoReplicaAvailable):
                r.choose(1, 1, now=now, exclude=exclude)
            continue
        pick = r.choose(1, 1, now=now, exclude=exclude)
        assert pick in usable
        r.record(pick, 1, rng.random() + 0.01, now=now)


def _simulate(router: Router, speeds: dict[str, float], n_microbatches: int,
              in_flight: int) -> float:
    """Event simulation of one sender keeping `in_flight` microbatches in flight over one stage
    of FIFO replicas with the given true speeds; returns the makespan."""
    router.update_replicas(1, {p: 1.0 for p in speeds})  # every self-benchmark says 1/s
    free = dict.fromkeys(speeds, 0.0)
    events: list[tuple[float, str, float]] = []
    now, sent = 0.0, 0
    while sent < n_microbatches or events:
        while sent < n_microbatches and len(events) < in_flight:
            peer = router.choose(1, 1.0, now=now)
            done = max(free[peer], now) + 1.0 / speeds[peer]
            free[peer] = done
            heapq.heappush(events, (done, peer, now))
            sent += 1
        now, peer, started = heapq.heappop(events)
        router.record(peer, 1.0, now - started, now=now)
    return now


def test_router_beats_round_robin_on_heterogeneous_replicas() -> None:
    speeds = {"h100": 20.0, "a10": 8.0, "t4": 3.0, "cpu": 0.5}
    swarm = _simulate(Router(random.Random(1)), speeds, 400, in_flight=8)
    robin = _simulate(RoundRobinRouter(random.Random(1)), speeds, 400, in_flight=8)
    ideal = 400 / sum(speeds.values())
    assert swarm < 0.5 * robin
    assert swarm < 1.5 * ideal
