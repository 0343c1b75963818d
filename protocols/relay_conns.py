"""The TCP connections one relay stream carries: the same bookkeeping at both of its ends.

A relay (protocols.relay.RelayHub) and the peer it relays for (protocols.relay_tunnel.RelayTunnel)
each hold a `Conns` for their one Relay.Attach stream. Every tunnelled TCP connection is a numbered
`conn`; a socket's bytes become `data` frames on the stream, and `data` frames from the stream are
written to the socket, unchanged (TLS and call signatures pass through end to end).

Bounds (never unbounded memory; a slow side gets backpressure):
- frames waiting to go onto the stream: at most `stream_queue_frames` data frames; past it every
  socket read of that stream pauses until the stream takes one;
- frames waiting for one connection's socket: at most `conn_queue_frames`; past it the stream's
  reader waits (the whole stream pauses, and gRPC flow control then stops the far end: there are
  no per-connection credits on the wire, so one stalled socket holds up its stream's others);
- at most `max_conns` connections per stream, `MAX_DATA_BYTES` per frame.

There is no half-close: a connection's EOF (or error) on either end ends it both ways, which is
how gRPC's HTTP/2 connections end anyway. Event loop only; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.relay")

MAX_DATA_BYTES = 256 << 10  # one frame's data; far below gRPC's (and the coordinator's) limits
KEEPALIVE_S = 15.0  # under common NAT mapping timeouts (30 s and up); the proto says <= 20 s

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass(frozen=True)
class RelayLimits:
    """How much one relay (and one tunnel) takes on; see the module docstring."""

    max_peers: int = 64  # peers attached to one relay at once
    max_conns: int = 128  # connections carried for one attached peer at once
    conn_queue_frames: int = 8  # frames waiting for one connection's socket
    stream_queue_frames: int = 32  # data frames waiting to go onto one stream
    keepalive_s: float = KEEPALIVE_S  # a frame goes each way at least this often
    idle_timeout_s: float = 4 * KEEPALIVE_S  # nothing at all from the far end: the stream is dead


DEFAULT_LIMITS = RelayLimits()


class RelayProtocolError(Exception):
    """The far end of a relay stream sent a frame the protocol does not allow; the stream ends."""


class _Conn:
    def __init__(self, conn_id: int) -> None:
        self.id = conn_id
        self.pending: collections.deque[bytes] = collections.deque()
        self.ready = asyncio.Event()  # pending has data, or remote_closed
        self.drained = asyncio.Event()  # pending has room, or ended
        self.remote_closed = False  # the far end said `close`: flush pending, then end
        self.ended = False
        self.task: asyncio.Task | None = None


class Conns:
    """The connections of one relay stream, at either end.

    Args:
        limits: the bounds above.
        count: called with the size of every data frame carried, both ways (byte counters).
        connect: how to open the local socket for a connection the far end opened (the tunnel:
            dial the peer's own server); None where connections only arrive locally (the relay).

    `out` holds the frames to send, in order; `frames()` yields them (plus keep-alives) and ends
    after an error frame or `finish()`. Event loop only.
    """

    def __init__(self, limits: RelayLimits, count: Callable[[int], None],
                 connect: Connect | None = None) -> None:
        self.limits = limits
        self._count = count
        self._connect = connect
        self.out: asyncio.Queue[pb.RelayFrame | None] = asyncio.Queue()
        self._budget = asyncio.Semaphore(limits.stream_queue_frames)
        self._conns: dict[int, _Conn] = {}
        self.highest = 0  # the highest connection number opened on this stream
        self.closed = False

    def __len__(self) -> int:
        return len(self._conns)

    def queued(self) -> int:
        """Frames from the far end waiting for their sockets, all connections together."""
        return sum(len(c.pending) for c in self._conns.values())

    # ---------------------------------------------------------------- opening

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
        """A local connection arrived (relay side): number it, tell the far end, pump it.
        None when the stream carries max_conns already (the caller closes the socket)."""
        if self.closed or len(self._conns) >= self.limits.max_conns:
            return None
        self.highest += 1
        conn = self._start(self.highest, _ready(reader, writer))
        self.out.put_nowait(pb.RelayFrame(conn=conn.id, open=True))
        return conn.id

    def _start(self, conn_id: int, connect: Connect) -> _Conn:
        conn = _Conn(conn_id)
        self._conns[conn_id] = conn
        conn.task = asyncio.create_task(self._run(conn, connect),
                                        name=f"shoal-relay-conn-{conn_id}")
        return conn

    async def _run(self, conn: _Conn, connect: Connect) -> None:
        """Pump one connection: its socket's bytes onto the stream, the stream's to its socket."""
        writer = None
        writing = None
        try:
            reader, writer = await connect()
            writing = asyncio.create_task(self._write(conn, writer))
            while not conn.ended:
                data = await reader.read(MAX_DATA_BYTES)
                if not data:
                    break
                await self._budget.acquire()  # backpressure: the stream has no room yet
                if conn.ended or self.closed:
                    self._budget.release()
                    break
                self.out.put_nowait(pb.RelayFrame(conn=conn.id, data=data))
                self._count(len(data))
        except OSError as exc:  # dial refused, reset: this connection ends, the stream goes on
            log.debug("relay connection %d: %s", conn.id, exc)
        finally:
            if writing is not None:
                if conn.remote_closed:  # flush what the far end sent before its close
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.wait_for(asyncio.shield(writing), 5.0)
                writing.cancel()
            if writer is not None:
                writer.close()
            self._end(conn)

    async def _write(self, conn: _Conn, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                while not conn.pending:
                    if conn.remote_closed or conn.ended:
                        return
                    conn.ready.clear()
                    await conn.ready.wait()
                data = conn.pending.popleft()
                conn.drained.set()
                writer.write(data)
                await writer.drain()
        if conn.task is not None and not conn.ended:
            conn.task.cancel()  # flushed after the far end's close, or the socket broke: stop

    def _end(self, conn: _Conn) -> None:
        """The connection is over here: forget it, and tell the far end unless it told us."""
        if conn.ended and conn.id not in self._conns:
            return
        conn.ended = True
        conn.ready.set()
        conn.drained.set()
        self._conns.pop(conn.id, None)
        if not conn.remote_closed and not self.closed:
            self.out.put_nowait(pb.RelayFrame(conn=conn.id, close=True))

    # ---------------------------------------------------------------- frames from the far end

    async def receive(self, frame: pb.RelayFrame) -> None:
        """Act on one frame from the far end. May wait while the connection's queue is full.

        Raises:
            RelayProtocolError: a frame the protocol does not allow (the caller ends the stream).
        """
        if frame.keepalive or frame.address or frame.error:
            return  # keep-alives need nothing; address and error are the tunnel's to read
        cid = frame.conn
        if cid == 0:
            raise RelayProtocolError("a frame names connection 0; connections are numbered from 1")
        if len(frame.data) > MAX_DATA_BYTES:
            raise RelayProtocolError(f"connection {cid}: a frame carries {len(frame.data)} bytes "
                                     f"of data; at most {MAX_DATA_BYTES} are allowed per frame")
        if frame.open:
            if self._connect is None:
                raise RelayProtocolError(f"connection {cid}: only the relay opens connections")
            if cid <= self.highest:
                raise RelayProtocolError(f"connection {cid} was opened before; numbers only grow")
            self.highest = cid
            if len(self._conns) >= self.limits.max_conns:
                self.out.put_nowait(pb.RelayFrame(conn=cid, close=True))  # refused: too many
                return
            self._start(cid, self._connect)
        conn = self._conns.get(cid)
        if conn is None:
            if cid > self.highest:
                raise RelayProtocolError(f"connection {cid} was never opened on this stream")
            return  # it ended here while the far end was still sending: drop the rest
        if frame.data:
            while len(conn.pending) >= self.limits.conn_queue_frames and not conn.ended:
                conn.drained.clear()
                await conn.drained.wait()
            if not conn.ended:
                conn.pending.append(frame.data)
                conn.ready.set()
                self._count(len(frame.data))
        if frame.close:
            conn.remote_closed = True
            conn.ready.set()  # the writer flushes what is queued, then ends the connection

    # ---------------------------------------------------------------- the outgoing stream

    async def frames(self, first: pb.RelayFrame | None = None) -> AsyncIterator[pb.RelayFrame]:
        """The frames to send: `first`, then `out` in order, a keep-alive whenever nothing went
        for keepalive_s; ends after an error frame or a None (finish)."""
        if first is not None:
            yield first
        while True:
            try:
                frame = await asyncio.wait_for(self.out.get(), self.limits.keepalive_s)
            except TimeoutError:
                frame = pb.RelayFrame(keepalive=True)
            if frame is None:
                return
            if frame.data:
                self._budget.release()
            yield frame
            if frame.error:
                return

    def finish(self, error: str = "") -> None:
        """End the outgoing stream (after an error frame when `error` is given)."""
        if error:
            self.out.put_nowait(pb.RelayFrame(error=error))
        self.out.put_nowait(None)

    def close_all(self) -> None:
        """End every connection at once (the stream is over); no close frames are sent."""
        self.closed = True
        for conn in list(self._conns.values()):
            conn.ended = True
            conn.ready.set()
            conn.drained.set()
            if conn.task is not None:
                conn.task.cancel()
        self._conns.clear()


def _ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Connect:
    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return reader, writer
    return connect
