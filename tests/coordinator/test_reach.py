"""Reachability against a real coordinator process (issue #13): the coordinator registers the
host it observes, dials every member back on the address it registered, and reports what it found
in heartbeat replies, views and /api/status; an address announced by heartbeat is checked again.

Members are real CoordinatorClients on 127.0.0.1; the ones that can be reached serve the peer's
own Reach service behind the peer's AuthInterceptor (tests/reach_member.py). A failed dial-back
ends after two refused connections; an impostor answers at once.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import pytest

from coordinator.membership import Membership
from coordinator.messages import BadRequest, is_loopback_peer
from coordinator.reach import (
    LOST_RELAY_S,
    RECHECK_RELAY_GONE_S,
    Reachability,
    observed_address,
    pick_relay,
)
from protocols.coordinator_client import Benchmark
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.reach_member import ReachMember, closed_port
from tests.sim_peer import CoordinatorProcess


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    with CoordinatorProcess(tmp_path_factory.mktemp("reach") / "state",
                            log_level="INFO") as c:
        yield c


def status(coord: CoordinatorProcess) -> dict:
    with urllib.request.urlopen(coord.http_url + "api/status", timeout=5) as r:
        return json.load(r)


def peer_entry(coord: CoordinatorProcess, peer_id: str) -> dict:
    return next(p for p in status(coord)["peers"] if p["peer_id"] == peer_id)


def test_observed_host_fills_only_an_empty_host() -> None:
    assert observed_address(":7100", "ipv4:10.1.2.3:50000") == "10.1.2.3:7100"
    assert observed_address(":7100", "ipv6:[2001:db8::5]:50000") == "[2001:db8::5]:7100"
    assert observed_address(":7100", "ipv6:%5B2001:db8::5%5D:50000") == "[2001:db8::5]:7100"
    assert observed_address(":7100", "ipv6:[::ffff:10.1.2.3]:50000") == "10.1.2.3:7100"
    assert observed_address("peer.example:7100", "ipv4:10.1.2.3:1") == "peer.example:7100"
    with pytest.raises(BadRequest, match="--advertise"):
        observed_address(":7100", "unix:/tmp/s")
    # grpc writes IPv6 peers percent-encoded; a Join over [::1] is a loopback Join
    assert is_loopback_peer("ipv6:%5B::1%5D:50000")
    assert not is_loopback_peer("ipv6:%5B2001:db8::5%5D:50000")


def test_relays_are_kept_then_least_loaded() -> None:
    assert pick_relay({}, "") == ""
    assert pick_relay({"c:7000": 2, "p:1": 0, "p:2": 0}, "") == "p:1"
    assert pick_relay({"c:7000": 0, "p:1": 0}, "") == "c:7000"  # ties: the coordinator's first
    assert pick_relay({"c:7000": 0, "p:1": 5}, "p:1") == "p:1"  # sticky while offered
    assert pick_relay({"c:7000": 3}, "p:1") == "c:7000"  # its relay is gone


def test_a_relayed_member_whose_relay_is_gone_is_dialled_again() -> None:
    async def scenario() -> None:
        m = Membership(RunSpec(), "swarm")
        r = Reachability(Identity.generate(), m, ca=lambda: None, tls=lambda: False,
                         clock=lambda: 0.0, on_change=lambda: None)
        r.relay_address = "198.51.100.1:7000"
        key = Identity.generate().public_key
        m.join("p1", key, "203.0.113.7:7100", Benchmark(samples_per_s=1.0), -1, 0, 100.0)
        assert m.change_address("p1", "198.51.100.1:40001", "198.51.100.1:7000", 101.0)
        assert m.get("p1").reach == ""  # unknown until dialled again
        m.get("p1").reach = "relayed"
        r._checked["p1"] = 101.0
        r.tick(102.0 + RECHECK_RELAY_GONE_S)  # its relay is offered: nothing to do
        assert not r.checker.pending("p1")
        r.relay_address = ""  # the relay went away
        r.tick(102.0 + RECHECK_RELAY_GONE_S)
        assert r.checker.pending("p1")
        await r.close()

    asyncio.run(scenario())


def test_a_relay_that_failed_a_member_is_not_offered_for_a_while() -> None:
    async def scenario() -> None:
        m = Membership(RunSpec(), "swarm")
        r = Reachability(Identity.generate(), m, ca=lambda: None, tls=lambda: False,
                         clock=lambda: 0.0, on_change=lambda: None)
        r.relay_address = "198.51.100.1:7000"
        m.join("relay", Identity.generate().public_key, "203.0.113.9:7100",
               Benchmark(samples_per_s=1.0), -1, 0, 100.0, relay=True)
        m.get("relay").reach = "direct"
        m.join("p1", Identity.generate().public_key, "203.0.113.7:7100",
               Benchmark(samples_per_s=1.0), -1, 0, 100.0)
        r.tick(101.0)
        # the coordinator's relay carries nobody yet; the tie goes to it, so load it first
        r._relays["198.51.100.1:7000"] = 5
        assert r.relay_for(m.get("p1")) == "203.0.113.9:7100"
        # the relay peer dies; p1 finds it lost and announces its own address again: the dead
        # relay is still live by its lease, but it is offered to nobody for LOST_RELAY_S
        r.relay_lost("203.0.113.9:7100", 110.0)
        assert r.relay_for(m.get("p1")) == "198.51.100.1:7000"
        r.tick(111.0)
        assert "203.0.113.9:7100" not in r._relays
        r.tick(110.0 + LOST_RELAY_S + 1)
        assert "203.0.113.9:7100" in r._relays  # offered again
        r.relay_lost("198.51.100.1:7000", 200.0)  # the coordinator's own is never dropped
        r.tick(201.0)
        assert "198.51.100.1:7000" in r._relays
        await r.close()

    asyncio.run(scenario())


def test_join_registers_the_observed_host_and_dials_it_back(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        async with ReachMember(coord.grpc_address, coord.token, serve=True) as m:
            registered = await m.join(f":{m.port}")  # no host: the coordinator fills it in
            assert registered == f"127.0.0.1:{m.port}"
            reply = await m.wait_reach("direct")
            assert reply.relay == ""  # a reachable member is told no relay
            view = await m.client.view()
            me = view.peer(m.peer_id)
            assert me is not None and me.address == registered and me.reach == "direct"
            entry = peer_entry(coord, m.peer_id)
            assert entry["reach"] == "direct" and entry["address"] == registered
            events = [e for e in status(coord)["events"]
                      if e["kind"] == "reach" and e["peer_id"] == m.peer_id]
            assert events and "signed ping" in events[-1]["detail"], events

    asyncio.run(scenario())


def test_closed_port_and_impostor_are_unreachable_and_told_so(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        closed = ReachMember(coord.grpc_address, coord.token)  # nothing listens on its port
        impostor = ReachMember(coord.grpc_address, coord.token, serve=True,
                               answer_as=Identity.generate())  # answers with the wrong key
        async with closed, impostor:
            await asyncio.gather(closed.join(), impostor.join())
            told = await closed.wait_reach("unreachable")
            await impostor.wait_reach("unreachable")
            # the coordinator names a relay when it has one to offer (its own, or --relay peers)
            assert isinstance(told.relay, str)
            assert peer_entry(coord, closed.peer_id)["reach"] == "unreachable"
            events = {e["peer_id"]: e["detail"] for e in status(coord)["events"]
                      if e["kind"] == "reach"}
            assert "no answer from" in events[closed.peer_id], events
            assert f"not with peer {impostor.peer_id}'s signature" in events[impostor.peer_id]
        # and it keeps serving
        async with ReachMember(coord.grpc_address, coord.token, serve=True) as ok:
            await ok.join()
            await ok.wait_reach("direct")

    asyncio.run(scenario())


def test_announced_address_is_checked_and_dialled_again(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        async with ReachMember(coord.grpc_address, coord.token, serve=True) as m:
            first = await m.join(f"127.0.0.1:{closed_port()}")  # registered where nobody is
            epoch = (await m.client.view()).epoch
            # a bad address is refused; the heartbeat still renews the lease, nothing moves
            m.client.announce_address("169.254.169.254:80")
            await asyncio.sleep(3 * m.client.heartbeat_s)
            assert m.client.registered_address == first
            assert peer_entry(coord, m.peer_id)["address"] == first
            # the member is now reached through a relay at its server's port
            relayed_at = f"127.0.0.1:{m.port}"
            m.client.announce_address(relayed_at, relayed_by="127.0.0.1:7999")
            await m.wait_reach("relayed")
            view = await m.client.view()
            assert view.epoch > epoch and view.peer(m.peer_id).address == relayed_at
            entry = peer_entry(coord, m.peer_id)
            assert entry["reach"] == "relayed" and entry["relayed_by"] == "127.0.0.1:7999"
            kinds = [e["kind"] for e in status(coord)["events"] if e["peer_id"] == m.peer_id]
            assert "address" in kinds, kinds

    asyncio.run(scenario())


def test_unreachable_members_are_spread_over_relays(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        relays = [ReachMember(coord.grpc_address, coord.token, serve=True, relay=True)
                  for _ in range(2)]
        stuck = [ReachMember(coord.grpc_address, coord.token) for _ in range(4)]
        async with relays[0], relays[1]:
            await asyncio.gather(*(r.join() for r in relays))
            await asyncio.gather(*(r.wait_reach("direct") for r in relays))
            assert all(peer_entry(coord, r.peer_id)["relay"] for r in relays)
            async with stuck[0], stuck[1], stuck[2], stuck[3]:
                await asyncio.gather(*(s.join() for s in stuck))
                told = [(await s.wait_reach("unreachable")).relay for s in stuck]
                offered = {f"127.0.0.1:{r.port}" for r in relays}
                # both peer relays are used; with the coordinator's own relay too, no relay
                # carries two more than another
                assert offered <= set(told), told
                counts = [told.count(a) for a in set(told)]
                assert max(counts) - min(counts) <= 1, told

    asyncio.run(scenario())


def test_a_port_that_closes_every_connection_is_unreachable_after_a_few_attempts(
        coord: CoordinatorProcess) -> None:
    """A listener that accepts and closes at once (a firewall that rejects, or the lab's delay
    relay with nothing behind it: what a NAT'd peer's address gives) ends the dial-back after
    CLOSED_ATTEMPTS attempts, not after DEADLINE_S of retries: the sooner the peer is told, the
    sooner it is relayed."""
    from coordinator.reach import CLOSED_ATTEMPTS

    async def scenario() -> None:
        async def close_at_once(reader, writer):
            writer.close()

        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with ReachMember(coord.grpc_address, coord.token) as member:
                await member.join(f"127.0.0.1:{port}")
                await member.wait_reach("unreachable")
                detail = next(e["detail"] for e in status(coord)["events"]
                              if e["kind"] == "reach" and e["peer_id"] == member.peer_id)
        finally:
            server.close()
        assert f"{CLOSED_ATTEMPTS} attempts" in detail, detail

    asyncio.run(scenario())
