"""Tensor calls over real sockets on 127.0.0.1: in-band grpc.aio streaming, and the raw-TCP data
plane (good, wrong, used and expired tickets; lying lengths; TLS)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from protocols import codec, dataplane, digest, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pb_grpc
from protocols.codec import DigestMismatch, Limits, OversizedPayload, TruncatedPayload
from protocols.dataplane import DataPlaneServer, TicketRefused, TooManyTickets

MIB = 1 << 20


def make_call(mib: float, kind: str = "state", alg: str = digest.SHA256_TREE
              ) -> tuple[pb.CallHeader, bytes, np.ndarray]:
    array = np.random.default_rng(0).standard_normal(int(mib * MIB) // 4).astype(np.float32)
    encoded = codec.encode({"w": array}, digest=alg)
    return codec.fill_header(pb.CallHeader(kind=kind, stage=1), encoded), encoded.payload, array


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 30))


# ------------------------------------------------------------------ in-band gRPC streaming


class EchoStage(pb_grpc.StageServicer):
    """Receives a forward call and answers with the same tensors, recording message sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def Forward(self, request_iterator, context):
        async def recorded():
            async for chunk in request_iterator:
                self.sizes.append(chunk.ByteSize())
                yield chunk

        header, arrays = await tensor_stream.receive(recorded(), Limits())
        encoded = codec.encode(arrays)
        reply = codec.fill_header(pb.CallHeader(kind="forward", microbatch_id=header.microbatch_id),
                                  encoded)
        for chunk in tensor_stream.chunks(reply, encoded.payload, tensor_stream.MAX_CHUNK):
            yield chunk


def test_10_mib_tensor_through_grpc_aio_with_no_message_over_4_mib() -> None:
    header, payload, array = make_call(10, "forward")
    header.microbatch_id = "mb-1"
    four_mib = [("grpc.max_receive_message_length", 4 * MIB)]  # the default: must be enough

    async def main() -> None:
        servicer = EchoStage()
        server = grpc.aio.server(options=tensor_stream.grpc_options() + four_mib)
        pb_grpc.add_StageServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            options = tensor_stream.grpc_options() + four_mib
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                call = pb_grpc.StageStub(channel).Forward(
                    tensor_stream.chunks(header, payload, tensor_stream.MAX_CHUNK))
                reply, arrays = await tensor_stream.receive(call, Limits())
        finally:
            await server.stop(None)
        assert reply.microbatch_id == "mb-1"
        np.testing.assert_array_equal(arrays["w"], array)
        assert len(servicer.sizes) == 1 + 3 and max(servicer.sizes) <= 4 * MIB

    run(main)


class RefusingStage(pb_grpc.StageServicer):
    """Answers a refused stream INVALID_ARGUMENT, as peer/services.py does."""

    async def Forward(self, request_iterator, context):
        try:
            await tensor_stream.receive(request_iterator, Limits(max_total_bytes=1 * MIB))
        except codec.CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"forward: {exc}")
        yield pb.TensorChunk()


def test_a_stream_refused_at_its_header_still_tells_the_sender_why() -> None:
    """The header is refused at once while the sender still writes 16 MiB: the rest is drained
    (bounded), so the sender sees INVALID_ARGUMENT and the reason, not grpc.aio's INTERNAL
    ("Internal error from Core", grpc/grpc#36066)."""
    header, payload, _ = make_call(16, "forward")

    async def main() -> None:
        server = grpc.aio.server(options=tensor_stream.grpc_options())
        pb_grpc.add_StageServicer_to_server(RefusingStage(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for _ in range(3):
                    call = pb_grpc.StageStub(channel).Forward(
                        tensor_stream.chunks(header, payload, tensor_stream.MAX_CHUNK))
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in call:
                            pass
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, \
                        info.value.details()
                    assert "limit is 1048576" in info.value.details()
        finally:
            await server.stop(None)

    run(main)


def test_stream_refusals() -> None:
    header, payload, _ = make_call(10 / 1024)  # 10240 bytes
    parts = list(tensor_stream.chunks(header, payload, 1024))
    with pytest.raises(TruncatedPayload, match="ended after 9216 of 10240"):
        tensor_stream.receive_sync(parts[:-1], Limits())
    with pytest.raises(OversizedPayload, match="more than the 10240 bytes"):
        tensor_stream.receive_sync([*parts, parts[1]], Limits())
    with pytest.raises(OversizedPayload, match="limit is 4096"):  # refused before allocating
        tensor_stream.receive_sync(iter(parts[:1]), Limits(max_total_bytes=4096))
    with pytest.raises(tensor_stream.MalformedStream, match="before the CallHeader"):
        tensor_stream.receive_sync(parts[1:], Limits())
    with pytest.raises(tensor_stream.MalformedStream, match="second CallHeader"):
        tensor_stream.receive_sync([parts[0], *parts], Limits())
    swapped = [parts[0], *parts[1:][::-1]]
    with pytest.raises(DigestMismatch):
        tensor_stream.receive_sync(swapped, Limits())
    with pytest.raises(ValueError, match="chunk_size"):
        list(tensor_stream.chunks(header, payload, 4 * MIB))


def test_grpc_options_disable_reuseport_and_allow_client_pings() -> None:
    options = dict(tensor_stream.grpc_options())
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.keepalive_time_ms"] >= (
        options["grpc.http2.min_recv_ping_interval_without_data_ms"])


# ------------------------------------------------------------------ data plane


async def started(**kwargs) -> DataPlaneServer:
    server = DataPlaneServer("127.0.0.1", **kwargs)
    await server.start()
    return server


def test_fetch_with_good_ticket_then_wrong_used_and_expired_are_refused() -> None:
    header, payload, array = make_call(3)

    async def main() -> None:
        server = await started()
        try:
            answer = server.offer(header, payload)
            assert answer.meta["dataplane"] == server.address and len(answer.meta["ticket"]) == 64
            arrays = await dataplane.fetch_async(answer, Limits())
            np.testing.assert_array_equal(arrays["w"], array)

            with pytest.raises(TicketRefused, match="unknown, used or expired"):
                await dataplane.fetch_async(answer, Limits())  # used
            wrong = server.offer(header, payload)
            wrong.meta["ticket"] = "00" * 32
            with pytest.raises(TicketRefused):
                await dataplane.fetch_async(wrong, Limits())
            expired = server.offer(header, payload, ttl=0.05)
            await asyncio.sleep(0.1)
            with pytest.raises(TicketRefused):
                await dataplane.fetch_async(expired, Limits())

            again = server.offer(header, payload)  # still serving after the refusals
            np.testing.assert_array_equal((await dataplane.fetch_async(again, Limits()))["w"],
                                          array)
            assert (server.served, server.refused) == (2, 3)
        finally:
            await server.close()

    run(main)


def test_limits_checked_before_connecting_and_tickets_are_bounded() -> None:
    header, payload, _ = make_call(1)

    async def main() -> None:
        server = await started(max_tickets=2)
        try:
            answer = server.offer(header, payload)
            with pytest.raises(OversizedPayload, match="limit is 1000"):
                await dataplane.fetch_async(answer, Limits(max_total_bytes=1000))
            with pytest.raises(dataplane.DataPlaneError, match=r"expected 10\.0\.0\.9"):
                await dataplane.fetch_async(answer, Limits(), expect_host="10.0.0.9")
            _, junk = await asyncio.open_connection("127.0.0.1", server.port)
            junk.write(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)  # not MAGIC + ticket: closed
            await junk.drain()
            junk.close()
            np.testing.assert_array_equal((await dataplane.fetch_async(answer, Limits()))["w"],
                                          np.frombuffer(payload, np.float32))
            server.offer(header, payload)
            server.offer(header, payload)
            with pytest.raises(TooManyTickets, match="max_tickets=2"):
                server.offer(header, payload)
            assert server.outstanding == 2 and (server.served, server.refused) == (1, 1)
        finally:
            await server.close()

    run(main)


LIES = [
    ("length +1", lambda p: struct.pack(">Q", len(p) + 1) + p, OversizedPayload, "announces"),
    ("length -1", lambda p: struct.pack(">Q", len(p) - 1) + p, TruncatedPayload, "announces"),
    ("short", lambda p: struct.pack(">Q", len(p)) + p[:-5], TruncatedPayload, "closed after"),
    ("extra", lambda p: struct.pack(">Q", len(p)) + p + b"!", OversizedPayload, "more than"),
    ("flipped", lambda p: struct.pack(">Q", len(p)) + p[:-1] + b"!", DigestMismatch, "SHA-256"),
]


async def fetch_from_liar(header: pb.CallHeader, answer: bytes) -> dict[str, np.ndarray]:
    """Fetch `header`'s payload from a server that reads the ticket and sends `answer`."""
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(36)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(liar, "127.0.0.1", 0)
    pointer = pb.CallHeader()
    pointer.CopyFrom(header)
    pointer.meta["dataplane"] = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pointer.meta["ticket"] = "ab" * 32
    try:
        return await dataplane.fetch_async(pointer, Limits())
    finally:
        server.close()


@pytest.mark.parametrize(("name", "lie", "error", "message"), LIES, ids=[x[0] for x in LIES])
def test_lying_server_refused(name, lie, error, message) -> None:
    header, payload, _ = make_call(0.1)

    async def main() -> None:
        with pytest.raises(error, match=message):
            await fetch_from_liar(header, lie(payload))

    run(main)


@pytest.mark.parametrize("mib", [0.1, 20])  # one hashing piece; several, a partial last one
@pytest.mark.parametrize(("name", "lie", "error", "message"), LIES, ids=[x[0] for x in LIES])
def test_lying_server_refused_with_a_blake3_header(name, lie, error, message, mib) -> None:
    header, payload, array = make_call(mib, alg=digest.BLAKE3)
    assert header.digest == digest.BLAKE3
    message = "BLAKE3" if message == "SHA-256" else message

    async def main() -> None:
        with pytest.raises(error, match=message):
            await fetch_from_liar(header, lie(payload))
        honest = struct.pack(">Q", len(payload)) + payload
        np.testing.assert_array_equal((await fetch_from_liar(header, honest))["w"], array)

    run(main)


def test_a_header_naming_an_unknown_digest_is_refused_before_connecting() -> None:
    header, payload, _ = make_call(0.1)
    header.digest = "md5"

    async def main() -> None:
        with pytest.raises(codec.MislabeledPayload, match="'md5' is unknown"):
            await fetch_from_liar(header, struct.pack(">Q", len(payload)) + payload)

    run(main)


def _flip(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1:]


BIG_LIES = [  # 20 MiB: leaves hashed on several threads while bytes arrive
    ("one bit in leaf 7", lambda p: _flip(p, 7 * MIB + 12345), DigestMismatch, "differs"),
    ("two leaves swapped", lambda p: p[MIB: 2 * MIB] + p[:MIB] + p[2 * MIB:], DigestMismatch,
     "differs"),
    ("last leaf short", lambda p: p[:-1], TruncatedPayload, "closed after"),
    ("cut mid-leaf", lambda p: p[: 11 * MIB + 77], TruncatedPayload, "closed after"),
]


@pytest.mark.parametrize(("name", "lie", "error", "message"), BIG_LIES,
                         ids=[x[0] for x in BIG_LIES])
def test_big_payload_corruption_and_truncation_refused(name, lie, error, message) -> None:
    header, payload, _ = make_call(20)
    before = set(threading.enumerate())

    async def main() -> None:
        body = lie(payload)
        with pytest.raises(error, match=message):
            await fetch_from_liar(header, struct.pack(">Q", len(payload)) + body)

    run(main)
    # The hash threads stop too: a bounded wait for every thread the fetch started to end (a
    # worker may still be returning from its last leaf when the refusal is raised), not a
    # timing check: the bound only turns a leaked thread into a failure.
    deadline = time.monotonic() + 10
    while (left := [t for t in threading.enumerate() if t not in before and t.is_alive()]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads the fetch started are still running: {[t.name for t in left]}"


def _mixed_with_non_finite() -> tuple[dict[str, np.ndarray], dict, dict]:
    """Tensors whose byte ranges are not value-aligned to leaves (an odd-length bf16 first), with
    NaN/Inf on both sides of 1 MiB boundaries, beside a non-RAW tensor."""
    rng = np.random.default_rng(3)
    bf16 = codec.float32_to_bf16_bits(rng.standard_normal(300_001).astype(np.float32))
    bf16[[5, 300_000]] = 0x7FC0  # NaN bits
    big = rng.standard_normal(5 * MIB // 4 + 3).astype(np.float32)
    big[[0, MIB // 4 - 1, MIB // 4, 4 * MIB // 4 + 1]] = [np.inf, np.nan, -np.inf, np.nan]
    half = rng.standard_normal(1001).astype(np.float16)
    half[1000] = np.inf
    blockwise = rng.standard_normal(4096).astype(np.float32)  # INT8_BLOCKWISE: finite only
    arrays = {"g": bf16, "w": big, "h": half, "q": blockwise,
              "ids": np.arange(7, dtype=np.int64)}
    return arrays, {"q": pb.INT8_BLOCKWISE}, {"g": "bfloat16"}


def test_non_finite_values_refused_with_the_same_verdict_as_in_memory_decode() -> None:
    arrays, encoding, labels = _mixed_with_non_finite()
    encoded = codec.encode(arrays, encoding, labels=labels)
    header = codec.fill_header(pb.CallHeader(kind="state"), encoded)
    only = {name: value for name, value in arrays.items() if name in ("w", "ids")}
    encoded_w = codec.encode(only)
    header_w = codec.fill_header(pb.CallHeader(kind="state"), encoded_w)

    async def main() -> None:
        server = await started()
        try:
            with pytest.raises(codec.NonFinite, match="tensor 'g': 2 of 300001 values"):
                await dataplane.fetch_async(server.offer(header, encoded.payload), Limits())
            with pytest.raises(codec.NonFinite, match="tensor 'w': 4 of 1310723 values"):
                await dataplane.fetch_async(server.offer(header_w, encoded_w.payload), Limits())
            with pytest.raises(codec.NonFinite, match="tensor 'w': 4 of 1310723 values"):
                codec.decode(header_w, encoded_w.payload, Limits())  # the in-memory verdict
            got = await dataplane.fetch_async(server.offer(header, encoded.payload),
                                              Limits(check_finite=False))
            np.testing.assert_array_equal(got["w"], arrays["w"])
            np.testing.assert_array_equal(got["g"], arrays["g"])
        finally:
            await server.close()

    run(main)


def test_non_finite_scan_counts_every_tensor_exactly() -> None:
    arrays, encoding, labels = _mixed_with_non_finite()
    encoded = codec.encode(arrays, encoding, labels=labels)
    header = codec.fill_header(pb.CallHeader(), encoded)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        view = memoryview(encoded.payload)
        scan = codec.FiniteScan(header, Limits(), view, pool.submit)
        for upto in [*range(0, len(view), 77_777), len(view)]:
            scan.filled(upto)
        assert scan.counts() == {"g": 2, "w": 4, "h": 1}  # "q" is checked after decoding
        partial = codec.FiniteScan(header, Limits(), view, pool.submit)
        partial.filled(2 * MIB)  # inside "w"
        with pytest.raises(ValueError, match="'w' was not filled completely"):
            partial.counts()
    # decode takes the counts it is given for those tensors and scans only the others
    out = codec.decode(header, encoded.payload, Limits(), non_finite={"g": 0, "w": 0, "h": 0})
    assert set(out) == set(arrays)
    with pytest.raises(codec.NonFinite, match="tensor 'h': 3 of 1001"):
        codec.decode(header, encoded.payload, Limits(), non_finite={"g": 0, "w": 0, "h": 3})


def test_corruption_wins_over_non_finite() -> None:
    arrays, encoding, labels = _mixed_with_non_finite()
    encoded = codec.encode(arrays, encoding, labels=labels)
    header = codec.fill_header(pb.CallHeader(), encoded)

    async def main() -> None:
        body = _flip(encoded.payload, len(encoded.payload) // 2)
        with pytest.raises(DigestMismatch):  # never a NonFinite verdict on unverified bytes
            await fetch_from_liar(header, struct.pack(">Q", len(body)) + body)

    run(main)


class StateFromMemory(pb_grpc.StateServicer):
    def __init__(self, plane: DataPlaneServer, header: pb.CallHeader, payload: bytes) -> None:
        self.plane, self.header, self.payload = plane, header, payload

    async def Download(self, request, context):
        for chunk in self.plane.respond(self.header, self.payload, min_bytes=1 * MIB):
            yield chunk


@pytest.mark.parametrize("mib", [0.5, 20])
def test_state_download_in_band_or_via_data_plane(mib: float) -> None:
    header, payload, array = make_call(mib)

    async def main() -> None:
        plane = await started()
        server = grpc.aio.server(options=tensor_stream.grpc_options())
        pb_grpc.add_StateServicer_to_server(StateFromMemory(plane, header, payload), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=tensor_stream.grpc_options()) as channel:
                call = pb_grpc.StateStub(channel).Download(pb.StateRequest(stage=1))
                got, arrays = await dataplane.receive(call, Limits(expected={
                    "w": ("float32", array.shape)}))
        finally:
            await server.stop(None)
            await plane.close()
        assert dataplane.is_dataplane(got) == (mib > 1) and plane.served == (mib > 1)
        np.testing.assert_array_equal(arrays["w"], array)

    run(main)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer-a")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_data_plane_over_tls(tmp_path: Path) -> None:
    header, payload, array = make_call(2)
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        server = await started(ssl_context=server_ctx)
        try:
            answer = server.offer(header, payload)
            arrays = await dataplane.fetch_async(answer, Limits(), ssl_context=client_ctx)
            np.testing.assert_array_equal(arrays["w"], array)
            with pytest.raises(dataplane.DataPlaneError):  # plain TCP against a TLS server
                await dataplane.fetch_async(server.offer(header, payload), Limits())
        finally:
            await server.close()

    run(main)


# ------------------------------------------------------------------ idle connections (#12, row 13)


async def open_idle(server: DataPlaneServer, count: int, source: str = "127.0.0.1"
                    ) -> list[asyncio.StreamWriter]:
    """`count` connections that never send a byte (from `source`, any 127/8 address)."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port,
                                                  local_addr=(source, 0))
        writers.append(writer)
    await asyncio.sleep(0.2)  # let the server accept them all
    return writers


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.2"])
def test_idle_connections_do_not_lock_out_a_fetch(source: str) -> None:
    """64 idle sockets (the default max_connections) from the fetcher's own address or another
    one: the fetch that follows is served, and the idle ones are closed to make room."""
    header, payload, array = make_call(1)

    async def main() -> None:
        server = await started()
        idle = await open_idle(server, 64, source)
        try:
            answer = server.offer(header, payload)
            arrays = await dataplane.fetch_async(answer, Limits(), timeout=10)
            np.testing.assert_array_equal(arrays["w"], array)
            assert server.served == 1
            assert server.evicted >= 64 - server.max_per_address
        finally:
            close_all(idle)
            await server.close()

    run(main)


def test_pending_connections_are_bounded_per_address_and_in_all() -> None:
    async def main() -> None:
        server = await started(max_connections=10, max_per_address=3)
        first = await open_idle(server, 5, "127.0.0.2")
        second = await open_idle(server, 9, "127.0.0.3")
        try:
            per_address = {}
            for conn in server._pending.values():
                per_address[conn.address] = per_address.get(conn.address, 0) + 1
            assert per_address == {"127.0.0.2": 3, "127.0.0.3": 3}
            assert server.evicted == 2 + 6
        finally:
            close_all(first + second)
            await server.close()

    run(main)


def test_silent_connections_are_closed_after_the_handshake_deadline() -> None:
    async def main() -> None:
        server = await started(handshake_timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert await asyncio.wait_for(reader.read(1), 5) == b""  # EOF: the server closed
            assert server.timed_out == 1 and not server._pending
        finally:
            writer.close()
            await server.close()

    run(main)


@pytest.mark.parametrize("how", ["stalls", "hangs up"])
def test_a_receiver_that_stalls_or_hangs_up_mid_payload_fails_only_its_own_transfer(how) -> None:
    """Plain TCP payloads are sent from a worker thread: a receiver that stops reading is
    dropped after io_timeout, one that closes early ends its send; the server counts both as
    failed and serves the next fetch."""
    header, payload, array = make_call(64)  # far more than the socket buffers hold

    async def main() -> None:
        server = await started(io_timeout=0.5)
        try:
            host, port, ticket = dataplane.endpoint(server.offer(header, payload))
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(dataplane.MAGIC + ticket)
            await writer.drain()
            await reader.readexactly(1 << 20)  # the transfer is under way
            if how == "hangs up":
                writer.transport.abort()
            deadline = time.monotonic() + 10
            while server.failed == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (server.failed, server.served) == (1, 0)
            writer.close()
            got = await dataplane.fetch_async(server.offer(header, payload), Limits())
            np.testing.assert_array_equal(got["w"], array)
            assert server.served == 1
        finally:
            await server.close()

    run(main)


def test_prefaulting_a_receive_buffer_leaves_its_bytes_and_ends_its_thread() -> None:
    """The prefault thread races recv_into over the same pages: it must never write them (a
    byte written by recv stays), and it ends with the fetch."""
    buffer = np.empty(24 * MIB, np.uint8)
    landed = np.random.default_rng(5).integers(0, 256, 10 * MIB + 123, dtype=np.uint8)
    buffer[: len(landed)] = landed  # what recv_into wrote before the prefault got there
    before = set(threading.enumerate())
    with dataplane.Prefault(buffer) as prefault:
        buffer[len(landed): len(landed) + 5] = 7  # and what it writes meanwhile
    np.testing.assert_array_equal(buffer[: len(landed)], landed)
    assert (buffer[len(landed): len(landed) + 5] == 7).all()
    assert prefault._thread is None or not prefault._thread.is_alive()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_on_done_comes_once_when_nothing_reads_the_payload_any_more() -> None:
    """`offer(on_done=...)` (peer/services.py gives its snapshot buffer back with it): once per
    offer, after its send ended (served or failed), when its ticket expired (unfetched: by a
    timer; or refused as expired), or when the server closed; never while it is being sent."""
    header, payload, array = make_call(64)  # far more than the socket buffers hold
    done: dict[str, int] = {}

    def note(name: str) -> Callable[[], None]:
        return lambda: done.__setitem__(name, done.get(name, 0) + 1)

    async def until(name: str) -> None:
        deadline = time.monotonic() + 10
        while name not in done and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def main() -> None:
        server = await started(io_timeout=5.0)
        try:
            got = await dataplane.fetch_async(server.offer(header, payload, on_done=note("sent")),
                                              Limits())
            np.testing.assert_array_equal(got["w"], array)
            await until("sent")
            host, port, ticket = dataplane.endpoint(
                server.offer(header, payload, on_done=note("hung up")))
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(dataplane.MAGIC + ticket)
            await writer.drain()
            await reader.readexactly(1 << 20)  # the transfer is under way: not done yet
            assert "hung up" not in done
            writer.transport.abort()
            await until("hung up")
            server.offer(header, payload, ttl=0.05, on_done=note("expired"))
            await until("expired")  # no other call to the server meanwhile
            loop, server._loop = server._loop, None  # no timer: found expired when presented
            late = server.offer(header, payload, ttl=0.05, on_done=note("refused"))
            server._loop = loop
            await asyncio.sleep(0.1)
            assert "refused" not in done
            with pytest.raises(TicketRefused):
                await dataplane.fetch_async(late, Limits())
            server.offer(header, payload, on_done=note("closed"))
        finally:
            await server.close()
        await asyncio.sleep(0.5)  # the timers of the offers above fire into a closed server
        assert done == {"sent": 1, "hung up": 1, "expired": 1, "refused": 1, "closed": 1}
        assert (server.served, server.failed) == (1, 1)

    run(main)
