"""The relay (protocols/relay.py, relay_tunnel.py, relay_conns.py), for real on 127.0.0.1.

A grpc.aio server on a loopback port stands in for a NAT'd peer's server (nobody dials it
directly), a RelayHub serves on another server, a RelayTunnel attaches to the hub and carries
every connection made to the address the hub allocated. Calls through it are signed end to end
(the peer's own AuthInterceptor checks them), and with mTLS the peer's server sees the client's
certificate: the relay carried the TLS session unchanged. Bounded waits only catch hangs; no
timing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols import tls
from protocols.auth import (
    AuthInterceptor,
    CallSigner,
    client_interceptors,
    current_caller,
    issue_certificate,
)
from protocols.identity import Identity
from protocols.relay import MAX_DATA_BYTES, RelayHub, RelayLimits, RelayTunnel, parse_ports
from protocols.tensor_stream import grpc_options
from tests.polling import until

SWARM = "relay-test"
BIG = 8 << 20  # one call's payload: many relay frames, more than gRPC's default 4 MiB message
OPTIONS = [*grpc_options(64 << 20), ("grpc.use_local_subchannel_pool", 1)]  # own TCP connections



# ---------------------------------------------------------------- the peer's own service


async def _unary(request: bytes, context) -> bytes:
    """Who called (the verified signer), what TLS client it saw, and the body's digest."""
    who = current_caller().peer_id
    tls_id = tls.tls_peer_id(context) or "-"
    return f"{who} {tls_id} {len(request)} ".encode() + hashlib.sha256(request).digest()


async def _bidi(requests, context):
    async for message in requests:
        yield message[::-1]  # the bytes reversed: clearly computed by the peer, not echoed


def _service() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("t.Peer", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    })


@dataclass
class World:
    """A swarm (a coordinator key, its members), the NAT'd peer's server, a relay hub."""

    coordinator: Identity = field(default_factory=Identity.generate)
    peer: Identity = field(default_factory=Identity.generate)
    client: Identity = field(default_factory=Identity.generate)
    members: set[str] = field(default_factory=set)
    servers: list[grpc.aio.Server] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    tunnels: list[RelayTunnel] = field(default_factory=list)
    hubs: list[RelayHub] = field(default_factory=list)

    def cert(self, identity: Identity) -> pb.SignedCertificate:
        self.members.add(identity.peer_id)
        return issue_certificate(self.coordinator, identity.public_key, SWARM, 600, time.time(),
                                 serial=len(self.members))

    def auth(self) -> AuthInterceptor:
        return AuthInterceptor(issuer_public_key=lambda: self.coordinator.public_key,
                               swarm_id=lambda: SWARM, is_member=self.members.__contains__,
                               key_only_methods=frozenset())

    def signed(self, identity: Identity) -> list:
        cert = self.cert(identity)
        return client_interceptors(CallSigner(identity, lambda: cert))

    async def server(self, *handlers, credentials=None, port: int = 0) -> tuple[grpc.aio.Server,
                                                                                  int]:
        server = grpc.aio.server(interceptors=[self.auth()], options=OPTIONS)
        server.add_generic_rpc_handlers(list(handlers))
        bound = (server.add_secure_port(f"127.0.0.1:{port}", credentials) if credentials
                 else server.add_insecure_port(f"127.0.0.1:{port}"))
        assert bound
        await server.start()
        self.servers.append(server)
        return server, bound

    async def hub(self, port: int = 0, **kw) -> tuple[RelayHub, grpc.aio.Server, int]:
        hub = RelayHub(kw.pop("admit", self.members.__contains__), advertise_host="127.0.0.1",
                       bind_host="127.0.0.1", **kw)
        server = grpc.aio.server(interceptors=[self.auth()], options=OPTIONS)
        pbg.add_RelayServicer_to_server(hub, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        assert bound
        await server.start()
        self.servers.append(server)
        self.hubs.append(hub)
        return hub, server, bound

    def channel(self, address: str, identity: Identity) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(address, options=OPTIONS,
                                       interceptors=self.signed(identity))
        self.channels.append(ch)
        return ch

    def tunnel(self, relay_port: int, target_port: int, identity: Identity | None = None,
               **kw) -> RelayTunnel:
        ch = self.channel(f"127.0.0.1:{relay_port}", identity or self.peer)
        t = RelayTunnel(f"127.0.0.1:{relay_port}", f"127.0.0.1:{target_port}", lambda: ch,
                        backoff_s=0.05, backoff_cap_s=0.2, **kw)
        t.start()
        self.tunnels.append(t)
        return t

    async def close(self) -> None:
        # the relay's own stops must end (a hang there fails the test, named); gRPC's channel
        # close and server stop are bounded too, so that a library call stuck on a loaded
        # machine cannot hold the whole test session (CI once timed out here after 300 s)
        for t in self.tunnels:
            await asyncio.wait_for(t.stop(), 30)
        for h in self.hubs:
            await asyncio.wait_for(h.stop(), 30)
        for ch in self.channels:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ch.close(), 10)
        for s in self.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.stop(None), 10)


def run(test: Callable[[World], Awaitable[None]]) -> None:
    async def main() -> None:
        world = World()
        try:
            await asyncio.wait_for(test(world), 120)
        finally:
            await world.close()

    asyncio.run(main())


async def _calls(ch: grpc.aio.Channel, payload: bytes) -> tuple[bytes, list[bytes]]:
    unary = await ch.unary_unary("/t.Peer/Unary")(payload, timeout=60)
    chunks = [payload[i:i + (1 << 20)] for i in range(0, len(payload), 1 << 20)]

    async def requests():
        for c in chunks:
            yield c

    answers = [m async for m in ch.stream_stream("/t.Peer/Bidi")(requests(), timeout=60)]
    assert answers == [c[::-1] for c in chunks]
    return unary, answers


# ---------------------------------------------------------------- tests


def test_calls_through_the_relay_arrive_signed_whole_and_counted() -> None:
    async def main(w: World) -> None:
        _, peer_port = await w.server(_service())
        hub, _, hub_port = await w.hub()
        addresses: list[str] = []
        tunnel = w.tunnel(hub_port, peer_port, on_address=addresses.append)
        address = await until(lambda: tunnel.address)
        assert address.startswith("127.0.0.1:") and address != f"127.0.0.1:{peer_port}"
        assert addresses == [address] and hub.attached[w.peer.peer_id].address == address
        payload = os.urandom(BIG)
        clients = [Identity.generate() for _ in range(3)]
        results = await asyncio.gather(*(_calls(w.channel(address, c), payload[: BIG - i])
                                         for i, c in enumerate(clients)))
        for i, (client, (unary, _)) in enumerate(zip(clients, results, strict=True)):
            who, tls_id, size, digest = unary.split(b" ", 3)
            assert who.decode() == client.peer_id  # the peer verified the client's signature
            assert (tls_id, int(size)) == (b"-", BIG - i)
            assert digest == hashlib.sha256(payload[: BIG - i]).digest()
        assert hub.attached[w.peer.peer_id].conns.highest >= 3  # one TCP connection per client
        # every byte went through the relay: per client the unary request, and the bidi call's
        # requests and answers
        assert hub.relayed_bytes > 3 * 3 * (BIG - 2)
        assert hub.bytes_by_peer == {w.peer.peer_id: hub.relayed_bytes}
        assert tunnel.relayed_bytes > 3 * 3 * (BIG - 2)

    run(main)


def test_mtls_runs_end_to_end_through_the_relay(monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")

    async def main(w: World) -> None:
        ca, ca_key = tls.make_coordinator_ca(w.coordinator.public_key)

        def leaf(identity: Identity) -> tls.PeerTls:
            key = tls.new_tls_key()
            pid = identity.peer_id
            return tls.PeerTls(ca, tls.sign_csr(ca, ca_key, tls.csr_for_key(pid, key), pid), key)

        server_tls = tls.PeerServerTls()
        server_tls.update(leaf(w.peer))
        _, peer_port = await w.server(_service(), credentials=server_tls.credentials)
        _, _, hub_port = await w.hub()  # the relay itself serves plaintext here
        tunnel = w.tunnel(hub_port, peer_port)
        address = await until(lambda: tunnel.address)
        cert = w.cert(w.client)
        async with tls.peer_channel(address, w.peer.peer_id, leaf(w.client), options=OPTIONS,
                                    interceptors=client_interceptors(
                                        CallSigner(w.client, lambda: cert))) as ch:
            payload = os.urandom(BIG)
            unary, _ = await _calls(ch, payload)
        who, tls_id, _, digest = unary.split(b" ", 3)
        # the peer's server saw the client's own certificate: TLS ended at the peer, not the relay
        assert who.decode() == tls_id.decode() == w.client.peer_id
        assert digest == hashlib.sha256(payload).digest()
        # dialled as another peer, the handshake fails: the relay cannot stand in for the peer
        # (a plain TLS client, as gRPC's would: a gRPC channel left mid-failed-handshake once
        # hung this test and, through its poller thread, pytest's exit, on a loaded machine)
        client_leaf = leaf(w.client)
        ctx = ssl.create_default_context(cadata=client_leaf.ca_pem.decode())
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.pem").write_bytes(client_leaf.cert_pem)
            (Path(d) / "k.pem").write_bytes(client_leaf.key_pem)
            ctx.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
        host, _, port = address.rpartition(":")
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            await asyncio.wait_for(asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname=w.client.peer_id), 30)

    run(main)


def test_the_hub_refuses_strangers_and_beyond_its_limits() -> None:
    async def main(w: World) -> None:
        _, peer_port = await w.server(_service())
        outsider = Identity.generate()
        hub, _, hub_port = await w.hub(admit=lambda pid: pid != outsider.peer_id,
                                       limits=RelayLimits(max_peers=1))
        refused = w.tunnel(hub_port, peer_port, outsider)
        await until(lambda: refused.failures >= 1)
        assert "not a live member" in refused.last_error and refused.address == ""
        assert outsider.peer_id not in hub.attached
        # unsigned: the AuthInterceptor refuses before the hub sees it
        async with grpc.aio.insecure_channel(f"127.0.0.1:{hub_port}") as ch:
            call = pbg.RelayStub(ch).Attach(iter([pb.RelayFrame(keepalive=True)]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await refused.stop()
        first = w.tunnel(hub_port, peer_port)
        await until(lambda: first.address)
        second = w.tunnel(hub_port, peer_port, Identity.generate())
        await until(lambda: second.failures >= 1)
        assert "carries 1 peers already" in second.last_error
        assert list(hub.attached) == [w.peer.peer_id]

    run(main)


def test_the_listener_closes_when_the_stream_ends_and_when_the_hub_stops() -> None:
    async def main(w: World) -> None:
        _, peer_port = await w.server(_service())
        hub, _, hub_port = await w.hub()
        tunnel = w.tunnel(hub_port, peer_port)
        address = await until(lambda: tunnel.address)
        host, port = tls.split_host_port(address)
        _, writer = await asyncio.open_connection(host, port)  # a connection being carried
        await until(lambda: hub.connections() == 1)
        await tunnel.stop()
        await until(lambda: not hub.attached)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)
        writer.close()
        again = w.tunnel(hub_port, peer_port)
        address = await until(lambda: again.address)
        assert address == f"{host}:{port}"  # the same peer gets its port back
        await hub.stop()
        await until(lambda: "stopping" in again.last_error)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)

    run(main)


def test_the_tunnel_reattaches_after_the_relay_restarts() -> None:
    async def main(w: World) -> None:
        _, peer_port = await w.server(_service())
        hub, server, hub_port = await w.hub()
        addresses: list[str] = []
        tunnel = w.tunnel(hub_port, peer_port, on_address=addresses.append)
        first = await until(lambda: tunnel.address)
        await hub.stop()
        await server.stop(None)
        await until(lambda: tunnel.address == "")
        hub2, _, _ = await w.hub(port=hub_port, ports=parse_ports("0"))
        second = await until(lambda: tunnel.address)
        assert addresses[:2] == [first, ""] and addresses[-1] == second
        assert tunnel.attaches >= 2 and w.peer.peer_id in hub2.attached
        unary, _ = await _calls(w.channel(second, w.client), b"after the restart")
        assert unary.split(b" ")[0].decode() == w.client.peer_id

    run(main)


def test_a_malformed_frame_ends_that_stream_only() -> None:
    async def main(w: World) -> None:
        _, peer_port = await w.server(_service())
        hub, _, hub_port = await w.hub()
        good = w.tunnel(hub_port, peer_port)
        good_address = await until(lambda: good.address)

        async def attach(bad: pb.RelayFrame) -> list[pb.RelayFrame]:
            got: list[pb.RelayFrame] = []
            addressed = asyncio.Event()

            async def frames():
                yield pb.RelayFrame(keepalive=True)
                await addressed.wait()
                yield bad
                await asyncio.sleep(30)  # keep our side open: the hub must end the stream

            ch = w.channel(f"127.0.0.1:{hub_port}", Identity.generate())
            async for frame in pbg.RelayStub(ch).Attach(frames()):
                got.append(frame)
                addressed.set()
            return got

        for bad, words in [
            (pb.RelayFrame(conn=99, data=b"x"), "connection 99 was never opened"),
            (pb.RelayFrame(conn=1, data=bytes(MAX_DATA_BYTES + 1)), f"at most {MAX_DATA_BYTES}"),
            (pb.RelayFrame(conn=1, open=True), "only data, close and keepalive"),
            (pb.RelayFrame(conn=0, close=True), "connection 0"),
        ]:
            got = await attach(bad)
            assert got[0].address and got[-1].error, got
            assert words in got[-1].error and "malformed frame" in got[-1].error
        await until(lambda: list(hub.attached) == [w.peer.peer_id])
        unary, _ = await _calls(w.channel(good_address, w.client), b"still served")
        assert unary.split(b" ")[0].decode() == w.client.peer_id

    run(main)


def test_relay_ports_parse_with_clear_errors() -> None:
    assert parse_ports("40000-40999") == range(40000, 41000)
    assert parse_ports("40000") == range(40000, 40001)
    assert parse_ports("") is None and parse_ports("0") is None  # any free port
    with pytest.raises(ValueError, match="FIRST-LAST"):
        parse_ports("forty")
    with pytest.raises(ValueError, match="FIRST <= LAST"):
        parse_ports("5-4")


def test_a_socket_that_does_not_read_holds_the_sender_back_with_bounded_queues() -> None:
    """The peer's server stops reading: the relay's queues fill to their bounds and the sender
    is held back (its writes wait); nothing piles up without bound, and once the server reads
    again every byte arrives, in order."""
    total = 64 << 20
    limits = RelayLimits(conn_queue_frames=4, stream_queue_frames=4)

    async def main(w: World) -> None:
        reading = asyncio.Event()
        received = hashlib.sha256()
        got = [0]

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reading.wait()
            while data := await reader.read(1 << 20):
                received.update(data)
                got[0] += len(data)
            writer.close()

        target = await asyncio.start_server(slow, "127.0.0.1", 0)
        hub, _, hub_port = await w.hub(limits=limits)
        tunnel = w.tunnel(hub_port, target.sockets[0].getsockname()[1], limits=limits)
        host, port = tls.split_host_port(await until(lambda: tunnel.address))
        payload = os.urandom(total)
        _, writer = await asyncio.open_connection(host, port)

        async def send() -> None:
            for i in range(0, total, 1 << 20):
                writer.write(payload[i:i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        try:
            await until(lambda: tunnel.conns.queued() == limits.conn_queue_frames)
            await asyncio.sleep(0.5)  # let whatever can still move move (no timing asserted)
            assert tunnel.conns.queued() <= limits.conn_queue_frames
            assert not sending.done()  # the sender is held back
            # in flight: the frame queues plus the sockets' and gRPC's buffers, far below total
            assert hub.relayed_bytes < total // 2
            reading.set()
            await sending
            await until(lambda: got[0] == total)
            assert received.digest() == hashlib.sha256(payload).digest()
        finally:
            sending.cancel()
            writer.close()
            target.close()

    run(main)


def test_a_silent_peer_is_taken_as_dead_and_its_port_closed() -> None:
    """A stream that sends nothing after its first frame (no keep-alives) ends with an error
    naming the keep-alive interval, and the port allocated for it closes."""
    limits = RelayLimits(keepalive_s=0.2, idle_timeout_s=1.0)

    async def main(w: World) -> None:
        hub, _, hub_port = await w.hub(limits=limits)
        ch = w.channel(f"127.0.0.1:{hub_port}", w.peer)

        async def frames():
            yield pb.RelayFrame(keepalive=True)
            await asyncio.sleep(60)  # then silence

        got = [f async for f in pbg.RelayStub(ch).Attach(frames())]
        assert got[0].address and "taken as dead" in got[-1].error, got
        assert "keepalive at least every 0.2 s" in got[-1].error
        host, port = tls.split_host_port(got[0].address)
        await until(lambda: not hub.attached)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)

    run(main)
