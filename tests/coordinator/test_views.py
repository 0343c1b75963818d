"""The coordinator's view cache (coordinator/views.py) and the stages' running throughput
totals a Join assigns from (coordinator/stages.py): both must say exactly what the full
recomputation says, however members join, beat, move and leave."""

from __future__ import annotations

import asyncio
import random

import pytest

from coordinator import views
from coordinator.assignment import assign_stage
from coordinator.main import serve
from coordinator.membership import Membership
from coordinator.messages import member_to_wire
from coordinator.views import ViewCache
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    PeerStats,
    apply_view_delta,
)
from protocols.identity import Identity
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"pipeline.stages": 3})
T0 = 1_000_000.0


def full_view(m: Membership) -> pb.SwarmView:
    """The view built the plain way: one PeerInfo per live member, then one serialization."""
    view = pb.SwarmView(epoch=m.epoch, swarm_id="s", revoked=m.revoked())
    for x in m.live_members():
        info = member_to_wire(x, full_stats=False)
        info.reach, info.relay = x.reach, x.relay
        view.peers.append(info)
    for s in m.stage_summaries():
        view.stages.append(pb.StageInfo(stage=s.stage, replicas=s.replicas,
                                        throughput=s.throughput, grad_norm=s.grad_norm,
                                        step=s.step, rebuild=s.rebuild,
                                        attested_hash=s.attested_hash,
                                        attested_step=s.attested_step))
    return view


def churn(m: Membership, rng: random.Random, t: float, n: int = 40) -> float:
    """Joins, heartbeats with new throughputs, leaves and expiries, at random."""
    for _ in range(n):
        t += 0.1
        live = m.live_members()
        r = rng.random()
        if r < 0.35 or not live:
            i = rng.randrange(60)
            m.join(f"p{i:02d}", bytes([i]) * 32, f"127.0.0.1:{9000 + i}",
                   Benchmark(samples_per_s=rng.uniform(1, 50), device="test"), -1, 0, t)
        elif r < 0.85:
            x = rng.choice(live)
            m.heartbeat(x.peer_id, PeerStats(state=rng.choice(["training", "syncing"]),
                                             samples_per_s=rng.choice([0.0, rng.uniform(1, 80)]),
                                             step=rng.randrange(5)), t)
        elif r < 0.95:
            m.leave(rng.choice(live).peer_id, "test", t)
        else:
            m.sweep(t + m.lease_s * rng.random())
    return t


def test_cached_view_is_the_full_view_through_churn() -> None:
    rng = random.Random(7)
    m, cache, t = Membership(SPEC, "s", rejoin_cooldown_s=0.0), ViewCache(), T0
    for _ in range(15):
        t = churn(m, rng, t)
        got = pb.SwarmView.FromString(cache.snapshot(m, "s", t).raw)
        assert got == full_view(m)
        # the framed forms parse as replies carrying that view
        snap = cache.snapshot(m, "s", t)
        assert pb.HeartbeatReply.FromString(snap.heartbeat_field).view == got
        assert pb.JoinReply.FromString(snap.join_field).view == got


def test_a_build_re_encodes_only_the_members_that_changed() -> None:
    m, cache = Membership(SPEC, "s"), ViewCache()
    for i in range(30):
        m.join(f"p{i:02d}", bytes([i]) * 32, f"127.0.0.1:{9000 + i}",
               Benchmark(samples_per_s=10.0, device="test"), -1, 0, T0)
    cache.build(m, "s")
    assert cache.encoded == 30
    cache.build(m, "s")
    assert cache.encoded == 30  # nothing changed: nothing encoded
    for x in m.live_members()[:3]:
        m.heartbeat(x.peer_id, PeerStats(state="training", samples_per_s=5.0), T0 + 1)
    m.leave("p29", "test", T0 + 1)
    view = pb.SwarmView.FromString(cache.build(m, "s"))
    assert cache.encoded == 33 and len(view.peers) == 29


def test_running_totals_match_the_summed_loads() -> None:
    rng = random.Random(3)
    m, t = Membership(SPEC, "s", rejoin_cooldown_s=0.0), T0
    for _ in range(20):
        t = churn(m, rng, t)
        if rng.random() < 0.3:
            m.rebalance(t, min_gain=0.0)
        full, quick = m.planner.loads(), m.planner.join_loads()
        for i, load in full.items():
            assert quick[i].replicas == set(load.replicas)
            assert abs(quick[i].capacity - load.capacity) < 1e-5
        assert assign_stage(quick, 10.0) == assign_stage(full, 10.0)


def by_id(view: pb.SwarmView) -> dict[str, tuple]:
    """Each member as a delta must carry it: everything but its stats and lease, which move
    with every heartbeat without moving the epoch (they are as of the member's last change)."""
    return {p.peer_id: (p.public_key, p.address, p.stage, p.state, p.reach, p.relay,
                        p.joined_at, p.benchmark.SerializeToString()) for p in view.peers}


def test_a_delta_applied_to_any_earlier_view_gives_the_whole_view() -> None:
    rng = random.Random(11)
    m, cache, t = Membership(SPEC, "s", rejoin_cooldown_s=0.0), ViewCache(), T0
    held: list[pb.SwarmView] = []  # whole views of earlier epochs, as peers would hold them
    deltas = 0
    for _ in range(25):
        t = churn(m, rng, t, n=rng.randrange(1, 12))
        snap = cache.snapshot(m, "s", t)
        whole = pb.SwarmView.FromString(snap.raw)
        for base in held:
            raw = cache.delta(m, snap, base.epoch)
            if base.epoch == snap.epoch:
                assert raw is None  # nothing to say
                continue
            if raw is None:  # more than half changed: the whole view goes instead
                continue
            deltas += 1
            delta = pb.SwarmView.FromString(raw)
            assert delta.delta_from == base.epoch and delta.epoch == snap.epoch
            assert len(delta.peers) < len(whole.peers) or not whole.peers
            merged = apply_view_delta(base, delta)
            assert merged.epoch == whole.epoch and merged.swarm_id == whole.swarm_id
            assert by_id(merged) == by_id(whole)
            assert list(merged.stages) == list(whole.stages)
            assert list(merged.revoked) == list(whole.revoked)
        held = [*held, whole][-6:]
    assert deltas > 20
    with pytest.raises(ValueError, match="does not apply"):
        apply_view_delta(held[0], pb.SwarmView(epoch=99, delta_from=held[0].epoch + 1))


def test_no_delta_from_before_the_change_log_or_a_restart() -> None:
    m, cache = Membership(SPEC, "s"), ViewCache()
    for i in range(4):
        m.join(f"p{i:02d}", bytes([i]) * 32, f"127.0.0.1:{9000 + i}",
               Benchmark(samples_per_s=10.0, device="test"), -1, 0, T0)
    base = cache.snapshot(m, "s", T0)
    m.heartbeat("p01", PeerStats(state="training"), T0 + 1)  # joining -> training: a change
    snap = cache.snapshot(m, "s", T0 + 1)
    assert cache.delta(m, snap, base.epoch) is not None
    m.changes_from = base.epoch + 1  # as if the log had dropped the change after `base`
    assert cache.delta(m, snap, base.epoch) is None
    restored = Membership(SPEC, "s", epoch=m.epoch)
    restored.restore(m.members(), T0 + 2, 10.0, "restart")
    assert restored.changes_from == restored.epoch
    assert cache.delta(restored, cache.snapshot(restored, "s", T0 + 2), base.epoch) is None


def test_a_client_heartbeating_gets_deltas_and_holds_the_whole_view(tmp_path) -> None:
    """Real coordinator, real clients: after the first whole view a heartbeating client is sent
    deltas, and the view it holds lists exactly who GetSwarmView lists."""
    spec = SPEC.replace(**{"membership.heartbeat_s": 0.5, "membership.lease_s": 5.0})
    bench = Benchmark(samples_per_s=5.0, device="test")

    async def scenario() -> None:
        handle = await serve(spec, 0, 0, tmp_path / "state", None, None, False, "127.0.0.1")
        clients = [CoordinatorClient(handle.grpc_address, Identity.generate(), handle.token)
                   for _ in range(4)]
        try:
            svc, a = handle.service, clients[0]

            async def beat() -> None:
                svc.views._view = None  # views are rebuilt at most every 0.25 s: now, for the test
                got = await a.heartbeat(PeerStats(state="training"))
                assert got.view_proto is not None and got.view_proto.delta_from == 0  # whole
                assert got.view_proto.epoch == svc.membership.epoch

            await a.join(bench, "127.0.0.1:9")
            await beat()
            for c in clients[1:]:
                await c.join(bench, "127.0.0.1:9")
                await beat()
            await clients[1].leave("test")
            await beat()
            sent = svc.views_sent
            assert sent["deltas"] >= 3
            held = {p.peer_id for p in a._view_proto.peers}
            asked = {p.peer_id for p in (await clients[2].view()).peers}
            assert held == asked == {c.identity.peer_id for c in clients} - {
                clients[1].identity.peer_id}
        finally:
            for c in clients:
                await c.close()
            await handle.stop()

    asyncio.run(scenario())


def test_deltas_are_made_once_per_snapshot_and_epoch_asked_from(monkeypatch) -> None:
    m, cache = Membership(SPEC, "s"), ViewCache()
    sinces = []
    for i in range(40):
        m.join(f"p{i:02d}", bytes([i]) * 32, f"127.0.0.1:{9000 + i}",
               Benchmark(samples_per_s=10.0, device="test"), -1, 0, T0)
        sinces.append(m.epoch)
    m.heartbeat("p00", PeerStats(state="training"), T0 + 1)
    snap = cache.snapshot(m, "s", T0 + 1)
    first = cache.delta_field(m, snap, sinces[-2])
    assert first is not None and cache.delta_field(m, snap, sinces[-2]) is first
    made = []
    monkeypatch.setattr(ViewCache, "delta", lambda self, *a: made.append(a) or b"x" * 100)
    monkeypatch.setattr(views, "MAX_DELTA_BYTES", 1000)  # room for about ten
    for since in sinces[-30:-2]:
        cache.delta_field(m, snap, since)
    assert len(made) == 28 and cache._delta_bytes <= 1000
    cache.delta_field(m, snap, sinces[-3])  # among the newest kept: not made again
    assert len(made) == 28
    cache.delta_field(m, cache.snapshot(m, "s", T0 + 2), sinces[-3])  # a new snapshot: made
    assert len(made) == 29
