"""The data plane over mTLS with the swarm's contexts (peer_server_context / peer_client_context),
on 127.0.0.1, under asyncio's loop and uvloop: the handshake, the ticket read and the payload's
sends run on worker threads, and every bound the plain data plane keeps still holds: tickets are
single use, a wrong client certificate or a silent client gets nothing, pending connections are
bounded with the oldest evicted and a transfer under way never evicted, a renewed leaf is used
by new connections, close() ends a transfer in flight and its threads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import uvloop

from protocols import codec, dataplane, digest, tls
from protocols import shoal_pb2 as pb
from protocols.codec import Limits
from protocols.dataplane import DataPlaneServer, TicketRefused

MIB = 1 << 20
SERVER_ID, CLIENT_ID = "00000000000000aa", "00000000000000bb"
LOOPS = ["asyncio", "uvloop"]


def run(loop: str, coro_fn: Callable[[], Awaitable[None]]) -> None:
    main = asyncio.wait_for(coro_fn(), 60)
    uvloop.run(main) if loop == "uvloop" else asyncio.run(main)


class Swarm:
    """A swarm CA and leaves it issues, as a coordinator does at join."""

    def __init__(self) -> None:
        self.ca, self.ca_key = tls.make_coordinator_ca(os.urandom(32))

    def leaf(self, peer_id: str) -> tls.PeerTls:
        key = tls.new_tls_key()
        return tls.PeerTls(self.ca, tls.sign_csr(self.ca, self.ca_key,
                                                 tls.csr_for_key(peer_id, key), peer_id, days=1),
                           key)


@pytest.fixture(scope="module")
def swarm() -> Swarm:
    return Swarm()


def server_context(leaf: tls.PeerTls) -> ssl.SSLContext:
    return dataplane.peer_server_context(leaf.ca_pem, leaf.cert_pem, leaf.key_pem)


def client_context(leaf: tls.PeerTls, ca_pem: bytes | None = None) -> ssl.SSLContext:
    return dataplane.peer_client_context(ca_pem or leaf.ca_pem, leaf.cert_pem, leaf.key_pem)


def make_call(mib: float) -> tuple[pb.CallHeader, np.ndarray, np.ndarray]:
    array = np.random.default_rng(1).standard_normal(int(mib * MIB) // 4).astype(np.float32)
    from peer.state_service import encode_state  # the state's encoding: a numpy payload, BLAKE3

    encoded = encode_state({"w": array}, digest.BLAKE3)
    return codec.fill_header(pb.CallHeader(kind="state", stage=1), encoded), encoded.payload, array


async def started(swarm: Swarm, **kwargs) -> DataPlaneServer:
    server = DataPlaneServer("127.0.0.1", ssl_context=server_context(swarm.leaf(SERVER_ID)),
                             **kwargs)
    await server.start()
    return server


def tls_connect(port: int, context: ssl.SSLContext, timeout: float = 10) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname=SERVER_ID)


async def until(condition: Callable[[], bool], what: str, bound: float = 10) -> None:
    """Wait (on the loop) until `condition` holds; the bound only turns a hang into a failure."""
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.02)


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dataplane") and t.is_alive()]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_fetch_is_served_once_and_a_bad_ticket_gets_nothing(loop, swarm) -> None:
    header, payload, array = make_call(20)
    client = client_context(swarm.leaf(CLIENT_ID))

    async def main() -> None:
        server = await started(swarm)
        try:
            answer = server.offer(header, payload)
            got = await dataplane.fetch_async(answer, Limits(), ssl_context=client,
                                              server_hostname=SERVER_ID)
            np.testing.assert_array_equal(got["w"], array)
            with pytest.raises(TicketRefused):  # used
                await dataplane.fetch_async(answer, Limits(), ssl_context=client,
                                            server_hostname=SERVER_ID)
            wrong = server.offer(header, payload)
            wrong.meta["ticket"] = "11" * 32
            with pytest.raises(TicketRefused):
                await dataplane.fetch_async(wrong, Limits(), ssl_context=client,
                                            server_hostname=SERVER_ID)
            assert (server.served, server.refused, server.failed) == (1, 2, 0)
            assert server.outstanding == 1  # the real ticket of `wrong` is still waiting
        finally:
            await server.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_payload_is_sent_while_the_loop_is_blocked(loop, swarm) -> None:
    """Once a connection is handed over, the handshake, ticket and 64 MiB (far more than the
    socket buffers) need nothing from the loop: the fetch completes while the loop thread is
    blocked in a synchronous wait. Were the sends the loop's, the fetch could not finish and the
    wait would run out."""
    header, payload, array = make_call(64)
    client = client_context(swarm.leaf(CLIENT_ID))

    async def main() -> None:
        server = await started(swarm)
        done = threading.Event()
        got: dict = {}

        def fetch() -> None:
            try:
                got.update(dataplane.fetch(answer, Limits(), ssl_context=client,
                                           server_hostname=SERVER_ID))
            finally:
                done.set()

        try:
            answer = server.offer(header, payload)
            fetcher = threading.Thread(target=fetch)
            fetcher.start()
            await until(lambda: server._pending or server._serving or done.is_set(),
                        "the connection to be accepted")
            assert done.wait(30), "the transfer stalled while the loop was blocked"
            fetcher.join()
            np.testing.assert_array_equal(got["w"], array)
        finally:
            await server.close()

    run(loop, main)


def test_a_client_certificate_of_another_ca_or_none_is_refused(swarm) -> None:
    header, payload, array = make_call(1)
    stranger = Swarm().leaf(CLIENT_ID)
    wrong_ca = client_context(stranger, ca_pem=swarm.ca)  # trusts our server, its leaf is not ours
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cadata=swarm.ca.decode())

    async def main() -> None:
        server = await started(swarm)
        try:
            answer = server.offer(header, payload)
            for context in (wrong_ca, no_cert):
                with pytest.raises(dataplane.DataPlaneError):
                    await dataplane.fetch_async(answer, Limits(), ssl_context=context,
                                                server_hostname=SERVER_ID)
            assert server.refused == 2 and server.served == 0
            assert server.outstanding == 1  # never read: the ticket is still good
            got = await dataplane.fetch_async(answer, Limits(), ssl_context=client_context(
                swarm.leaf(CLIENT_ID)), server_hostname=SERVER_ID)
            np.testing.assert_array_equal(got["w"], array)
        finally:
            await server.close()

    run("asyncio", main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handshake_or_ticket_that_never_comes_is_closed_at_the_deadline(loop, swarm) -> None:
    client = client_context(swarm.leaf(CLIENT_ID))

    async def main() -> None:
        server = await started(swarm, handshake_timeout=0.3)
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        shook = await asyncio.to_thread(tls_connect, server.port, client)  # then nothing
        try:
            assert await asyncio.to_thread(silent.recv, 1) == b""  # EOF: the server closed it
            with pytest.raises((OSError, ssl.SSLError)) as info:
                if await asyncio.to_thread(shook.recv, 1) == b"":
                    raise ConnectionResetError("EOF")
            assert info.value is not None
            await until(lambda: server.timed_out == 2, "both to be counted timed out")
            assert not server._pending and server.refused == 0
        finally:
            silent.close()
            shook.close()
            await server.close()

    run(loop, main)


def _read_some(sock: ssl.SSLSocket, nbytes: int) -> bytes:
    out = bytearray()
    while len(out) < nbytes:
        piece = sock.recv(nbytes - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)


@pytest.mark.parametrize("loop", LOOPS)
def test_pending_tls_connections_are_evicted_oldest_first_never_a_transfer(loop, swarm) -> None:
    """A transfer under way (its receiver reading slowly) stays while idle connections flood
    the server: the flood pushes out its own kind (per address, then in all), a fetch that
    follows is served, and the slow transfer then completes with the right bytes."""
    header, payload, array = make_call(32)
    client = client_context(swarm.leaf(CLIENT_ID))

    async def main() -> None:
        server = await started(swarm, max_connections=6, max_per_address=3)
        idle: list[socket.socket] = []
        try:
            host, port, ticket = dataplane.endpoint(server.offer(header, payload))
            slow = await asyncio.to_thread(tls_connect, port, client)
            await asyncio.to_thread(slow.sendall, dataplane.MAGIC + ticket)
            first = await asyncio.to_thread(_read_some, slow, 1 * MIB)
            assert len(first) == 1 * MIB and len(server._serving) == 1
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                for _ in range(4):
                    idle.append(socket.create_connection((host, port),
                                                         source_address=(source, 0)))
            await until(lambda: server.evicted == 7, "the flood to evict 7 (3 + 3 + 1)")
            per_address: dict[str, int] = {}
            for pending in server._pending.values():
                per_address[pending.address] = per_address.get(pending.address, 0) + 1
            assert per_address == {"127.0.0.3": 2, "127.0.0.4": 3}  # 5 pending + 1 serving
            assert len(server._serving) == 1
            got = await dataplane.fetch_async(server.offer(header, payload), Limits(),
                                              ssl_context=client, server_hostname=SERVER_ID)
            np.testing.assert_array_equal(got["w"], array)
            rest = await asyncio.to_thread(_read_some, slow, 8 + len(payload))
            slow.close()
            body = (first + rest)[8:]
            assert body == bytes(payload)
            await until(lambda: server.served == 2, "the slow transfer to be counted")
        finally:
            for sock in idle:
                sock.close()
            await server.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_ends_a_transfer_in_flight_and_its_threads(loop, swarm) -> None:
    header, payload, _ = make_call(64)
    client = client_context(swarm.leaf(CLIENT_ID))

    async def main() -> None:
        server = await started(swarm, io_timeout=30)
        _, port, ticket = dataplane.endpoint(server.offer(header, payload))
        stalled = await asyncio.to_thread(tls_connect, port, client)
        try:
            await asyncio.to_thread(stalled.sendall, dataplane.MAGIC + ticket)
            assert len(await asyncio.to_thread(_read_some, stalled, MIB)) == MIB  # under way
            assert worker_threads()
            await asyncio.wait_for(server.close(), 10)  # not io_timeout: the send is cut short
            assert server.failed == 1 and server.served == 0
            assert not worker_threads(), "close() left data plane threads running"
            with pytest.raises(DataPlaneTruncated):
                got = await asyncio.to_thread(_read_some, stalled, len(payload))
                if len(got) < len(payload) - MIB:
                    raise DataPlaneTruncated
        finally:
            stalled.close()

    run(loop, main)


class DataPlaneTruncated(Exception):
    pass


def test_a_renewed_leaf_is_what_new_connections_get(swarm) -> None:
    header, payload, array = make_call(1)
    old, new = swarm.leaf(SERVER_ID), swarm.leaf(SERVER_ID)
    client = client_context(swarm.leaf(CLIENT_ID))

    def presented(port: int) -> bytes:
        with tls_connect(port, client) as sock:
            return sock.getpeercert(binary_form=True)

    async def main() -> None:
        context = server_context(old)
        server = DataPlaneServer("127.0.0.1", ssl_context=context)
        await server.start()
        try:
            assert await asyncio.to_thread(presented, server.port) == \
                ssl.PEM_cert_to_DER_cert(old.cert_pem.decode())
            dataplane.renew_leaf(context, new.cert_pem, new.key_pem)
            assert await asyncio.to_thread(presented, server.port) == \
                ssl.PEM_cert_to_DER_cert(new.cert_pem.decode())
            got = await dataplane.fetch_async(server.offer(header, payload), Limits(),
                                              ssl_context=client, server_hostname=SERVER_ID)
            np.testing.assert_array_equal(got["w"], array)
        finally:
            await server.close()

    run("asyncio", main)


TLS_LIES = [
    ("short", lambda p: p[:-5], codec.TruncatedPayload, "closed after"),
    ("extra", lambda p: p + b"!", codec.OversizedPayload, "more than"),
    ("flipped", lambda p: p[:-1] + bytes([p[-1] ^ 1]), codec.DigestMismatch, "BLAKE3"),
]


@pytest.mark.parametrize(("name", "lie", "error", "message"), TLS_LIES,
                         ids=[lie[0] for lie in TLS_LIES])
@pytest.mark.parametrize("close_notify", [False, True], ids=["abrupt", "close_notify"])
def test_a_lying_tls_server_is_refused(name, lie, error, message, close_notify, swarm) -> None:
    """The receiver decrypts from memory (TlsOverBio): a payload short, long or altered under
    TLS (the server's own lie: the records are authentic) is refused as over plain TCP, whether
    the server ends with close_notify or just closes."""
    header, payload, _ = make_call(3)
    context = server_context(swarm.leaf(SERVER_ID))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.recv(len(dataplane.MAGIC) + dataplane.TICKET_BYTES)
            tls_conn.sendall(dataplane.LENGTH.pack(len(payload)) + lie(bytes(payload)))
            if close_notify:
                with contextlib.suppress(OSError):  # the receiver may be gone already
                    tls_conn.unwrap()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    answer = pb.CallHeader()
    answer.CopyFrom(header)
    answer.meta["dataplane"] = f"127.0.0.1:{listener.getsockname()[1]}"
    answer.meta["ticket"] = "22" * 32
    try:
        with pytest.raises(error, match=message):
            dataplane.fetch(answer, Limits(), ssl_context=client_context(swarm.leaf(CLIENT_ID)),
                            server_hostname=SERVER_ID, timeout=10)
    finally:
        thread.join(10)
        listener.close()
