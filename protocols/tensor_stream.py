"""Tensor payloads in-band over gRPC: a CallHeader, then `data` chunks of 1-4 MiB.

This is the path for activations, gradients and sync payloads (kilobytes to tens of MiB). Bulk
payloads (whole stage states) are answered with a header that points at the raw-TCP data plane
instead; see `protocols.dataplane`, whose `receive` handles both kinds of answer.

Chunks stay below gRPC's default 4 MiB message limit (`MAX_CHUNK` leaves room for protobuf
framing), so a peer with default limits can still talk to us. grpcio and protobuf take only
`bytes` for a message's bytes field (memoryview and bytearray raise TypeError), so one copy per
chunk on send is unavoidable; on receive each chunk is copied once into a buffer preallocated
from the header's `total_bytes` (after the header passed the limits), hashed as it arrives
(the payload digest of protocols.digest, leaf by leaf), and
decoded in place (the arrays are views of that buffer).

`grpc_options()` is the one place channel and server options are set: message limits, no
SO_REUSEPORT (two daemons must not silently share a port), and keepalive on both sides so NAT'd
clients ping every 20 s and the server does not answer that with GOAWAY `too_many_pings`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

import numpy as np

from protocols import shoal_pb2 as pb
from protocols.codec import (
    CodecError,
    Limits,
    OversizedPayload,
    TruncatedPayload,
    check_header,
    decode,
)
from protocols.digest import TreeHasher

MIB = 1 << 20
DEFAULT_CHUNK = 2 * MIB
MIN_CHUNK = 1024
MAX_CHUNK = 4 * MIB - 1024  # a TensorChunk of this much data stays under 4 MiB on the wire


class MalformedStream(CodecError):
    """The chunk stream is out of order: no header first, a second header, or nothing at all."""


def grpc_options(max_message: int = 8 * MIB) -> list[tuple[str, int]]:
    """Options for both `grpc.aio.server(options=...)` and channels (each side ignores the
    other's keys). Client pings every 20 s (10 s timeout, also without calls); the server
    accepts pings every 10 s or slower, also without calls, and never drops a client for
    pinging too often."""
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # 0 = never answer pings with GOAWAY(too_many_pings): a long-lived peer channel saw
        # that under load (pings queued behind busy streams arrive in bursts).
        ("grpc.http2.max_ping_strikes", 0),
    ]


def chunks(
    header: pb.CallHeader,
    payload: bytes | bytearray | memoryview,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[pb.TensorChunk]:
    """Yield the header chunk, then the payload in `chunk_size` data chunks.

    Args:
        header: a CallHeader already filled by `codec.fill_header` (not modified).
        payload: the encoded payload; must not be mutated while the iterator is in use.
        chunk_size: MIN_CHUNK..MAX_CHUNK bytes.
    """
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK}")
    if len(payload) != header.total_bytes:
        raise ValueError(f"payload has {len(payload)} bytes, header declares "
                         f"{header.total_bytes}")
    yield pb.TensorChunk(header=header)
    view = memoryview(payload).cast("B")
    for offset in range(0, len(view), chunk_size):
        # bytes(view[...]) is the one copy grpc needs; a bytes payload slices to the same cost.
        yield pb.TensorChunk(data=bytes(view[offset: offset + chunk_size]))


class Assembler:
    """Collects one call's chunks into a preallocated buffer; the sync and async `receive` share it.

    The header is validated against `limits` before the buffer is allocated; each data chunk is
    bounds-checked against the declared total before it is copied, and hashed as it arrives.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.header: pb.CallHeader | None = None
        self._buffer = memoryview(bytearray())
        self._filled = 0
        self._digest = TreeHasher()

    def add(self, chunk: pb.TensorChunk) -> None:
        part = chunk.WhichOneof("part")
        if part == "header":
            if self.header is not None:
                raise MalformedStream("a second CallHeader arrived in the same call")
            check_header(chunk.header, self.limits)
            self.header = chunk.header
            # np.empty leaves pages untouched until data lands (bytearray(n) would memset them)
            self._buffer = memoryview(np.empty(chunk.header.total_bytes, np.uint8))
        elif part == "data":
            if self.header is None:
                raise MalformedStream("payload data arrived before the CallHeader")
            data = chunk.data
            end = self._filled + len(data)
            if end > len(self._buffer):
                raise OversizedPayload(f"stream sent more than the {len(self._buffer)} bytes "
                                       f"its header declares")
            self._buffer[self._filled: end] = data
            self._digest.update(data)
            self._filled = end
        else:
            raise MalformedStream("an empty TensorChunk arrived")

    def finish(self) -> tuple[pb.CallHeader, dict[str, np.ndarray]]:
        if self.header is None:
            raise MalformedStream("the stream ended before its CallHeader")
        if self._filled < len(self._buffer):
            raise TruncatedPayload(f"stream ended after {self._filled} of "
                                   f"{len(self._buffer)} declared bytes")
        arrays = decode(self.header, self._buffer, self.limits,
                        computed_sha256=self._digest.digest())
        return self.header, arrays


async def receive(
    chunk_iter: AsyncIterable[pb.TensorChunk], limits: Limits
) -> tuple[pb.CallHeader, dict[str, np.ndarray]]:
    """Assemble and decode one in-band tensor call from a grpc.aio stream (request iterator or
    call object). Raises a CodecError naming the problem; the arrays are writable views.

    A stream refused before its end (a bad header, too many bytes) is first read on and dropped,
    within DRAIN_MAX_S / DRAIN_MAX_BYTES: a grpc.aio client still writing when the server ends
    the call reports INTERNAL instead of the server's status (grpc/grpc#36066), which would hide
    the INVALID_ARGUMENT and its message from the sender.
    """
    assembler = Assembler(limits)
    stream = aiter(chunk_iter)
    try:
        async for chunk in stream:
            assembler.add(chunk)
    except CodecError:
        await drain(stream)
        raise
    return assembler.finish()


DRAIN_MAX_S, DRAIN_MAX_BYTES = 2.0, 64 * MIB


async def drain(stream: AsyncIterator[pb.TensorChunk]) -> None:
    """Read and drop what is left of a refused stream, within bounds; errors end it quietly.
    Handlers that refuse a request stream themselves (before `receive`) should call it too."""

    async def drop() -> None:
        dropped = 0
        async for chunk in stream:
            dropped += len(chunk.data)
            if dropped > DRAIN_MAX_BYTES:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(drop(), DRAIN_MAX_S)


def receive_sync(
    chunk_iter: Iterable[pb.TensorChunk], limits: Limits
) -> tuple[pb.CallHeader, dict[str, np.ndarray]]:
    """`receive` for synchronous grpc streams and plain iterables."""
    assembler = Assembler(limits)
    for chunk in chunk_iter:
        assembler.add(chunk)
    return assembler.finish()
