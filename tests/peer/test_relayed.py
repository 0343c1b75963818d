"""A peer nobody dials, reached through the coordinator's relay and moved to a peer's relay
(peer/relayed.py), against a real coordinator served in-process on 127.0.0.1.

The "NAT'd peer" is a grpc.aio server on a loopback port that checks calls like a peer's server
does (signed by a member of this swarm); it is reached only through the relayed address. No
timing is asserted: bounded waits only catch hangs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from coordinator.main import KEY_FILE
from coordinator.main import serve as serve_coordinator
from peer.relayed import RelayLink, local_target, relay_hub
from protocols import shoal_pb2_grpc as pbg
from protocols.auth import (
    AuthInterceptor,
    CallSigner,
    client_interceptors,
    current_caller,
    issue_certificate,
)
from protocols.coordinator_client import Benchmark, CoordinatorClient, PeerStats
from protocols.identity import Identity
from protocols.relay import RelayTunnel
from protocols.runspec import RunSpec
from tests.polling import until


async def _who(request: bytes, context) -> bytes:
    return current_caller().peer_id.encode() + b" " + request


def _quick(relay, target, channel, **kw) -> RelayTunnel:
    return RelayTunnel(relay, target, channel, backoff_s=0.05, backoff_cap_s=0.2, **kw)


def test_an_unreachable_peer_is_reached_through_the_relays_it_is_told(tmp_path: Path) -> None:
    async def main() -> None:
        coord = await serve_coordinator(RunSpec(), 0, 0, tmp_path / "state", None, None, False,
                                        "127.0.0.1")
        clients: list[CoordinatorClient] = []
        servers: list[grpc.aio.Server] = []
        link = None
        peer_channels: dict[str, grpc.aio.Channel] = {}
        try:
            assert coord.service.relay_address == coord.grpc_address and coord.relay is not None

            async def member(address: str = "") -> CoordinatorClient:
                c = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
                await c.join(Benchmark(samples_per_s=1.0, device="test"),
                             address or f"127.0.0.1:{20_000 + len(clients)}")
                clients.append(c)
                return c

            nat, caller = await member(), await member()
            server = grpc.aio.server(interceptors=[AuthInterceptor(
                issuer_public_key=lambda: nat.coordinator_public_key,
                swarm_id=lambda: nat.swarm_id, is_member=lambda pid: True,
                key_only_methods=frozenset())])
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                "t.Peer", {"Who": grpc.unary_unary_rpc_method_handler(_who)})])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            assert local_target("0.0.0.0", port) == f"127.0.0.1:{port}"
            assert local_target("::1", port) == f"[::1]:{port}"

            def peer_channel(address: str) -> grpc.aio.Channel:  # kept, as the daemon's are
                if address not in peer_channels:
                    peer_channels[address] = grpc.aio.insecure_channel(
                        address, interceptors=client_interceptors(
                            CallSigner(nat.identity, lambda: nat.certificate)))
                return peer_channels[address]

            link = RelayLink(nat, local_target("127.0.0.1", port), view=lambda: _view_of(coord),
                             peer_channel=peer_channel, tunnel=_quick)
            await link.update("direct", "")
            await link.update("unreachable", "")  # nothing offered: it waits, with a warning
            assert link.tunnel is None
            await link.update("unreachable", coord.grpc_address)
            first = await until(lambda: link.address)
            assert first != coord.grpc_address and first.startswith("127.0.0.1:")

            async def call(address: str, payload: bytes) -> bytes:
                signer = CallSigner(caller.identity, lambda: caller.certificate)
                async with grpc.aio.insecure_channel(
                        address, interceptors=client_interceptors(signer)) as ch:
                    return await ch.unary_unary("/t.Peer/Who")(payload, timeout=30)

            assert await call(first, b"via the coordinator") == (
                caller.identity.peer_id.encode() + b" via the coordinator")
            assert coord.relay.bytes_by_peer[nat.identity.peer_id] > 0
            # the next heartbeat announces the relayed address; the coordinator registers it
            await nat.heartbeat(PeerStats(state="training"))
            registered = coord.service.membership.get(nat.identity.peer_id)
            assert (registered.address, registered.relayed_by) == (first, coord.grpc_address)

            # the coordinator names another relay (a peer started with --relay): the link moves
            hub = relay_hub(view=lambda: _view_of(coord), advertise_host=lambda: "127.0.0.1",
                            bind_host="127.0.0.1")
            relay_server = grpc.aio.server(interceptors=[AuthInterceptor(
                issuer_public_key=lambda: nat.coordinator_public_key,
                swarm_id=lambda: nat.swarm_id,
                is_member=lambda pid: True, key_only_methods=frozenset())])
            pbg.add_RelayServicer_to_server(hub, relay_server)
            relay_port = relay_server.add_insecure_port("127.0.0.1:0")
            await relay_server.start()
            servers.append(relay_server)
            await member(f"127.0.0.1:{relay_port}")  # the relay peer, in the swarm's view
            await link.update("unreachable", f"127.0.0.1:{relay_port}")
            second = await until(lambda: link.address if link.address != first else "")
            assert link.tunnel.relay == f"127.0.0.1:{relay_port}"
            assert list(peer_channels) == [f"127.0.0.1:{relay_port}"]  # dialled as a peer
            await until(lambda: not coord.relay.attached)  # the coordinator's port is closed
            assert await call(second, b"via a peer") == (
                caller.identity.peer_id.encode() + b" via a peer")
            assert hub.bytes_by_peer[nat.identity.peer_id] > 0
            # a key the coordinator certified but that is not in the relay peer's view (this
            # relay's server lets every certified caller through to the hub) may not attach
            stranger = Identity.generate()
            cert = issue_certificate(Identity.load_or_create(tmp_path / "state" / KEY_FILE),
                                     stranger.public_key, nat.swarm_id, 600, time.time(),
                                     serial=10_000)
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{relay_port}", interceptors=client_interceptors(
                        CallSigner(stranger, lambda: cert))) as ch:
                refused = _quick(f"127.0.0.1:{relay_port}", link.target, lambda: ch)
                refused.start()
                await until(lambda: refused.failures >= 1)
                await refused.stop()
            assert "not a live member" in refused.last_error and refused.attaches == 0
            await hub.stop()
        finally:
            if link is not None:
                await link.stop()
            for ch in peer_channels.values():
                await ch.close()
            for s in servers:
                await s.stop(None)
            for c in clients:
                await c.close()
            await coord.stop()

    asyncio.run(main())


def _view_of(coord):
    """The swarm view as a relay peer holds it (from the coordinator's membership)."""
    from protocols.coordinator_client import SwarmView

    return SwarmView.from_proto(coord.service.build_view())


def test_a_dead_relay_peer_is_not_replaced_by_the_coordinators_relay_under_its_name() -> None:
    """The kind of relay is decided when the link attaches. A --relay peer that dies drops out of
    the view; its tunnel must go on dialling it (and fail, so the loss is announced), never
    attach to the coordinator's relay while announcing the dead peer as its relay (CI once saw a
    replica relayed by the coordinator and reported as relayed by the dead peer, for good)."""
    from types import SimpleNamespace

    from peer.relayed import RelayLink

    dialled: list[str] = []
    made: dict = {}

    class FakeTunnel:
        def __init__(self, relay, target, channel, on_address):
            self.relay, self.channel, self.address = relay, channel, ""
            made["tunnel"] = self

        def start(self) -> None:
            pass

    relay_peer = SimpleNamespace(address="127.0.0.1:7001")
    view = SimpleNamespace(peers=[relay_peer])
    client = SimpleNamespace(registered_address="127.0.0.2:7000", address="127.0.0.1:9")
    link = RelayLink(client, "127.0.0.1:7000", lambda: view,
                     lambda address: dialled.append(address) or f"channel to {address}",
                     tunnel=FakeTunnel)
    asyncio.run(link.update("unreachable", relay_peer.address))
    view.peers = []  # the relay peer died and its lease lapsed
    assert made["tunnel"].channel() == "channel to 127.0.0.1:7001"
    assert dialled == ["127.0.0.1:7001"]
