"""Request streams that never send their first message (issue #12, row 13).

The server reads a stream's first message before it authenticates the call (the signature covers
its bytes). A caller that opens a stream and then sends nothing must not hold the handler: after
FIRST_MESSAGE_TIMEOUT_S the call ends with a status (UNAUTHENTICATED when the signature covered a
message that never came, INVALID_ARGUMENT naming the deadline when it covered an empty body) and
the server keeps serving. Real grpc.aio server on 127.0.0.1, real identities.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from protocols import codec, interceptors, shoal_pb2, shoal_pb2_grpc, tensor_stream
from protocols.auth import AuthInterceptor, CallSigner, client_interceptors, issue_certificate
from protocols.identity import Identity

SWARM = "swarm-f"
FORWARD = "/shoal.v1.Stage/Forward"


class Stage(shoal_pb2_grpc.StageServicer):
    """Echoes the tensors back, answering codec errors as peer/services.py does."""

    async def Forward(self, request_iterator, context):
        try:
            _, arrays = await tensor_stream.receive(request_iterator, codec.Limits())
        except codec.CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"forward: {exc}")
        encoded = codec.encode(arrays)
        reply = codec.fill_header(shoal_pb2.CallHeader(kind="forward"), encoded)
        for chunk in tensor_stream.chunks(reply, encoded.payload):
            yield chunk


async def silent():
    await asyncio.Event().wait()  # never sends anything
    yield shoal_pb2.TensorChunk()


def good_chunks() -> list[shoal_pb2.TensorChunk]:
    encoded = codec.encode({"x": np.array([1.0, 2.0], np.float32)})
    header = codec.fill_header(shoal_pb2.CallHeader(kind="forward"), encoded)
    return list(tensor_stream.chunks(header, encoded.payload))


class World:
    def __init__(self) -> None:
        self.coordinator, self.peer = Identity.generate(), Identity.generate()
        self.cert = issue_certificate(self.coordinator, self.peer.public_key, SWARM, 60.0,
                                      time.time(), serial=1)
        self.signer = CallSigner(self.peer, lambda: self.cert)
        self.address = ""

    def plain(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address)

    def signed(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address,
                                         interceptors=client_interceptors(self.signer))

    async def forward_ok(self) -> None:
        async with self.signed() as channel:
            replies = [c async for c in shoal_pb2_grpc.StageStub(channel).Forward(
                iter(good_chunks()), timeout=10)]
        assert replies[0].header.total_bytes == 8


def run(body) -> None:
    async def main() -> None:
        world = World()
        server = grpc.aio.server(interceptors=[AuthInterceptor(
            issuer_public_key=lambda: world.coordinator.public_key, swarm_id=lambda: SWARM,
            is_member=lambda peer_id: peer_id == world.peer.peer_id)],
            options=[("grpc.so_reuseport", 0)])
        shoal_pb2_grpc.add_StageServicer_to_server(Stage(), server)
        world.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            await asyncio.wait_for(body(world), 30)
        finally:
            await server.stop(None)

    asyncio.run(main())


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value.code(), info.value.details()


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setattr(interceptors, "FIRST_MESSAGE_TIMEOUT_S", 0.5)


def test_silent_stream_signed_over_a_message_ends_unauthenticated(short_deadline) -> None:
    async def body(world: World) -> None:
        metadata = world.signer.metadata(FORWARD, good_chunks()[0].SerializeToString())
        async with world.plain() as channel:
            call = shoal_pb2_grpc.StageStub(channel).Forward(silent(), metadata=metadata,
                                                              timeout=20)
            code, _ = await status_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert interceptors._Replay.waiting == 0
        await world.forward_ok()  # still serving

    run(body)


def test_silent_stream_signed_over_nothing_ends_naming_the_deadline(short_deadline) -> None:
    async def body(world: World) -> None:
        metadata = world.signer.metadata(FORWARD, b"")
        async with world.plain() as channel:
            call = shoal_pb2_grpc.StageStub(channel).Forward(silent(), metadata=metadata,
                                                              timeout=20)
            code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "no request message arrived within 0.5 s" in details
        await world.forward_ok()

    run(body)


def test_unsigned_silent_stream_ends_unauthenticated(short_deadline) -> None:
    async def body(world: World) -> None:
        async with world.plain() as channel:
            code, details = await status_of(shoal_pb2_grpc.StageStub(channel).Forward(
                silent(), timeout=20))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not signed" in details
        await world.forward_ok()

    run(body)


def test_many_silent_streams_get_a_shorter_deadline(monkeypatch) -> None:
    monkeypatch.setattr(interceptors, "FIRST_MESSAGE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(interceptors, "MAX_WAITING_FIRST", 3)
    monkeypatch.setattr(interceptors, "FIRST_MESSAGE_PRESSED_S", 0.3)

    async def body(world: World) -> None:
        async with world.plain() as channel:
            stub = shoal_pb2_grpc.StageStub(channel)
            held = [stub.Forward(silent(), timeout=30) for _ in range(3)]
            for _ in range(100):  # until the server holds all three
                if interceptors._Replay.waiting == 3:
                    break
                await asyncio.sleep(0.05)
            assert interceptors._Replay.waiting == 3
            code, _ = await status_of(stub.Forward(silent(), timeout=20))
            assert code == grpc.StatusCode.UNAUTHENTICATED  # after 0.3 s, not 60 s
            await world.forward_ok()  # honest streams send at once: served meanwhile
            for call in held:
                call.cancel()

    run(body)
