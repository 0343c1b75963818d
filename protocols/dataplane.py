"""The bulk data plane: payloads negotiated over gRPC, delivered over one raw TCP connection.

Why: gRPC streaming copies every message and reached a quarter of a raw TCP socket's rate on
loopback here, so gRPC only negotiates and authenticates and the bytes take one raw connection.
A verified download costs ~3x a bare socket's CPU (mostly SHA-256), so the payload digest is a
SHA-256 tree (protocols.digest) whose 1 MiB leaves worker threads hash as they land, and the
finiteness count rides on the same workers. Measured figures: docs/benchmarks.md (transport).

Protocol:
    1. The serving peer answers the (authenticated, signed) gRPC call with the usual CallHeader
       (tensors, total_bytes, sha256) whose meta holds `dataplane` = "host:port" and
       `ticket` = 64 hex chars: a one-time random 32-byte ticket that names the payload.
    2. The receiver validates that header against its limits (before allocating anything),
       connects, and sends MAGIC + ticket (36 bytes).
    3. The server pops the ticket (single use, expires after `ticket_ttl`; unknown, used or
       expired tickets get the connection closed and nothing else) and sends an 8-byte
       big-endian length and then the payload, then closes. The 36 bytes must arrive within
       `handshake_timeout` (5 s); a connection that has not presented them yet is "pending".
    4. The receiver refuses a length other than the header's total_bytes, reads exactly that into
       a buffer preallocated from the header (recv_into), refuses extra bytes, and checks the
       header's payload digest (`protocols.digest`, the algorithm the header's `digest` names:
       SHA-256 over the SHA-256 of each 1 MiB leaf, each leaf hashed on a worker thread as soon
       as it has arrived; or BLAKE3, fed in order to one hashing thread in 4 MiB pieces as they
       land) before decoding, so no array is built from bytes that are unverified, short, long
       or of the wrong size. Worker threads count NaN/Inf in RAW float tensors as their bytes
       land (`FiniteScan`); that verdict too is given only after the digest matched.

Peers (peer/state_service.py StateService, peer/recovery/transfer.py) answer `State.Download`
this way when the receiver asks (StateRequest.accept_dataplane) and the state is at least
STATE_MIN_BYTES; the receiver dials the host it made the gRPC call to (not the one the header
names) with the header's port, over TLS with the swarm's mTLS leaves when its gRPC link is mTLS
(`peer_server_context`, `peer_client_context`), and falls back to the in-band stream when the
data plane cannot be reached.

Integrity comes from the SHA-256-based digest in the gRPC header, so plain TCP cannot be tampered
with undetected (a flipped, swapped, missing or extra byte changes the digest); secrecy needs
TLS: pass an `ssl.SSLContext` to both ends (the mTLS contexts of `protocols.tls`). The ticket
is a bearer secret for one payload: it is only as private as the gRPC channel that carried it.

Idle connections cannot lock fetchers out: pending connections (accepted, no valid ticket
presented yet, TLS handshake included) are bounded per remote address (`max_per_address`) and
in all (`max_connections`); when a bound is hit the *oldest pending* connection (of that
address, else of any) is closed to make room for the newcomer, so a flood of idle sockets only
ever pushes out its own kind, and a fetcher that sends its ticket at once (as `fetch` does) gets
served. Connections already serving a valid ticket are never evicted (there are at most
`max_tickets` of them).

Threads: the server lives beside grpc.aio on the caller's asyncio loop (uvloop in peers), but
the loop only accepts connections, keeps the bounds and the handshake deadlines. The bulk work
runs on a pool of `max_connections` worker threads with blocking sockets, where OpenSSL
encrypts with the GIL released: over TLS the loop never reads a byte (the connection is paused
before reading starts and a duplicate of its socket goes to a worker, which does the handshake,
reads MAGIC + ticket and sends memoryview slices of the registered payload); over plain TCP
the loop reads the 36-byte ticket and a worker sends the payload. Why: asyncio's TLS pushes
every 16 KiB record through Python on the loop's one core; 256 MiB over the swarm's mTLS, same
run, medians of 7 on 2 shared cores (load ~3.4): 242 MB/s that way against 369 MB/s from a
worker thread, and the loop was held up to 144 ms at a time (29 ms with the workers).
`close()` shuts every connection down, so a blocked handshake, read or send returns at once,
and joins the workers. The receiver runs its blocking socket in a worker thread too
(`fetch_async`), so neither end's loop is blocked by bulk I/O, and a helper thread faults its
fresh buffer's pages in ahead of the reads (`Prefault`); over TLS it decrypts from memory, reading
the socket 1 MiB at a time rather than a record at a time (`TlsOverBio`). A payload offered
with `on_done` is the owner's again once that is called (peer/state_service.py reuses its snapshot
buffers so: peer/snapshot.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import mmap
import os
import secrets
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from protocols import shoal_pb2 as pb
from protocols.codec import (
    FiniteScan,
    Limits,
    OversizedPayload,
    TruncatedPayload,
    check_header,
    decode,
)
from protocols.digest import BLAKE3, HASH_THREADS, Blake3Stream, LeafPool, stream_for
from protocols.tensor_stream import DEFAULT_CHUNK, MalformedStream, chunks
from protocols.tensor_stream import receive as receive_in_band

log = logging.getLogger("shoal.dataplane")
DATAPLANE_KEY = "dataplane"
TICKET_KEY = "ticket"
MAGIC = b"SHD1"
TICKET_BYTES = 32
LENGTH = struct.Struct(">Q")
DATAPLANE_MIN_BYTES = 8 << 20  # smaller payloads go in-band: a second connection costs more
WRITE_CHUNK = 4 << 20  # per blocking sendall (the io_timeout bounds each)
RECV_CHUNK = 1 << 20  # per recv_into; hashed while still warm in cache (measured best of 0.25-4)
HASH_THREADS_MIN_BYTES = 16 << 20  # smaller payloads: one hash thread beside the recv loop
NOTIFY_BYTES = 256 << 10  # the hashers hear of landed bytes at least this many at a time
CONNECT_TIMEOUT = 5.0
BIO_READ = 1 << 20  # bytes per socket read of a TLS receiver (TlsOverBio)
PREFAULT_MIN_BYTES = 16 << 20  # receive buffers this large get their pages faulted in ahead
PREFAULT_STEP = 8 << 20  # per madvise call of the prefault thread (checks for stop between)
MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux >= 5.14
_CONTEXT_LOCK = threading.Lock()  # OpenSSL contexts are not safe to change while SSL_new reads


class DataPlaneError(ConnectionError):
    """The data plane could not deliver a payload (see the message for what to do)."""


class TicketRefused(DataPlaneError):
    """The serving peer closed the connection on our ticket: unknown, used or expired."""


class TooManyTickets(DataPlaneError):
    """The server already holds `max_tickets` unexpired payloads; retry after some complete."""


def _load_leaf(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load a PEM leaf and key into `ctx` (ssl reads only files: a private temporary one)."""
    with tempfile.TemporaryDirectory(prefix="shoal-dp-") as tmp:
        path = os.path.join(tmp, "leaf.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem + b"\n" + key_pem)
        ctx.load_cert_chain(path)


def peer_server_context(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """The data plane's server side of a peer's mTLS: its leaf, client leaves of the swarm CA
    required (as protocols.tls.PeerServerTls for gRPC). `renew_leaf` swaps the leaf in place."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem.decode())
    _load_leaf(ctx, cert_pem, key_pem)
    return ctx


def renew_leaf(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """A renewed leaf for later handshakes of a server context (a re-join renews it). Thread-safe
    against the server's workers, which copy the leaf from the context under the same lock."""
    with _CONTEXT_LOCK:
        _load_leaf(ctx, cert_pem, key_pem)


@functools.lru_cache(maxsize=8)
def peer_client_context(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """The data plane's client side of a peer's mTLS: the swarm CA the only root, this peer's
    leaf its client certificate; dial with server_hostname = the callee's peer id (its leaf
    names it), as protocols.tls.peer_channel does for gRPC."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_pem.decode())
    _load_leaf(ctx, cert_pem, key_pem)
    return ctx


@dataclass
class _Offer:
    view: memoryview
    expires_at: float
    on_done: Callable[[], None] | None = None

    def done(self) -> None:
        """Nothing reads `view` any more (sent, failed, expired or forgotten): tell the owner,
        once. May run with the server's lock held, on the loop or a worker thread: the callback
        must be quick and must not call into the server."""
        callback, self.on_done = self.on_done, None
        if callback is not None:
            try:
                callback()
            except Exception:  # the owner's bug: logged, the server keeps serving
                log.exception("data plane: an offer's on_done callback failed")


@dataclass
class _Pending:
    """A connection that has not presented its ticket yet; `stop` closes it (on the loop, the
    server's lock held), so that whatever waits on it (a read, a TLS handshake) ends at once."""

    address: str
    stop: Callable[[], None]


def _shutdown(control: socket.socket) -> None:
    """End a connection whose worker thread may be blocked on it (handshake, read or send):
    shutting down a duplicate of its descriptor wakes the worker without closing the descriptor
    it uses. Only while the connection is registered, under the server's lock (the worker closes
    `control` when it unregisters itself)."""
    with contextlib.suppress(OSError):
        control.shutdown(socket.SHUT_RDWR)


class _HandOff(asyncio.Protocol):
    """The TLS listener's protocol: the loop accepts the connection and never reads from it (it
    is paused before reading starts); a worker thread takes it over (`_serve_tls`)."""

    def __init__(self, server: DataPlaneServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]  # (uvloop's: no subclass)
        self.server._hand_off(transport)  # type: ignore[arg-type]


class DataPlaneServer:
    """Serves registered payloads to whoever presents their one-time ticket.

    Args:
        host, port: where to listen (port 0 picks a free one; see `address` after `start`).
        advertise_host: the host receivers should dial; required when `host` is a wildcard.
        ssl_context: a server-side context for TLS (None: plain TCP, integrity still via the
            payload digest). Read at each handshake: `renew_leaf` on it affects new connections.
        ticket_ttl: seconds a ticket stays valid.
        max_tickets: bound on outstanding payloads (each keeps its buffer alive until served).
        io_timeout: seconds a send may stall before the transfer is dropped.
        handshake_timeout: seconds from accept to the MAGIC + ticket, TLS handshake included
            (then closed, at whatever stage it is).
        max_connections: pending plus serving connections at once (and the worker threads);
            past it the oldest pending connection is closed for the newcomer (or the newcomer,
            if none is pending).
        max_per_address: pending connections from one remote address; past it that address's
            oldest pending connection is closed.
    `offer`, `respond` and `outstanding` are thread-safe; `start` and `close` run on the serving
    loop. The loop accepts connections, keeps the bounds and the handshake deadlines and (plain
    TCP only) reads the 36-byte ticket; TLS handshakes, TLS ticket reads and every payload's
    sends run on worker threads (blocking sockets; OpenSSL encrypts with the GIL released).
    Counters (any thread may read them): `served` payloads; `refused` connections
    that got no payload for want of a valid ticket (unknown, used, expired, not MAGIC + ticket,
    closed before it, a failed TLS handshake) or of room; `failed` transfers (the receiver went
    away, or stalled past `io_timeout`); `evicted` pending connections closed to make room;
    `timed_out` connections that had not presented a ticket within `handshake_timeout`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ticket_ttl: float = 60.0,
        max_tickets: int = 64,
        io_timeout: float = 30.0,
        handshake_timeout: float = 5.0,
        max_connections: int = 64,
        max_per_address: int = 8,
    ) -> None:
        if advertise_host is None and host in ("", "0.0.0.0", "::"):
            raise ValueError(f"listening on wildcard {host!r}: pass advertise_host")
        self.host, self.port = host, port
        self.advertise_host = advertise_host or host
        self.ssl_context = ssl_context
        self.ticket_ttl, self.max_tickets, self.io_timeout = ticket_ttl, max_tickets, io_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections, self.max_per_address = max_connections, max_per_address
        self.served = self.refused = self.failed = self.evicted = self.timed_out = 0
        # The lock guards the offers, both registries and the counters: worker threads and the
        # loop both change them.
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}  # oldest first
        self._serving: dict[int, socket.socket] = {}  # control duplicates of their sockets
        self._next_id = 0
        self._offers: dict[bytes, _Offer] = {}
        self._closing = False
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: set[concurrent.futures.Future] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max(1, self.max_connections), thread_name_prefix="dataplane")
        if self.ssl_context is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        else:
            self._server = await self._loop.create_server(lambda: _HandOff(self), self.host,
                                                          self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, forget every offer, end every connection (pending or mid-transfer:
        a blocked handshake, read or send returns at once) and wait for the worker threads to
        finish (the loop keeps serving meanwhile)."""
        if self._server is not None:
            self._server.close()  # no new connections
        with self._lock:
            self._closing = True
            forgotten = list(self._offers.values())
            self._offers.clear()
            for pending in self._pending.values():
                pending.stop()
            self._pending.clear()  # their owners see it and leave uncounted
            for control in self._serving.values():
                _shutdown(control)
            jobs = list(self._jobs)
        for offer in forgotten:
            offer.done()
        if self._server is not None:
            await self._server.wait_closed()
        if self._workers is None:
            return
        late = set()
        if jobs:
            _, late = await asyncio.wait([asyncio.wrap_future(job) for job in jobs],
                                         timeout=self.io_timeout)
        if late:  # cannot happen while every blocking call is on a shut-down socket
            log.error("data plane: %d worker threads still busy after close", len(late))
            self._workers.shutdown(wait=False)
        else:
            await asyncio.to_thread(self._workers.shutdown, wait=True)  # idle: they end now

    @property
    def address(self) -> str:
        host = f"[{self.advertise_host}]" if ":" in self.advertise_host else self.advertise_host
        return f"{host}:{self.port}"

    @property
    def outstanding(self) -> int:
        with self._lock:
            self._sweep(time.monotonic())
            return len(self._offers)

    def offer(self, header: pb.CallHeader, payload: bytes | bytearray | memoryview,
              ttl: float | None = None, on_done: Callable[[], None] | None = None
              ) -> pb.CallHeader:
        """Register `payload` under a new ticket; return a copy of `header` that points at it.

        The payload is served as it is at send time: do not mutate it (the receiver's digest
        check would refuse it) until `on_done` is called: exactly once, when nothing reads the
        payload any more (its send ended, served or failed; its ticket expired, unfetched, or
        was refused as expired; the server closed). `on_done` may run on the loop or a worker
        thread, with the server's lock held: it must be quick and not call into the server.
        Raises TooManyTickets when `max_tickets` are outstanding (then `on_done` is not called:
        the payload was never registered).
        """
        if self._server is None:
            raise DataPlaneError("DataPlaneServer.offer before start()")
        view = memoryview(payload).cast("B")
        if len(view) != header.total_bytes:
            raise ValueError(f"payload has {len(view)} bytes, header declares "
                             f"{header.total_bytes}")
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            if len(self._offers) >= self.max_tickets:
                raise TooManyTickets(f"{len(self._offers)} payloads are waiting to be fetched "
                                     f"(max_tickets={self.max_tickets})")
            ttl = self.ticket_ttl if ttl is None else ttl
            self._offers[ticket] = _Offer(view, now + ttl, on_done)
        if on_done is not None and self._loop is not None and not self._loop.is_closed():
            # an unfetched ticket gives its payload back when it expires, not at the next offer
            self._loop.call_soon_threadsafe(self._loop.call_later, ttl, self._expire_offers)
        answer = pb.CallHeader()
        answer.CopyFrom(header)
        answer.meta[DATAPLANE_KEY] = self.address
        answer.meta[TICKET_KEY] = ticket.hex()
        return answer

    def respond(self, header: pb.CallHeader, payload: bytes | bytearray | memoryview, *,
                min_bytes: int = DATAPLANE_MIN_BYTES, chunk_size: int = DEFAULT_CHUNK
                ) -> Iterator[pb.TensorChunk]:
        """The chunks a servicer yields: a data-plane pointer for bulk payloads, else in-band.
        Raises TooManyTickets (see `offer`)."""
        if header.total_bytes >= min_bytes:
            return iter([pb.TensorChunk(header=self.offer(header, payload))])
        return chunks(header, payload, chunk_size)

    def _sweep(self, now: float) -> None:
        """Drop expired offers (lock held)."""
        for ticket in [t for t, o in self._offers.items() if o.expires_at <= now]:
            self._offers.pop(ticket).done()

    def _expire_offers(self) -> None:
        """On the loop, when an offer's ticket may have expired."""
        with self._lock:
            self._sweep(time.monotonic())

    def _take(self, ticket: bytes) -> _Offer | None:
        """Pop `ticket`'s offer if it has not expired (lock held). The caller sends it and then
        calls its `done` (`_send`)."""
        offer = self._offers.pop(ticket, None)
        if offer is not None and offer.expires_at <= time.monotonic():
            offer.done()
            return None
        return offer

    # -------------------------------------------------------------- admission (on the loop)

    def _admit(self, pending: _Pending) -> int | None:
        """Register a new pending connection, making room as the bounds say; its key, or None:
        refused (counted)."""
        with self._lock:
            if sum(1 for p in self._pending.values() if p.address == pending.address) >= \
                    self.max_per_address:
                self._evict_oldest(pending.address)
            if self._closing or (len(self._pending) + len(self._serving) >= self.max_connections
                                 and not self._evict_oldest(None)):
                self.refused += 1
                return None
            key, self._next_id = self._next_id, self._next_id + 1
            self._pending[key] = pending
            return key

    def _evict_oldest(self, address: str | None) -> bool:
        """Close the oldest pending connection (from `address`, or any when None); lock held."""
        for key, pending in self._pending.items():
            if address is None or pending.address == address:
                del self._pending[key]
                self.evicted += 1
                pending.stop()  # its read or handshake ends at once; its owner cleans up
                return True
        return False

    def _expire(self, key: int) -> None:
        """Connection `key`'s handshake deadline (TLS): closed if it is still pending."""
        with self._lock:
            pending = self._pending.pop(key, None)
            if pending is not None:
                self.timed_out += 1
                pending.stop()

    def _submit(self, fn: Callable[..., None], *args: object) -> concurrent.futures.Future:
        assert self._workers is not None
        job = self._workers.submit(fn, *args)
        with self._lock:
            self._jobs.add(job)
        job.add_done_callback(self._forget_job)
        return job

    def _forget_job(self, job: concurrent.futures.Future) -> None:
        with self._lock:
            self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None:  # a bug, not a peer's doing
            log.error("data plane worker failed", exc_info=job.exception())

    # -------------------------------------------------------------- TLS: a worker per connection

    def _hand_off(self, transport: asyncio.Transport) -> None:
        """A TLS connection the loop accepted (and never read from): admit it, give it its
        deadline, and hand a blocking duplicate of its socket to a worker thread; the loop
        drops its own descriptor (abort closes it without a FIN: the duplicates keep the
        connection)."""
        remote = transport.get_extra_info("peername")
        address = str(remote[0]) if isinstance(remote, tuple) and remote else "?"
        try:
            sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
            control = sock.dup()
        except OSError:
            transport.abort()
            return
        transport.abort()
        key = self._admit(_Pending(address, functools.partial(_shutdown, control)))
        if key is None:
            sock.close()
            control.close()
            return
        assert self._loop is not None
        self._loop.call_later(self.handshake_timeout, self._expire, key)
        self._submit(self._serve_tls, key, sock, control)

    def _serve_tls(self, key: int, sock: socket.socket, control: socket.socket) -> None:
        """On a worker thread: the TLS handshake, MAGIC + ticket, then the payload. Whoever takes
        the connection out of the pending registry first (this thread, an eviction or the
        deadline) counts it."""
        assert self.ssl_context is not None
        hello = bytearray(len(MAGIC) + TICKET_BYTES)
        try:
            sock.settimeout(self.handshake_timeout)  # the loop's deadline is the hard bound
            with _CONTEXT_LOCK:  # the leaf is copied from the context here (renew_leaf)
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            sock.do_handshake()
            complete = _recv_exact(sock, memoryview(hello)) == len(hello)
            error: OSError | None = None
        except OSError as exc:
            complete, error = False, exc
        try:
            with self._lock:
                if self._pending.pop(key, None) is None:
                    return  # evicted or past its deadline meanwhile: counted there
                offer = self._take(bytes(hello[len(MAGIC):])) if complete and \
                    hello.startswith(MAGIC) else None
                if offer is None:
                    if isinstance(error, TimeoutError):
                        self.timed_out += 1
                    else:
                        self.refused += 1
                    return
                self._serving[key] = control
            self._send(sock, offer)
        finally:
            with self._lock:
                self._pending.pop(key, None)
                self._serving.pop(key, None)
                control.close()
            sock.close()

    def _send(self, sock: socket.socket, offer: _Offer) -> None:
        """On a worker thread: the length, then the payload; counts served or failed, then
        gives the payload back (`offer.done`)."""
        try:
            sock.settimeout(self.io_timeout)  # per send: a stalled receiver ends the transfer
            _sendall(sock, LENGTH.pack(len(offer.view)), offer.view)
        except OSError:
            with self._lock:
                self.failed += 1
        else:
            with self._lock:
                self.served += 1
        finally:
            offer.done()  # sendall returned: the kernel or OpenSSL holds copies, not the view

    # -------------------------------------------------------------- plain TCP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plain TCP connection: the loop reads its 36-byte ticket (within the handshake
        deadline) and a worker thread sends the payload with blocking sends on a duplicate of
        the socket (the transport paused meanwhile), so the kernel is fed without the loop
        waking for every few MiB."""
        remote = writer.get_extra_info("peername")
        address = str(remote[0]) if isinstance(remote, tuple) and remote else "?"
        key = self._admit(_Pending(address, writer.transport.abort))
        try:
            if key is None:
                return
            try:
                hello = await asyncio.wait_for(reader.readexactly(len(MAGIC) + TICKET_BYTES),
                                               self.handshake_timeout)
            except TimeoutError:
                with self._lock:
                    if self._pending.pop(key, None) is not None:
                        self.timed_out += 1
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                with self._lock:
                    if self._pending.pop(key, None) is not None:
                        self.refused += 1
                return
            with self._lock:
                if self._pending.pop(key, None) is None:
                    return  # evicted meanwhile: counted there
                offer = self._take(hello[len(MAGIC):]) if hello.startswith(MAGIC) else None
                if offer is None:
                    self.refused += 1
                    return
            writer.transport.pause_reading()
            try:
                sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
                control = sock.dup()
            except OSError:
                with self._lock:
                    self.failed += 1
                offer.done()
                return
            with self._lock:
                self._serving[key] = control
            await asyncio.wrap_future(self._submit(self._send_plain, key, sock, control, offer))
        finally:
            if key is not None:
                with self._lock:
                    self._pending.pop(key, None)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self.io_timeout)

    def _send_plain(self, key: int, sock: socket.socket, control: socket.socket,
                    offer: _Offer) -> None:
        try:
            self._send(sock, offer)
        finally:
            with self._lock:
                self._serving.pop(key, None)
                control.close()
            sock.close()


def _sendall(sock: socket.socket, prefix: bytes, view: memoryview) -> None:
    """`prefix`, then `view` in WRITE_CHUNK pieces (the socket's timeout bounds each piece; one
    sendall's timeout would bound all of it)."""
    sock.sendall(prefix)
    for start in range(0, len(view), WRITE_CHUNK):
        sock.sendall(view[start: start + WRITE_CHUNK])


# ------------------------------------------------------------------ receiving side


def is_dataplane(header: pb.CallHeader) -> bool:
    """Whether this header points at the data plane rather than carrying its payload in-band."""
    return DATAPLANE_KEY in header.meta


def endpoint(header: pb.CallHeader) -> tuple[str, int, bytes]:
    """(host, port, ticket) from a data-plane header; MalformedStream when unusable."""
    address = header.meta.get(DATAPLANE_KEY, "")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ticket = bytes.fromhex(header.meta.get(TICKET_KEY, ""))
        port_number = int(port)
    except ValueError:
        ticket, port_number = b"", -1
    if not host or not 0 < port_number < 65536 or len(ticket) != TICKET_BYTES:
        raise MalformedStream(f"data plane pointer is unusable: dataplane={address!r}, "
                              f"ticket of {len(ticket)} bytes")
    return host, port_number, ticket


def _recv_exact(sock: socket.socket | TlsOverBio, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


def fetch(
    header: pb.CallHeader,
    limits: Limits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 30.0,
    expect_host: str | None = None,
    dial_host: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> dict[str, np.ndarray]:
    """Fetch and decode the payload a data-plane header points at (blocking).

    Args:
        header: the CallHeader from the gRPC answer (meta `dataplane` and `ticket`).
        limits: the receiver's limits; checked against the header before connecting.
        ssl_context: a client-side context when the server uses TLS.
        server_hostname: the name to verify the server certificate against (default: its host).
        timeout: seconds for the connection and for each read.
        expect_host: refuse to dial any other host than this (e.g. the gRPC peer's address).
        dial_host: dial this host with the header's port, whatever host the header names (the
            host the gRPC call went to: a peer need not know the address others reach it at).
        connect_timeout: seconds to connect (then `timeout` for each read).
    Raises TicketRefused, DataPlaneError, or the CodecError that names a bad payload.
    """
    check_header(header, limits)
    host, port, ticket = endpoint(header)
    if dial_host is not None:
        host = dial_host
    if expect_host is not None and host != expect_host:
        raise DataPlaneError(f"header points the data plane at {host}, expected {expect_host}")
    where, total = f"{host}:{port}", header.total_bytes
    sock = _open(host, port, ticket, ssl_context, server_hostname, timeout,
                 min(timeout, connect_timeout))
    with sock:
        prefix = bytearray(LENGTH.size)
        try:
            got = _recv_exact(sock, memoryview(prefix))
        except OSError as exc:
            raise DataPlaneError(f"data plane at {where} did not answer: {exc}") from exc
        if got < LENGTH.size:
            raise TicketRefused(f"the data plane at {where} closed the connection unanswered: the "
                                "ticket is unknown, used or expired (or the server wants TLS); "
                                "ask the peer again")
        (length,) = LENGTH.unpack(prefix)
        if length != total:
            error = OversizedPayload if length > total else TruncatedPayload
            raise error(f"data plane at {where} announces {length} bytes, header declares {total}")
        buffer = np.empty(total, np.uint8)  # untouched pages: no memset before recv_into
        view = memoryview(buffer)
        pool = _pool_for(view, header.digest)
        scan = FiniteScan(header, limits, view, pool.submit)  # NaN/Inf counted as bytes land
        pool.watch(scan.filled)
        with Prefault(buffer):  # its pages faulted in on another core, ahead of recv_into
            digest = _fill(sock, view, where, pool)
        with contextlib.suppress(OSError):
            if sock.recv(1):
                raise OversizedPayload(f"data plane at {where} sent more than the {total} bytes "
                                       "declared")
    return decode(header, buffer, limits, computed_sha256=digest, non_finite=scan.counts())


class Prefault:
    """Faults a fresh receive buffer's pages in on a helper thread, ahead of the recv loop
    (madvise MADV_POPULATE_WRITE, Linux >= 5.14: page tables made writable, contents untouched,
    so racing the recv loop's writes is harmless; elsewhere, or where refused, it does nothing).

    Why: recv_into into untouched pages faults each one in inside the kernel's copy, on the
    receiving thread. On this project's VMs freed memory goes back to the host within seconds
    and faulting it in again is most of a receive: a 256 MiB copy into a fresh buffer after
    2.5 s idle took 0.37-0.61 s alone and 0.14-0.25 s with this thread (3 each, load ~1)."""

    def __init__(self, buffer: np.ndarray) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        madvise = _madvise()
        if madvise is not None and buffer.nbytes >= PREFAULT_MIN_BYTES:
            self._thread = threading.Thread(target=self._run, args=(madvise, buffer),
                                            name="dataplane-prefault", daemon=True)

    def __enter__(self) -> Prefault:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, madvise: Callable[[int, int, int], int], buffer: np.ndarray) -> None:
        start = buffer.ctypes.data
        at, end = start - start % mmap.PAGESIZE, start + buffer.nbytes
        while at < end and not self._stop.is_set():
            step = min(PREFAULT_STEP, end - at)
            if madvise(at, step, MADV_POPULATE_WRITE) != 0:
                return  # an older kernel (EINVAL): the recv loop faults them in as before
            at += step


@functools.lru_cache(maxsize=1)
def _madvise() -> Callable[[int, int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


class TlsOverBio:
    """The receiving (client) end of a data-plane TLS connection, whose records OpenSSL
    decrypts from memory (an ssl.MemoryBIO pair) while the socket is read BIO_READ bytes at a
    time: the socket's methods `fetch` uses (sendall, recv_into, recv, close).

    Why: through ssl.SSLSocket every 16 KiB record costs its own reads of the socket (its
    header, then its body, with a poll between when it has not all arrived), so the receiving
    thread spent more time in the kernel than decrypting. The same bytes, certificates and
    checks (the handshake verifies the server's leaf against `server_hostname`). Measured: 256
    MiB over the swarm's mTLS on loopback, receiving thread's CPU, medians of 8 taking turns
    (load ~4): 0.226 s with SSLSocket, 0.184 s this way; 1 MiB reads beat 64 and 256 KiB.
    The end of the stream, with or without close_notify, reads as 0 bytes (SSLSocket's
    suppress_ragged_eofs): `fetch` then refuses a short payload by its length."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str) -> None:
        self._sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._raw = bytearray(BIO_READ)
        self._eof = False
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._pull():
                        raise ConnectionResetError("the server closed during the handshake"
                                                   ) from None
            self._flush()
        except BaseException:
            sock.close()
            raise

    def _flush(self) -> None:
        if self._out.pending:
            self._sock.sendall(self._out.read())

    def _pull(self) -> bool:
        n = self._sock.recv_into(self._raw)
        if n == 0:
            self._eof = True
            return False
        self._in.write(memoryview(self._raw)[:n])
        return True

    def sendall(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    def recv_into(self, view: memoryview | bytearray, nbytes: int = 0) -> int:
        """Up to `nbytes` (0: len(view)) decrypted bytes into `view`; 0 at the end of the
        stream (close_notify or the connection's end, as SSLSocket's ragged-EOF rule)."""
        want = nbytes or len(view)
        while True:
            try:
                return self._tls.read(want, view)
            except ssl.SSLWantReadError:
                if self._eof or not self._pull():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0

    def recv(self, n: int) -> bytes:
        buffer = bytearray(n)
        return bytes(buffer[: self.recv_into(buffer)])

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> TlsOverBio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(host: str, port: int, ticket: bytes, ssl_context: ssl.SSLContext | None,
          server_hostname: str | None, timeout: float, connect_timeout: float | None = None
          ) -> socket.socket | TlsOverBio:
    """Connect (TLS if asked) and present the ticket."""
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout or timeout)
    except OSError as exc:
        raise DataPlaneError(f"cannot reach the data plane at {host}:{port}: {exc}") from exc
    conn: socket.socket | TlsOverBio = sock
    try:
        sock.settimeout(timeout)
        if ssl_context is not None:
            conn = TlsOverBio(sock, ssl_context, server_hostname or host)
        conn.sendall(MAGIC + ticket)
    except OSError as exc:
        sock.close()
        raise DataPlaneError(f"handshake with the data plane at {host}:{port} failed: {exc}"
                             ) from exc
    return conn


def recv_into_hashing(sock: socket.socket, view: memoryview, where: str, alg: str = ""
                      ) -> bytes:
    """Fill `view` from `sock` and return its payload digest under `alg` (protocols.digest; ""
    is the SHA-256 tree, each 1 MiB leaf hashed on a worker thread as soon as it has arrived;
    BLAKE3 is hashed in order on one thread as bytes land), so hashing overlaps the network.
    Raises TruncatedPayload at EOF, DataPlaneError on socket errors."""
    return _fill(sock, view, where, _pool_for(view, alg))


def _pool_for(view: memoryview, alg: str = "") -> LeafPool | Blake3Stream:
    if alg == BLAKE3:  # one hashing thread, one for the finiteness scan
        return Blake3Stream(view, 1)
    return stream_for(alg, view, HASH_THREADS if len(view) >= HASH_THREADS_MIN_BYTES else 1)


def _fill(sock: socket.socket | TlsOverBio, view: memoryview, where: str,
          pool: LeafPool | Blake3Stream) -> bytes:
    """The receive loop of `recv_into_hashing`, telling `pool` (and its watchers) what landed."""
    total, got, told = len(view), 0, 0
    try:
        while got < total:
            n = sock.recv_into(view[got: min(total, got + RECV_CHUNK)])
            if n == 0:
                raise TruncatedPayload(f"data plane at {where} closed after {got} of {total} "
                                       "bytes")
            got += n
            if got - told >= NOTIFY_BYTES or got == total:  # TLS reads come 16 KiB at a time
                pool.filled(got)
                told = got
        return pool.digest()
    except OSError as exc:
        raise DataPlaneError(f"data plane at {where} failed after {got} of {total} bytes: "
                             f"{exc}") from exc
    finally:
        pool.close()  # stops the worker threads also on error


async def fetch_async(header: pb.CallHeader, limits: Limits, **kwargs: object
                      ) -> dict[str, np.ndarray]:
    """`fetch` on a worker thread, so the event loop keeps serving while bulk bytes arrive."""
    return await asyncio.to_thread(fetch, header, limits, **kwargs)  # type: ignore[arg-type]


async def receive(
    chunk_iter: AsyncIterable[pb.TensorChunk], limits: Limits, **fetch_kwargs: object
) -> tuple[pb.CallHeader, dict[str, np.ndarray]]:
    """Receive one tensor call whichever way the sender chose: in-band chunks, or a header that
    points at the data plane (then the stream must end after it). `fetch_kwargs` go to `fetch`."""
    stream = aiter(chunk_iter)
    first = await anext(stream, None)
    if first is not None and first.WhichOneof("part") == "header" and is_dataplane(first.header):
        if await anext(stream, None) is not None:
            raise MalformedStream("data arrived in-band after a data-plane header")
        return first.header, await fetch_async(first.header, limits, **fetch_kwargs)

    async def replay() -> AsyncIterator[pb.TensorChunk]:
        if first is not None:
            yield first
        async for chunk in stream:
            yield chunk

    return await receive_in_band(replay(), limits)


__all__ = [
    "DATAPLANE_MIN_BYTES", "DataPlaneError", "DataPlaneServer", "Prefault", "TicketRefused",
    "TooManyTickets",
    "endpoint", "fetch", "fetch_async", "is_dataplane", "peer_client_context",
    "peer_server_context", "receive", "recv_into_hashing", "renew_leaf",
]
