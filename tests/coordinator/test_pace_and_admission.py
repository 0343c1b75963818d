"""The pace a coordinator tells its peers, and Join back-pressure, against an in-process
coordinator on 127.0.0.1 (coordinator.main.serve) with real CoordinatorClients."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.main import serve
from coordinator.pacing import JoinGate, ViewBudget
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    CoordinatorUnavailable,
    PeerStats,
    retry_after_s,
)
from protocols.identity import Identity
from protocols.runspec import RunSpec

BENCH = Benchmark(samples_per_s=5.0, device="test")
SPEC = RunSpec().replace(**{"membership.heartbeat_s": 0.5, "membership.lease_s": 3.0})


class Refusing(JoinGate):
    """A gate that turns away the first `n` Joins (then admits), retry after `wait_s`."""

    def __init__(self, n: int, wait_s: float = 0.2) -> None:
        super().__init__()
        self.n = n
        self.wait_s = wait_s
        self.asked = 0

    def admit(self, now: float, live: int, lag_s: float, who: str = "") -> float | None:
        self.asked += 1
        if self.asked <= self.n:
            self.turned_away += 1
            return self.wait_s
        return super().admit(now, live, lag_s, who)


@contextlib.asynccontextmanager
async def coordinator(tmp_path: Path):
    """An in-process coordinator on 127.0.0.1 for the block, stopped after it."""
    handle = await serve(SPEC, 0, 0, tmp_path / "state", None, None, False, "127.0.0.1")
    try:
        yield handle
    finally:
        await handle.stop()


def client_of(handle) -> CoordinatorClient:
    """A new peer's client (its own key) of `handle`'s coordinator."""
    return CoordinatorClient(handle.grpc_address, Identity.generate(), handle.token)


def test_small_swarm_is_told_the_spec_pace(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path) as handle, client_of(handle) as client:
            joined = await client.join(BENCH, "127.0.0.1:9")
            assert (joined.heartbeat_s, joined.lease_s) == (0.5, 3.0)
            await client.heartbeat(PeerStats(state="training"))
            assert (client.heartbeat_s, client.lease_s) == (0.5, 3.0)

    asyncio.run(scenario())


def test_a_slower_pace_is_told_and_the_lease_follows_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path) as handle:
            svc = handle.service
            async with client_of(handle) as client:
                await client.join(BENCH, "127.0.0.1:9")
                # as if the swarm were large: a cost of 0.5 s per beat allows 1 beat/s
                svc.pacer.min_paced_peers = 0
                svc.pacer.cost_s = 0.5
                assert svc.pacer.update(1).heartbeat_s == 1.0  # 0.5 s * 2, lease 3 s * 2
                await client.heartbeat(PeerStats(state="training"))
                assert (client.heartbeat_s, client.lease_s) == (1.0, 6.0)
                member = svc.membership.get(client.identity.peer_id)
                assert member.lease_expires - member.last_seen == pytest.approx(6.0)
                # a re-join is told the same pace, and its lease lasts as long
                joined = await client.join(BENCH, "127.0.0.1:9", stage_hint=client.stage)
                assert (joined.heartbeat_s, joined.lease_s) == (1.0, 6.0)
                member = svc.membership.get(client.identity.peer_id)
                assert member.lease_expires - member.joined_at == pytest.approx(6.0)
                # a lease told long is not expired by the spec's shorter one
                svc.membership.sweep(member.last_seen + 4.0)
                assert svc.membership.is_member(client.identity.peer_id)
                svc.membership.sweep(member.last_seen + 6.5)
                assert not svc.membership.is_member(client.identity.peer_id)

    asyncio.run(scenario())


def test_run_heartbeats_beats_at_the_told_period(tmp_path: Path) -> None:
    """The client's loop waits `heartbeat_s` as last told: counted in beats, not timed."""
    async def scenario() -> None:
        async with coordinator(tmp_path) as handle:
            svc = handle.service
            async with client_of(handle) as client:
                await client.join(BENCH, "127.0.0.1:9")
                svc.pacer.min_paced_peers = 0
                svc.pacer.cost_s = 50.0  # 0.01 beat/s allowed: told the cap, 60 s
                svc.pacer.update(1)
                stop = asyncio.Event()
                replies = []
                task = asyncio.create_task(client.run_heartbeats(
                    lambda: PeerStats(state="training"), replies.append, stop))
                await asyncio.sleep(2.0)  # 4 beats at the spec's 0.5 s; one at the told pace
                stop.set()
                await task
                assert client.heartbeat_s == 60.0
                assert len(replies) == 1

    asyncio.run(scenario())


def test_join_turned_away_carries_retry_after_and_the_client_honours_it(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path) as handle:
            svc = handle.service
            svc.join_gate = gate = Refusing(3)
            async with client_of(handle) as client:
                joined = await client.join(BENCH, "127.0.0.1:9", retry_s=60.0)
                assert joined.stage >= 0
                assert gate.asked == 4 and gate.turned_away == 3
                assert svc.membership.is_member(client.identity.peer_id)
                assert gate.in_flight == 0  # the admitted Join was counted out
            # what the wire says: RESOURCE_EXHAUSTED with retry-after-ms trailing metadata
            svc.join_gate = Refusing(1, wait_s=1.5)
            async with client_of(handle) as raw:
                stub = await raw._stub_async()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Join(pb.JoinRequest(public_key=raw.identity.public_key),
                                    timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ("retry-after-ms", "1500") in tuple(info.value.trailing_metadata())
                assert retry_after_s(info.value) == 1.5

    asyncio.run(scenario())


def test_join_keeps_trying_until_its_deadline_then_says_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path) as handle:
            svc = handle.service
            svc.join_gate = gate = Refusing(10_000, wait_s=0.2)
            async with client_of(handle) as client:
                with pytest.raises(CoordinatorUnavailable, match="too busy to admit Join"):
                    await client.join(BENCH, "127.0.0.1:9", retry_s=1.5)
                assert gate.turned_away >= 3  # it kept asking, it did not give up at once
                assert not svc.membership.is_member(client.identity.peer_id)
            # and the coordinator still serves: the gate lets the next one in
            svc.join_gate = JoinGate()
            async with client_of(handle) as client:
                await client.join(BENCH, "127.0.0.1:9")

    asyncio.run(scenario())


def test_retry_after_parsing() -> None:
    class Err(grpc.aio.AioRpcError):
        def __init__(self, code: grpc.StatusCode, md: tuple) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*md), "x")

    assert retry_after_s(Err(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             (("retry-after-ms", "250"),))) == 0.25
    assert retry_after_s(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, ())) is None
    assert retry_after_s(Err(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             (("retry-after-ms", "soon"),))) is None
    assert retry_after_s(Err(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             (("retry-after-ms", "-5"),))) is None
    assert retry_after_s(Err(grpc.StatusCode.UNAVAILABLE,
                             (("retry-after-ms", "250"),))) is None


def test_views_are_withheld_when_the_view_budget_is_spent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path) as handle:
            svc = handle.service
            async with client_of(handle) as a, \
                    client_of(handle) as b:
                joined = await a.join(BENCH, "127.0.0.1:9")
                assert joined.view_proto.epoch > 0  # a small swarm: the view comes with Join
                svc.view_budget = ViewBudget(bytes_per_s=1.0, min_peers=0)  # as if huge
                svc.view_budget.tokens = 0.0
                joined = await b.join(BENCH, "127.0.0.1:10")
                assert len(joined.view_proto.peers) == 0 and b.known_epoch == 0
                a.known_epoch = 0  # a's epoch is stale
                res = await a.heartbeat(PeerStats(state="training"))
                assert res.view_proto is None
                assert svc.view_budget.withheld == 2
                await asyncio.sleep(0.1)  # GetSwarmView serves a view up to 50 ms old
                assert (await b.view()).epoch == svc.membership.epoch  # asked: answered
                svc.view_budget = ViewBudget()  # budget again: the stale peer gets one
                a.known_epoch = 0
                res = await a.heartbeat(PeerStats(state="training"))
                assert res.view_proto is not None and len(res.view_proto.peers) == 2

    asyncio.run(scenario())


def test_pace_and_join_gate_counters_are_in_metrics(tmp_path: Path) -> None:
    """/metrics (scraped over HTTP, parsed by prometheus_client) shows the told pace and what
    the Join gate admitted and turned away."""
    async def scrape(handle) -> dict[str, float]:
        async with aiohttp.ClientSession() as session, \
                session.get(handle.http_url + "metrics") as r:
            text = await r.text()
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples}

    async def scenario() -> None:
        async with coordinator(tmp_path) as handle:
            svc = handle.service
            svc.join_gate = Refusing(2, wait_s=0.05)
            for _ in range(2):
                async with client_of(handle) as client:
                    await client.join(BENCH, "127.0.0.1:9", retry_s=30.0)
            svc.pacer.min_paced_peers = 0
            svc.pacer.cost_s = 0.5
            svc.pacer.update(2)  # 2 peers at 1 beat/s: 2 s, lease 12 s
            got = await scrape(handle)
            assert got["shoal_joins_turned_away_total"] == 2
            assert got["shoal_joins_admitted_total"] == 2
            assert got["shoal_joins_in_flight"] == 0
            assert got["shoal_heartbeat_period_seconds"] == 2.0
            assert got["shoal_lease_seconds"] == 12.0
            assert got["shoal_heartbeat_cpu_seconds"] == 0.5
            assert got["shoal_join_rate"] == svc.join_gate.rate
            assert "shoal_views_withheld_total" in got

    asyncio.run(scenario())
