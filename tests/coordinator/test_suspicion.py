"""coordinator/suspicion.py: a member reported unreachable by a neighbour is expired only once it
has missed its own heartbeats; a member whose beats arrive is never touched, whoever reports it."""

from __future__ import annotations

from coordinator.suspicion import SILENT_BEATS, expire_reported
from protocols.coordinator_client import PeerStats
from tests.coordinator.test_coordinator_membership import SPEC, T0, bench, swarm

BEAT = SPEC.membership.heartbeat_s


def test_a_silent_member_reported_unreachable_is_expired_before_its_lease() -> None:
    m = swarm(4)
    assert SPEC.membership.lease_s > 2 * SILENT_BEATS * BEAT  # the point: sooner than a lapse
    now = T0 + SILENT_BEATS * BEAT + 0.1
    m.heartbeat("p00", PeerStats(state="training"), now)
    assert expire_reported(m, "p00", ["p02"], now) == ["p02"]
    p02 = m.get("p02")
    assert p02 is not None and not p02.live and p02.state == "lost"
    event = m.events.recent()[-1]
    assert event.kind == "expire" and event.peer_id == "p02"
    assert "unreachable (reported by peer p00)" in event.detail
    assert m.counters["reported_lost"] == 1 and m.counters["expired"] == 0


def test_a_member_that_still_beats_is_left_alone() -> None:
    m = swarm(4)
    now = T0 + SILENT_BEATS * BEAT - 0.1  # not silent long enough yet
    assert expire_reported(m, "p00", ["p02"], now) == []
    later = T0 + 10 * BEAT
    m.heartbeat("p02", PeerStats(state="training"), later - 0.5)
    assert expire_reported(m, "p00", ["p02"], later) == []
    assert all(x.live for x in m.members()) and m.counters["reported_lost"] == 0


def test_reports_of_itself_unknown_ids_and_the_coordinators_lag_change_nothing() -> None:
    m = swarm(4)
    now = T0 + 5 * BEAT
    assert expire_reported(m, "p01", ["p01", "nobody", "", "zz" * 40], now) == []
    # silent for 5 beats, but 4 s of that was the coordinator's own lag
    assert expire_reported(m, "p00", ["p03"], now, grace_s=4 * BEAT) == []
    assert all(x.live for x in m.members())


def test_a_member_expired_on_reports_rejoins_with_its_stage() -> None:
    m = swarm(4)
    stage = m.get("p03").stage  # type: ignore[union-attr]
    expire_reported(m, "p00", ["p03"], T0 + 3 * BEAT)
    x = m.join("p03", bytes([3]) * 32, "127.0.0.1:9003", bench(), stage, 0, T0 + 4 * BEAT)
    assert x.live and x.stage == stage and m.events.recent()[-1].kind == "rejoin"

