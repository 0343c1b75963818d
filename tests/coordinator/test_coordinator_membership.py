"""Membership as a state machine (no sockets): leases, epochs, stages, revocations, rebuilds,
the event log, the training curve, and the SQLite store that persists them."""

from __future__ import annotations

import asyncio
import math

import pytest

from coordinator.events import Event, EventLog, History, HistoryPoint
from coordinator.membership import Banned, CoolingDown, Membership
from coordinator.store import Batch, Journal, Store
from protocols.coordinator_client import Benchmark, PeerStats
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"pipeline.stages": 3})
T0 = 1_000_000.0


def bench(sps: float = 10.0) -> Benchmark:
    return Benchmark(samples_per_s=sps, device="test")


def swarm(n: int, spec: RunSpec = SPEC) -> Membership:
    m = Membership(spec, "swarm-test")
    for i in range(n):
        m.join(f"p{i:02d}", bytes([i]) * 32, f"127.0.0.1:{9000 + i}", bench(), -1, 0, T0)
    return m


def test_join_fills_empty_stages_first_and_epoch_grows() -> None:
    m = swarm(4)
    assert sorted(x.stage for x in m.live_members()) == [0, 1, 2, 3]
    assert m.epoch == 4
    assert [e.kind for e in m.events.recent()] == ["join"] * 4


def trained(m: Membership, step: int, t: float, digest: str = "ab") -> None:
    """Every live member reports `step` with one state hash: the attested step is `step`."""
    for x in m.live_members():
        m.heartbeat(x.peer_id, PeerStats(state="training", step=step, state_hash=digest), t)


def test_stage_hint_keeps_the_stage_a_peer_already_holds() -> None:
    m = swarm(4)
    trained(m, 57, T0 + 0.5)
    m.sweep(T0 + SPEC.membership.lease_s + 1)  # p00..p03 lost (silent)
    x = m.join("p02", bytes([2]) * 32, "127.0.0.1:9100", bench(), 2, 57, T0 + 30)
    assert x.stage == 2 and x.stats.step == 57  # re-attached: this coordinator knew it held 2
    with pytest.raises(ValueError, match="stage_hint"):
        m.join("bad", b"\x0a" * 32, "127.0.0.1:9101", bench(), 9, 0, T0)


def test_stage_hint_is_subject_to_assignment() -> None:
    m = swarm(4)
    trained(m, 5, T0 + 1)
    m.heartbeat("p00", PeerStats(state="training", step=5, state_hash="ab", samples_per_s=50.0),
                T0 + 1)
    # a newcomer asking for stage 0 (the driver) or for a held stage gets the normal assignment
    x = m.join("new0", b"\x20" * 32, "127.0.0.1:9100", bench(100.0), 0, 0, T0 + 2)
    y = m.join("new1", b"\x21" * 32, "127.0.0.1:9101", bench(100.0), 0, 0, T0 + 2)
    assert (x.stage, y.stage) == (1, 2)  # the weakest stages, not the one asked for
    assert "stage 0 asked for, stage 1 assigned" in m.events.recent()[-2].detail
    # an empty stage, or one waiting for a rebuild, may be asked for
    m.leave("p03", "gone", T0 + 3)
    assert m.stage_summaries()[3].rebuild
    z = m.join("new3", b"\x23" * 32, "127.0.0.1:9103", bench(), 3, 0, T0 + 4)
    assert z.stage == 3
    # an operator's lab trusts every hint
    lab = Membership(SPEC, "lab", trust_stage_hints=True)
    for i in range(3):
        assert lab.join(f"q{i}", bytes([i]) * 32, "127.0.0.1:1", bench(), 0, 0, T0).stage == 0


def test_step_hint_is_clamped_to_the_swarm_step() -> None:
    m = swarm(4)
    trained(m, 12, T0 + 1)
    m.sweep(T0 + 1.5)  # the once-a-second tick attests the stages
    x = m.join("liar", b"\x30" * 32, "127.0.0.1:9100", bench(), 0, 2**53, T0 + 2)
    assert x.stats.step == 12 and "clamped to the swarm's step 12" in m.events.recent()[-1].detail
    m.leave("liar", "bye", T0 + 3)
    assert m.step() == 12


def test_attested_state_is_the_majority_then_seniority() -> None:
    m = Membership(SPEC.replace(**{"pipeline.stages": 1}), "s", trust_stage_hints=True)
    for i in range(4):
        m.join(f"r{i}", bytes([i]) * 32, "127.0.0.1:1", bench(), 1, 0, T0 + i)
    beat = {"r0": (7, "aa"), "r1": (7, "aa"), "r2": (7, "aa"), "r3": (10**12, "ff")}
    for pid, (step, digest) in beat.items():
        m.heartbeat(pid, PeerStats(state="training", step=step, state_hash=digest), T0 + 5)
    s1 = m.stage_summaries()[1]
    assert (s1.attested_step, s1.attested_hash, s1.step) == (7, "aa", 7)
    # a tie goes to the group holding the most senior member, not to the lowest peer id
    m.join("00early", b"\x40" * 32, "127.0.0.1:1", bench(), 1, 0, T0 + 9)
    for pid in ("r1", "r2"):
        m.heartbeat(pid, PeerStats(state="syncing"), T0 + 10)
    m.heartbeat("00early", PeerStats(state="training", step=9, state_hash="bb"), T0 + 10)
    m.heartbeat("r3", PeerStats(state="training", step=9, state_hash="bb"), T0 + 10)
    # groups: (7, aa) = {r0}; (9, bb) = {00early, r3}: the majority wins
    assert m.attested(1) == (9, "bb")
    m.heartbeat("r1", PeerStats(state="training", step=7, state_hash="aa"), T0 + 11)
    assert m.attested(1) == (7, "aa")  # 2 against 2: r0 joined first
    # nobody ready with a hash: nothing attested, the stage keeps its last step
    for pid in ("r0", "r1", "r3", "00early"):
        m.heartbeat(pid, PeerStats(state="syncing", step=99), T0 + 12)
    assert m.attested(1) == (0, "") and m.stage_summaries()[1].step == 7


def test_one_liar_cannot_move_the_swarm_step() -> None:
    m = swarm(4)
    trained(m, 20, T0 + 1)
    m.join("liar", b"\x31" * 32, "127.0.0.1:9100", bench(1000.0), -1, 0, T0 + 2)
    m.heartbeat("liar", PeerStats(state="training", step=2**53, state_hash="ff"), T0 + 3)
    assert m.step() == 20
    m.leave("liar", "bye", T0 + 4)
    assert m.step() == 20


def test_a_peer_that_left_waits_before_joining_again_and_a_ban_is_for_good() -> None:
    m = swarm(2)
    m.leave("p01", "drain", T0 + 1)
    with pytest.raises(CoolingDown) as info:
        m.join("p01", bytes([1]) * 32, "127.0.0.1:9001", bench(), 1, 0, T0 + 2)
    assert 0 < info.value.retry_in_s <= m.rejoin_cooldown_s
    x = m.join("p01", bytes([1]) * 32, "127.0.0.1:9001", bench(), 1, 0,
               T0 + 1 + m.rejoin_cooldown_s)
    assert x.live and x.stage == 1  # an honest restart re-attaches after the cool-down
    assert m.ban("p01", "garbage", T0 + 20) is True
    assert not m.is_member("p01") and m.is_revoked("p01") and m.is_banned("p01")
    assert m.events.recent()[-1].kind == "ban"
    with pytest.raises(Banned, match="garbage"):
        m.join("p01", bytes([1]) * 32, "127.0.0.1:9001", bench(), 1, 0, T0 + 9999)
    assert [b.peer_id for b in m.take_bans()] == ["p01"] and m.take_bans() == []


def test_heartbeat_renews_lease_and_sweep_expires_the_silent() -> None:
    m = swarm(4)
    lease = SPEC.membership.lease_s
    m.heartbeat("p00", PeerStats(state="training", step=3, grad_norm=0.5), T0 + lease - 1)
    epoch = m.epoch
    expired = m.sweep(T0 + lease + 0.5)
    assert sorted(expired) == ["p01", "p02", "p03"]
    assert m.epoch == epoch + 3
    assert m.is_member("p00") and not m.is_member("p01")
    assert {x.peer_id: x.state for x in m.members()}["p01"] == "lost"
    with pytest.raises(KeyError):
        m.heartbeat("p01", PeerStats(state="training"), T0 + lease + 1)


def test_leave_revokes_until_the_certificate_expires() -> None:
    m = swarm(2)
    m.note_certificate("p01", T0 + 600)
    m.leave("p01", "spot interruption", T0 + 1)
    assert not m.is_member("p01") and m.revoked() == ["p01"]
    assert m.events.recent()[-1].kind == "leave"
    m.sweep(T0 + 601)  # the certificate is dead now: no need to list it any more
    assert m.revoked() == []


def test_rejoin_after_expiry_clears_revocation() -> None:
    m = swarm(2)
    m.note_certificate("p01", T0 + 600)
    m.sweep(T0 + 100)
    assert m.is_revoked("p01")
    x = m.join("p01", b"\x01" * 32, "127.0.0.1:9001", bench(), 1, 10, T0 + 101)
    assert x.live and not m.is_revoked("p01") and m.events.recent()[-1].kind == "rejoin"


def test_stage_grad_norm_and_step_follow_the_attested_report() -> None:
    m = swarm(4)
    m.heartbeat("p01", PeerStats(state="training", step=5, grad_norm=2.0, state_hash="a"), T0 + 1)
    s1 = m.stage_summaries()[1]
    assert (s1.step, s1.grad_norm, s1.state) == (5, 2.0, "ok")
    m.heartbeat("p01", PeerStats(state="training", step=6, grad_norm=9.0, state_hash="b"), T0 + 2)
    s1 = m.stage_summaries()[1]
    assert (s1.step, s1.grad_norm, s1.attested_hash) == (6, 9.0, "b")
    assert m.stage_summaries()[2].state == "degraded"  # replica, but not training yet


def test_emptied_inner_stage_is_rebuilt_checkfree() -> None:
    m = swarm(4)
    for p in ("p00", "p01", "p02", "p03"):
        m.heartbeat(p, PeerStats(state="training", step=10, grad_norm=1.0), T0 + 1)
    m.leave("p02", "gone", T0 + 2)  # stage 2: inner, both neighbours live
    s2 = m.stage_summaries()[2]
    assert (s2.state, s2.rebuild) == ("empty", "checkfree")
    m.leave("p03", "gone", T0 + 2)  # stage 3: the last block stage, no CheckFree+ here
    assert m.stage_summaries()[3].rebuild == "snapshot"
    x = m.join("new", b"\x0b" * 32, "127.0.0.1:9200", bench(), -1, 0, T0 + 3)
    assert x.stage == 2  # empty stages are filled first, lowest index first
    m.heartbeat("new", PeerStats(state="rebuilt", step=10), T0 + 4)
    assert m.stage_summaries()[2].rebuild == ""
    assert m.events.recent()[-1].kind == "rebuild"


def test_rebalance_moves_a_peer_to_the_weakest_stage() -> None:
    spec = SPEC.replace(**{"pipeline.stages": 1})
    m = swarm(2, spec)
    m.trust_stage_hints = True
    for i in range(2, 6):  # crowd stage 0 via hints
        m.join(f"p{i:02d}", bytes([i]) * 32, f"127.0.0.1:{9000 + i}", bench(), 0, 0, T0)
    move = m.rebalance(T0 + 10)
    assert move is not None and move.to_stage == 1
    moved = m.get(move.peer_id)
    assert moved is not None and moved.stage == 1 and moved.pending_action == "move"
    assert m.events.recent()[-1].kind == "move"


def test_departed_members_are_bounded() -> None:
    m = Membership(SPEC, "s", max_departed=3)
    for i in range(10):
        m.join(f"q{i}", bytes([i]) * 32, "127.0.0.1:1", bench(), -1, 0, T0)
        m.leave(f"q{i}", "bye", T0)
    assert len(m.members()) == 3
    _, deleted, _ = m.take_changes()
    assert len(deleted) == 7


def test_swarm_byte_totals_survive_counter_resets() -> None:
    m = swarm(1)
    m.heartbeat("p00", PeerStats(state="training", bytes_sent=100,
                                 bytes_by_kind={"sync:demo": 40}), T0)
    m.heartbeat("p00", PeerStats(state="training", bytes_sent=150,
                                 bytes_by_kind={"sync:demo": 60}), T0 + 1)
    m.heartbeat("p00", PeerStats(state="training", bytes_sent=30,  # the peer restarted
                                 bytes_by_kind={"sync:demo": 10}), T0 + 2)
    assert m.bytes_sent_total == 180 and m.bytes_by_kind_total == {"sync:demo": 70}



def test_a_rejoin_keeps_the_peers_counters() -> None:
    """A peer whose lease lapsed joins again with its process (and counters) running on: its next
    heartbeat adds only its new bytes, and the figure never reads 0 in between."""
    m = swarm(1)
    m.heartbeat("p00", PeerStats(state="training", bytes_sent=100, dropped_microbatches=2,
                                 bytes_by_kind={"sync:demo": 40}), T0)
    x = m.join("p00", bytes([0]) * 32, "127.0.0.1:9000", bench(), 0, 0, T0 + 1)
    assert (x.stats.bytes_sent, x.stats.dropped_microbatches) == (100, 2)
    m.heartbeat("p00", PeerStats(state="training", bytes_sent=130, dropped_microbatches=2,
                                 bytes_by_kind={"sync:demo": 50}), T0 + 2)
    assert m.bytes_sent_total == 130 and m.bytes_by_kind_total == {"sync:demo": 50}
    assert m.dropped_total == 2

def test_history_thins_instead_of_forgetting() -> None:
    h = History(capacity=8, spacing_s=1.0)
    for i in range(40):
        h.offer(HistoryPoint(T0 + 2 * i, i + 1, 5.0 - i / 10, 100.0, math.nan))
    pts = h.points()
    assert len(pts) < 8 and pts[0].step == 1 and pts[-1].step > 30
    assert pts[0].to_json()["bytes_per_step"] is None


def test_sample_history_from_stage0_peers() -> None:
    m = swarm(2)
    m.heartbeat("p00", PeerStats(state="training", step=1, loss=4.0, tokens_per_s=500.0,
                                 bytes_sent=1000, state_hash="a1"), T0 + 1)
    assert m.sample_history(T0 + 1) is not None
    m.heartbeat("p00", PeerStats(state="training", step=3, loss=3.0, tokens_per_s=600.0,
                                 bytes_sent=5000, state_hash="a3"), T0 + 3)
    p = m.sample_history(T0 + 3)
    assert p is not None and p.loss == 3.0 and p.bytes_per_step == 2000.0


def test_event_log_is_bounded_and_hands_out_each_event_once() -> None:
    log = EventLog(capacity=5)
    for i in range(8):
        log.append(Event(T0 + i, "join", f"p{i}"))
    assert len(log) == 5 and len(log.take_unsaved()) == 8 and log.take_unsaved() == []


def test_store_round_trip_and_group_commit(tmp_path) -> None:
    async def scenario() -> None:
        m = swarm(3)
        m.heartbeat("p00", PeerStats(state="training", step=7, loss=2.5), T0 + 1)
        store = Store(tmp_path)

        def collect(progress: bool) -> Batch:
            changed, deleted, events = m.take_changes()
            b = Batch(members=changed, deleted=deleted, events=events, meta={"epoch": "3"},
                      bans=m.take_bans())
            if progress:
                b.members += m.take_progress()
            return b

        journal = Journal(store, collect)
        journal.start()
        await journal.write(Batch(meta={"spec_toml": SPEC.to_toml(), "swarm_id": "s"}))
        await asyncio.gather(*(journal.commit() for _ in range(20)))
        assert journal.transactions <= 3  # twenty waiters, one or two transactions
        m.leave("p02", "bye", T0 + 2)
        m.ban("p01", "flooded", T0 + 3)
        await journal.close()

    asyncio.run(scenario())
    snap = Store(tmp_path).load()
    assert snap is not None and snap.meta["swarm_id"] == "s"
    assert RunSpec.from_toml(snap.meta["spec_toml"]) == SPEC
    by_id = {x.peer_id: x for x in snap.members}
    assert by_id["p00"].stats.step == 7 and by_id["p00"].stats.loss == 2.5
    assert by_id["p02"].state == "left" and not by_id["p02"].live
    assert math.isnan(by_id["p01"].stats.loss)
    assert [e.kind for e in snap.events] == ["join"] * 3 + ["state", "leave", "ban"]
    assert [(b.peer_id, b.reason) for b in snap.bans] == [("p01", "flooded")]
    restored = Membership(SPEC, "s")
    restored.restore_bans(snap.bans)
    with pytest.raises(Banned):
        restored.check_may_join("p01", T0 + 10**6)
    # the state is nobody else's business on this machine
    assert tmp_path.stat().st_mode & 0o777 == 0o700
    for f in tmp_path.glob("coordinator.sqlite*"):
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_a_stage_whose_last_holder_dies_under_a_newcomer_is_marked_for_rebuild() -> None:
    """A peer joined a trained stage while its replica was alive (dead, lease not yet out): when
    that replica goes, nobody is left to download from, so the stage is marked for a rebuild
    even though the newcomer is listed; a replica that held the stage before keeps it off."""
    m = swarm(4)
    trained(m, 10, T0 + 1)
    x = m.join("new", b"\x0b" * 32, "127.0.0.1:9200", bench(), -1, 0, T0 + 2)
    stage = x.stage
    assert m.stage_summaries()[stage].rebuild == ""
    m.leave(f"p{stage:02d}", "gone", T0 + 3)
    assert m.stage_summaries()[stage].rebuild != ""
    m.heartbeat("new", PeerStats(state="rebuilt", step=10), T0 + 4)
    assert m.stage_summaries()[stage].rebuild == ""
    # a behind replica (syncing, with a step) still holds its stage: no rebuild mark
    y = m.join("late", b"\x0c" * 32, "127.0.0.1:9201", bench(), -1, 0, T0 + 5)
    m.heartbeat("late", PeerStats(state="syncing", step=8), T0 + 5)
    others = [p.peer_id for p in m.live_members() if p.stage == y.stage and p.peer_id != "late"]
    for peer_id in others:
        m.leave(peer_id, "gone", T0 + 6)
    assert others and m.stage_summaries()[y.stage].rebuild == ""
