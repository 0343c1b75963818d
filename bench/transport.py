"""Transport bench: how fast a bulk tensor (a state download) moves between two processes.

    python -m bench.transport [--mib 256] [--repeats 5] [--netns-mib 64] [--rate-mbit 100]

Loopback, server and client in separate processes (spawn, never fork after gRPC):
  (p)  THE PRODUCT'S state download, end to end as peers make it: the client calls
       peer/recovery/transfer.py `receive_state` (what `fetch_state` calls for a join,
       re-download or rebuild): a signed State.Download over protocols.tls.peer_channel (mTLS
       with swarm-CA leaves, the callee's peer id checked, SHOAL_TLS_ON_LOOPBACK=1) to the real
       peer/services.py `serve()` (AuthInterceptor, StateService) beside a DataPlaneServer
       configured as peer/daemon.py does (the same mTLS leaf); StateService snapshots and
       encodes the state with a BLAKE3 digest and answers with a data-plane ticket; the payload
       comes over TLS on one TCP connection, its BLAKE3 checked as it lands, then decoded with
       the finiteness check. Timed per call, as the receiver sees it: the sender's snapshot and
       encode are inside (the bench serves a fixed "weights" tensor, so no optimizer step or
       model load is); loading into a StageHost and the state-hash comparison with the
       coordinator's attestation that `fetch_state` does next are not (they are the same
       whatever the transport). This row is the numerator of the last line.
  (p') the same over a plaintext link (a --plaintext swarm, or peers on one machine).
  (a)  the data plane alone: a grpc.aio State.Download answered with a data-plane header, then the
       payload over raw TCP, its digest checked (SHA-256 tree, protocols.digest: leaves hashed on
       worker threads as they arrive) and decoded with the finiteness check (what a joining peer
       does);
  (a') the same, but the receiver skips the digest and decoding: a diagnostic that separates
       the transport from the hash;
  (b)  a raw TCP socket: connect, read the payload into a fresh buffer (the baseline);
  (b') the raw socket plus the receiver's digest, hashed as bytes arrive exactly as (a) does:
       the least a verified download has to do, so (a)/(b') is the cost of the rest of the
       project's machinery (gRPC call, ticket, decode, finiteness);
  (b'') the same with BLAKE3 hashed as (p) does it;
  (c)  synchronous gRPC streaming of ~4 MiB TensorChunks, for reference.
  (d)  what a peer does today (peer/state_service.py StateService.Download,
       peer/recovery/transfer.py): a grpc.aio stream of 2 MiB TensorChunks
       (peer/pipeline/wire.py encode_chunks / receive, digest and finiteness checked), over
       protocols.tls.peer_channel, plaintext;
  (d') the same over mTLS: swarm-CA leaves (P-256) on both ends, the callee's peer id checked,
       exactly the channel peers use between machines. (d)/(d') is what TLS costs.
Paths take turns within each repeat; each row is the median of --repeats runs. Then, as root,
the project's path across two network namespaces joined by a veth pair whose server side is
capped by tc tbf, as % of the cap, and (p), (d) and (d') across the same link. The last line is
`transport: grpc/raw = R`, R = (p) / (b) measured in this run (target R >= 0.6; R rounded
down, bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np

from bench.report import Target, machine, targets_line
from protocols import codec, dataplane, digest, tensor_stream, tls
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pb_grpc

MIB = 1 << 20
CLONE_NEWNET = 0x40000000
PRODUCT = "(p) PRODUCT: peer State.Download, mTLS data plane, BLAKE3"
PRODUCT_PLAIN = "(p') product over a plaintext link"
PROJECT = "(a) data plane alone: gRPC + raw TCP, SHA-256 tree checked"
RAW = "(b) raw TCP socket"
STREAM = "(d) peers' path: grpc.aio wire stream, peer_channel, plaintext"
STREAM_TLS = "(d') peers' path over mTLS (swarm-CA leaves, peer_channel)"
TARGET = Target("grpc/raw", 0.6)
STATE_DATAPLANE_MIN_BYTES = 8 << 20  # peer/state_service.py's (checked in main): smaller go in-band


# ------------------------------------------------------------------ network namespace helpers


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def enter_netns(name: str) -> None:
    """Move this (single-threaded, freshly spawned) process into network namespace `name`."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


@contextlib.contextmanager
def capped_link(rate_mbit: float, mtu: int = 1500, tag: str = ""
                ) -> Iterator[tuple[str, str, str, str]]:
    """Two namespaces joined by a veth pair (MTU `mtu`); side a's egress capped by tbf.

    Yields (ns_a, ns_b, ip_a, ip_b). Nothing is created in the host namespace; both
    namespaces (and so the veth pair) are deleted on exit, error, SIGTERM or Ctrl-C.
    """
    remove_stale_netns()
    tag = tag or str(os.getpid())
    ns_a, ns_b = f"shoal-tb-{tag}-a", f"shoal-tb-{tag}-b"
    ip_a, ip_b = "198.18.0.1", "198.18.0.2"
    made: list[str] = []
    previous = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", "veth-a", "netns", ns_a, "type", "veth", "peer", "name", "veth-b",
            "netns", ns_b)
        for ns, dev, addr in ((ns_a, "veth-a", ip_a), (ns_b, "veth-b", ip_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # burst must hold a GSO super-packet (64 KiB); latency bounds the queue.
        subprocess.run(["ip", "netns", "exec", ns_a, "tc", "qdisc", "add", "dev", "veth-a",
                        "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", "128kb",
                        "latency", "50ms"], check=True, capture_output=True)
        yield ns_a, ns_b, ip_a, ip_b
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def remove_stale_netns() -> None:
    """Delete namespaces left by a bench run that was SIGKILLed (its pid is in the name)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(r"^(shoal-tb-(\d+)-[ab])\b", listing, re.MULTILINE):
        if not os.path.exists(f"/proc/{name[1]}"):
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)


# ------------------------------------------------------------------ the serving process


class _InBandState(pb_grpc.StateServicer):
    """Sync gRPC reference: the whole payload in-band in ~4 MiB chunks."""

    def __init__(self, header: pb.CallHeader, payload: bytes) -> None:
        self.header, self.payload = header, payload

    def Download(self, request, context):
        yield from tensor_stream.chunks(self.header, self.payload, tensor_stream.MAX_CHUNK)


class _DataPlaneState(pb_grpc.StateServicer):
    """The project's path: answer with a data-plane header (always, whatever the size)."""

    def __init__(self, plane: dataplane.DataPlaneServer, header: pb.CallHeader,
                 payload: bytes) -> None:
        self.plane, self.header, self.payload = plane, header, payload

    async def Download(self, request, context):
        for chunk in self.plane.respond(self.header, self.payload, min_bytes=0):
            yield chunk


class _WireState(pb_grpc.StateServicer):
    """(d), (d'): the peer's State.Download: wire.encode_chunks of the arrays, as it sends them."""

    def __init__(self, header: pb.CallHeader, arrays: dict[str, np.ndarray]) -> None:
        self.header, self.arrays = header, arrays

    async def Download(self, request, context):
        from peer.pipeline import wire

        for chunk in wire.encode_chunks(self.header, self.arrays, pb.RAW):
            yield chunk


SERVER_ID, CLIENT_ID = "00000000000000aa", "00000000000000bb"  # peer ids of the TLS rows
SWARM = "bench-transport"
# Ed25519 seeds of the product rows' coordinator and downloading peer (both processes derive them)
COORDINATOR_SEED, RECEIVER_SEED = bytes(range(32)), bytes(range(32, 64))


def identity_of(seed: bytes):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocols.identity import Identity

    return Identity(Ed25519PrivateKey.from_private_bytes(seed))


def bench_certificates(client_id: str = CLIENT_ID) -> tuple[tls.PeerTls, tls.PeerTls]:
    """(server, client) TLS material from a swarm CA, as a coordinator issues it at join."""
    ca, ca_key = tls.make_coordinator_ca(os.urandom(32))
    out = []
    for peer_id in (SERVER_ID, client_id):
        key = tls.new_tls_key()
        out.append(tls.PeerTls(ca, tls.sign_csr(ca, ca_key, tls.csr_for_key(peer_id, key),
                                                 peer_id, days=1), key))
    return out[0], out[1]


class _Host:
    """What peer/state_service.py StateService uses of a StageHost: one stage holding `arrays`."""

    def __init__(self, arrays: dict[str, np.ndarray], stage: int = 1) -> None:
        self.arrays, self.stage, self.step = arrays, stage, 0

    async def run(self, fn: Callable, *args: object) -> object:
        return fn(*args)

    def state_arrays(self, include_optimizer: bool) -> dict[str, np.ndarray]:
        return self.arrays

    def state_hash(self) -> str:
        return "bench"  # a claim only; receive_state does not check it (fetch_state does)

    def agreed_arrays(self) -> tuple[dict[str, np.ndarray], str]:
        return self.arrays, self.state_hash()


class _Client:
    """What serve() and the services use of a peer's CoordinatorClient."""

    def __init__(self, coordinator_public_key: bytes, leaf: tls.PeerTls | None) -> None:
        self.coordinator_public_key, self.swarm_id, self._leaf = (coordinator_public_key, SWARM,
                                                                 leaf)

    def tls(self) -> tls.PeerTls | None:
        return self._leaf


class ProductPeer:
    """A serving peer as peer/daemon.py sets one up: peer.services.serve() (AuthInterceptor,
    StateService; mTLS with `leaf` unless None) and a DataPlaneServer with the same leaf, holding
    stage 1 with `arrays` (or `host`, a StageHost). The ServiceContext StateService reads,
    nothing else. Tests use it too (tests/peer/test_state_dataplane.py)."""

    def __init__(self, arrays: dict[str, np.ndarray], leaf: tls.PeerTls | None,
                 coordinator_public_key: bytes, host: object = None) -> None:
        from peer.pipeline import wire
        from protocols.runspec import RunSpec

        self.peer_id, self.leaf = SERVER_ID, leaf
        self.host = _Host(arrays) if host is None else host
        self.state, self.draining, self.queue = "training", False, 0
        self.mode, self.rounds, self.view = None, None, None
        self.spec = RunSpec()
        self.counter = wire.ByteCounter()
        self.client = _Client(coordinator_public_key, leaf)
        self.dataplane: dataplane.DataPlaneServer | None = None
        self.server: grpc.aio.Server | None = None
        self.step_lock = asyncio.Lock()

    async def refresh_view(self, retry_s: float = 30.0) -> None:
        return None

    async def start(self, host: str = "127.0.0.1") -> int:
        """Start both servers (the running loop); returns the gRPC port."""
        from peer.services import serve

        credentials, context = None, None
        if self.leaf is not None:
            server_tls = tls.PeerServerTls()
            server_tls.update(self.leaf)
            credentials = server_tls.credentials
            context = dataplane.peer_server_context(self.leaf.ca_pem, self.leaf.cert_pem,
                                                    self.leaf.key_pem)
        self.server, port = serve(self, f"{host}:0", credentials)
        await self.server.start()
        self.dataplane = dataplane.DataPlaneServer(host, 0, ssl_context=context)
        await self.dataplane.start()
        return port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
        if self.dataplane is not None:
            await self.dataplane.close()


class ProductReceiver:
    """What peer/recovery/transfer.py receive_state uses of a downloading peer: its channels
    (wire.Channels: signed calls, peer_channel), its TLS leaf, a byte counter and limits."""

    def __init__(self, identity, certificate, leaf: tls.PeerTls | None, limits: codec.Limits
                 ) -> None:
        from peer.pipeline import wire
        from protocols import auth

        self.counter = wire.ByteCounter()
        self.client = _Client(b"", leaf)
        self._limits = limits
        self._channels = wire.Channels(
            lambda: auth.client_interceptors(auth.CallSigner(identity, lambda: certificate)),
            tls=lambda: leaf, peer_of=lambda address: SERVER_ID)

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._channels.get(address)

    def state_limits(self) -> codec.Limits:
        return self._limits

    async def close(self) -> None:
        await self._channels.close()


def receiver_certificate(coordinator, identity, now: float | None = None):
    """The membership certificate the coordinator issues `identity` at join."""
    from protocols.admission import issue_certificate

    return issue_certificate(coordinator, identity.public_key, SWARM, 3600.0,
                             time.time() if now is None else now, serial=1)


def _raw_server(sock: socket.socket, payload: bytes) -> None:
    view = memoryview(payload)
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.recv(1)
            conn.sendall(view)


def serve(ready: mp.Queue, mib: float, host: str, netns: str | None,
          server_tls: tls.PeerTls | None = None) -> None:
    """Server process: encode one float32 tensor of `mib` MiB, serve it over every path."""
    if netns:
        enter_netns(netns)
    import uvloop

    parent = os.getppid()
    array = np.random.default_rng(0).random(int(mib * MIB) // 4, dtype=np.float32)
    t0 = time.perf_counter()
    encoded = codec.encode({"weights": array})
    header = codec.fill_header(pb.CallHeader(kind="state", stage=1), encoded)
    encode_s = time.perf_counter() - t0

    raw = socket.create_server((host, 0))
    threading.Thread(target=_raw_server, args=(raw, encoded.payload), daemon=True).start()
    sync_server = grpc.server(futures.ThreadPoolExecutor(2), options=tensor_stream.grpc_options())
    pb_grpc.add_StateServicer_to_server(_InBandState(header, encoded.payload), sync_server)
    sync_port = sync_server.add_insecure_port(f"{host}:0")
    sync_server.start()

    async def main() -> None:
        plane = dataplane.DataPlaneServer(host)
        await plane.start()
        server = grpc.aio.server(options=tensor_stream.grpc_options())
        pb_grpc.add_StateServicer_to_server(_DataPlaneState(plane, header, encoded.payload),
                                            server)
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        wire_header = pb.CallHeader(kind="state", stage=1)
        stream_ports, keep = {}, []  # keep: a grpc.aio server without a reference is stopped
        for name, creds in (("stream", None), ("stream_tls", server_tls)):
            if name == "stream_tls" and creds is None:
                continue
            s = grpc.aio.server(options=tensor_stream.grpc_options())
            pb_grpc.add_StateServicer_to_server(_WireState(wire_header, {"weights": array}), s)
            stream_ports[name] = (s.add_insecure_port(f"{host}:0") if creds is None else
                                  s.add_secure_port(f"{host}:0", grpc.ssl_server_credentials(
                                      [(creds.key_pem, creds.cert_pem)],
                                      root_certificates=creds.ca_pem,
                                      require_client_auth=True)))
            await s.start()
            keep.append(s)
        coordinator = identity_of(COORDINATOR_SEED)
        for name, leaf in (("product", server_tls), ("product_plain", None)):
            peer = ProductPeer({"weights": array}, leaf, coordinator.public_key)
            stream_ports[name] = await peer.start(host)
            keep.append(peer)
        ready.put({"project": port, "raw": raw.getsockname()[1], "grpc": sync_port,
                   "encode_s": encode_s, "bytes": encoded.total_bytes, **stream_ports})
        while os.getppid() == parent:  # never outlive the bench, even if it was SIGKILLed
            await asyncio.sleep(1)

    uvloop.run(main())


# ------------------------------------------------------------------ the receiving side


def _limits(nbytes: int) -> codec.Limits:
    return codec.Limits(max_total_bytes=nbytes, expected={"weights": ("float32", (nbytes // 4,))})


def time_project(host: str, port: int, nbytes: int, repeats: int, verify: bool = True
                 ) -> list[float]:
    """Seconds per download over gRPC negotiation + data plane (`verify=False`: skip the digest)."""
    import uvloop

    async def main() -> list[float]:
        times = []
        target = f"{host}:{port}"
        async with grpc.aio.insecure_channel(target, options=tensor_stream.grpc_options()) as ch:
            await ch.channel_ready()
            stub = pb_grpc.StateStub(ch)
            for _ in range(repeats):
                t0 = time.perf_counter()
                call = stub.Download(pb.StateRequest(stage=1))
                if verify:
                    _, arrays = await dataplane.receive(call, _limits(nbytes))
                    assert arrays["weights"].nbytes == nbytes
                else:
                    header = (await anext(aiter(call))).header
                    await asyncio.to_thread(_fetch_unverified, header)
                times.append(time.perf_counter() - t0)
        return times

    return uvloop.run(main())


def _fetch_unverified(header: pb.CallHeader) -> None:
    """The data plane's wire protocol without the receiver's digest: diagnostic only."""
    host, port, ticket = dataplane.endpoint(header)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(dataplane.MAGIC + ticket)
        _read_into(sock, np.empty(8 + header.total_bytes, np.uint8))


def _read_into(sock: socket.socket, buffer: np.ndarray) -> None:
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        n = sock.recv_into(view[got: got + 4 * MIB])
        if not n:
            raise ConnectionError(f"closed after {got} of {len(buffer)} bytes")
        got += n


def time_product(host: str, port: int, nbytes: int, repeats: int,
                 client_tls: tls.PeerTls | None) -> list[float]:
    """(p)/(p'): seconds per state download through peer/recovery/transfer.py receive_state."""
    import uvloop

    from peer.recovery import transfer

    identity = identity_of(RECEIVER_SEED)
    certificate = receiver_certificate(identity_of(COORDINATOR_SEED), identity)

    async def main() -> list[float]:
        times = []
        ctx = ProductReceiver(identity, certificate, client_tls, _limits(nbytes))
        try:
            await ctx.channel(f"{host}:{port}").channel_ready()
            for _ in range(repeats):
                t0 = time.perf_counter()
                header, arrays = await transfer.receive_state(
                    ctx, f"{host}:{port}", SERVER_ID, pb.StateRequest(stage=1,
                                                                      include_optimizer=True))
                assert arrays["weights"].nbytes == nbytes
                if dataplane.is_dataplane(header) != (nbytes >= STATE_DATAPLANE_MIN_BYTES):
                    raise RuntimeError(f"the product answered {header.meta or 'in-band'} for a "
                                       f"state of {nbytes} bytes")
                times.append(time.perf_counter() - t0)
        finally:
            await ctx.close()
        return times

    return uvloop.run(main())


def time_raw(host: str, port: int, nbytes: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"x")
            _read_into(sock, np.empty(nbytes, np.uint8))  # the same buffer policy as (a)
        times.append(time.perf_counter() - t0)
    return times


def time_raw_hashed(host: str, port: int, nbytes: int, repeats: int, alg: str = ""
                    ) -> list[float]:
    """The raw socket plus the receiver's digest (`alg`), hashed as bytes arrive like (a) or (p)
    do."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"x")
            dataplane.recv_into_hashing(sock, memoryview(np.empty(nbytes, np.uint8)), "raw", alg)
        times.append(time.perf_counter() - t0)
    return times


def time_grpc_in_band(host: str, port: int, nbytes: int, repeats: int) -> list[float]:
    times = []
    with grpc.insecure_channel(f"{host}:{port}", options=tensor_stream.grpc_options()) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = pb_grpc.StateStub(ch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, arrays = tensor_stream.receive_sync(stub.Download(pb.StateRequest(stage=1)),
                                                   _limits(nbytes))
            assert arrays["weights"].nbytes == nbytes
            times.append(time.perf_counter() - t0)
    return times


def time_wire_stream(host: str, port: int, nbytes: int, repeats: int,
                     client_tls: tls.PeerTls | None) -> list[float]:
    """(d)/(d'): seconds per State.Download as a peer receives it, over peer_channel."""
    import uvloop

    from peer.pipeline import wire

    async def main() -> list[float]:
        times = []
        counter = wire.ByteCounter()
        async with tls.peer_channel(f"{host}:{port}", SERVER_ID, client_tls,
                                    options=tensor_stream.grpc_options()) as ch:
            await ch.channel_ready()
            stub = pb_grpc.StateStub(ch)
            for _ in range(repeats):
                t0 = time.perf_counter()
                call = stub.Download(pb.StateRequest(stage=1))
                _, arrays = await wire.receive(call.__aiter__(), _limits(nbytes), counter,
                                               "state")
                assert arrays["weights"].nbytes == nbytes
                times.append(time.perf_counter() - t0)
        return times

    return uvloop.run(main())


def _in_netns(result: mp.Queue, netns: str, fn: Callable[..., list[float]], *args: object
              ) -> None:
    enter_netns(netns)
    result.put(fn(*args))


@contextlib.contextmanager
def server_process(ctx: mp.context.SpawnContext, mib: float, host: str = "127.0.0.1",
                   netns: str | None = None, server_tls: tls.PeerTls | None = None
                   ) -> Iterator[dict]:
    ready = ctx.Queue()
    proc = ctx.Process(target=serve, args=(ready, mib, host, netns, server_tls), daemon=True)
    proc.start()
    try:
        while True:
            try:
                info = ready.get(timeout=1)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"server process exited with code {proc.exitcode}") from None
        yield info
    finally:
        proc.terminate()
        proc.join(10)


# ------------------------------------------------------------------ main


def _mbps(nbytes: int, times: list[float]) -> float:
    return nbytes / statistics.median(times) / 1e6


def run_loopback(ctx: mp.context.SpawnContext, mib: float, repeats: int, with_grpc: bool
                 ) -> list[tuple[str, float, str]]:
    """Rows of (path, median MB/s, "min-max" MB/s). Paths take turns within each repeat, so a
    burst of load from other processes on this shared machine hits all of them alike."""
    server_tls, client_tls = bench_certificates(identity_of(RECEIVER_SEED).peer_id)
    with server_process(ctx, mib, server_tls=server_tls) as info:
        n, host = info["bytes"], "127.0.0.1"
        paths: dict[str, Callable[[], list[float]]] = {
            PRODUCT: lambda: time_product(host, info["product"], n, 1, client_tls),
            PRODUCT_PLAIN: lambda: time_product(host, info["product_plain"], n, 1, None),
            PROJECT: lambda: time_project(host, info["project"], n, 1),
            "(a') data plane, receiver skips the digest (diagnostic)":
                lambda: time_project(host, info["project"], n, 1, verify=False),
            RAW: lambda: time_raw(host, info["raw"], n, 1),
            "(b') raw TCP socket + digest as it arrives (same hashing as (a))":
                lambda: time_raw_hashed(host, info["raw"], n, 1),
            "(b'') raw TCP socket + BLAKE3 as it arrives (same hashing as (p))":
                lambda: time_raw_hashed(host, info["raw"], n, 1, digest.BLAKE3),
        }
        if with_grpc:
            paths["(c) sync gRPC stream, ~4 MiB TensorChunks"] = (
                lambda: time_grpc_in_band(host, info["grpc"], n, 1))
            paths[STREAM] = lambda: time_wire_stream(host, info["stream"], n, 1, None)
            paths[STREAM_TLS] = lambda: time_wire_stream(host, info["stream_tls"], n, 1,
                                                         client_tls)
        time_raw(host, info["raw"], n, 1)  # warm-up: first-use costs of both processes
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, run in paths.items():
                time.sleep(0.25)  # let the previous transfer's teardown finish in both processes
                times[name] += run()
    rows = [(name, _mbps(n, seconds), f"{n / max(seconds) / 1e6:.0f}-{n / min(seconds) / 1e6:.0f}")
            for name, seconds in times.items()]
    payload = np.zeros(n, np.uint8)
    t0 = time.perf_counter()
    hashlib.sha256(payload).digest()
    rows.append(("flat SHA-256 alone, one core (context)", n / (time.perf_counter() - t0) / 1e6,
                 ""))
    t0 = time.perf_counter()
    digest.payload_digest(payload)
    rows.append((f"SHA-256 tree alone, {digest.HASH_THREADS} threads, in memory (context)",
                 n / (time.perf_counter() - t0) / 1e6, ""))
    t0 = time.perf_counter()
    digest.blake3_digest(payload)
    rows.append(("BLAKE3 alone, one core, in memory (context)",
                 n / (time.perf_counter() - t0) / 1e6, ""))
    rows.append(("encode + digest at the sender, once per snapshot",
                 n / info["encode_s"] / 1e6, ""))
    rows += _snapshot_rows(n)
    return rows


def _snapshot_rows(nbytes: int, repeats: int = 2) -> list[tuple[str, float, str]]:
    """What (p)'s sender does per download before the first byte moves: peer/state_service.py
    encode_state (a copy into a snapshot buffer + BLAKE3 following it on another thread), timed
    in this process as the other context rows, with a SnapshotBuffers as StateService keeps
    them: a fresh buffer (a peer's first download of that size: pages faulted in on a helper
    thread during the copy), then the kept buffer right after the previous snapshot and after
    2.5 s idle, as (p)'s sender sees it (its last snapshot is a whole repeat old)."""
    from peer.snapshot import SnapshotBuffers
    from peer.state_service import encode_state

    arrays = {"weights": np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)}
    rows = []
    for label, pause, kept in (("fresh buffer", 2.5, False), ("kept buffer, warm", 0.0, True),
                               ("kept buffer, after 2.5 s idle", 2.5, True)):
        buffers = SnapshotBuffers(max_idle_bytes=nbytes if kept else 0)
        buffers.give_back(encode_state(arrays, digest.BLAKE3, buffers).payload)
        seconds = []
        for _ in range(repeats):
            time.sleep(pause)
            t0 = time.perf_counter()
            encoded = encode_state(arrays, digest.BLAKE3, buffers)
            seconds.append(time.perf_counter() - t0)
            buffers.give_back(encoded.payload)
        buffers.close()
        rows.append((f"(p)'s sender snapshot, {label} (context)", _mbps(nbytes, seconds),
                     f"{nbytes / max(seconds) / 1e6:.0f}-{nbytes / min(seconds) / 1e6:.0f}"))
    return rows


def run_capped(ctx: mp.context.SpawnContext, mib: float, rate_mbit: float, mtu: int = 1500
               ) -> str:
    if os.geteuid() != 0:
        return "capped link: skipped (needs root for ip netns / tc)"
    server_tls, client_tls = bench_certificates(identity_of(RECEIVER_SEED).peer_id)

    def client_run(info: dict, fn: Callable[..., list[float]], *args: object) -> float:
        result = ctx.Queue()
        client = ctx.Process(target=_in_netns, args=(result, ns_b, fn, *args))
        client.start()
        try:
            (seconds,) = result.get(timeout=600)
        finally:
            client.join(10)
            if client.is_alive():
                client.terminate()
        return seconds

    try:
        with capped_link(rate_mbit, mtu) as (ns_a, ns_b, ip_a, _ip_b), \
                server_process(ctx, mib, ip_a, ns_a, server_tls) as info:
            n = info["bytes"]
            seconds = client_run(info, time_project, ip_a, info["project"], n, 1)
            streams = {name: [] for name in (PRODUCT, STREAM, STREAM_TLS)}
            for _ in range(2):  # taking turns, as on loopback
                streams[PRODUCT].append(client_run(info, time_product, ip_a, info["product"], n,
                                                   1, client_tls))
                streams[STREAM].append(client_run(info, time_wire_stream, ip_a,
                                                  info["stream"], n, 1, None))
                streams[STREAM_TLS].append(client_run(info, time_wire_stream, ip_a,
                                                      info["stream_tls"], n, 1, client_tls))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        return f"capped link: skipped ({exc})"
    mbit = info["bytes"] * 8 / seconds / 1e6
    # tbf counts whole frames: at MTU 1500 a 1448-byte TCP segment (timestamps on) is 1514 bytes.
    framing = (mtu - 52) / (mtu + 14)
    return (f"capped link: {info['bytes'] / MIB:.0f} MiB over veth (MTU {mtu}) + tbf "
            f"{rate_mbit:g} Mbit/s in {seconds:.2f} s = {mbit:.1f} Mbit/s of payload = "
            f"{100 * mbit / rate_mbit:.1f} % of the cap (TCP/IP/Ethernet framing leaves at most "
            f"{100 * framing:.1f} %; project path end to end)" + "".join(
                f"\ncapped link, {name}: {n * 8 / min(t) / 1e6:.1f} Mbit/s of payload = "
                f"{100 * n * 8 / min(t) / 1e6 / rate_mbit:.1f} % of the cap (best of {len(t)})"
                for name, t in streams.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=256, help="tensor size on loopback")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-grpc", action="store_true", help="skip (c), in-band gRPC")
    parser.add_argument("--netns-mib", type=float, default=64, help="0 skips the capped link")
    parser.add_argument("--rate-mbit", type=float, default=100)
    parser.add_argument("--mtu", type=int, default=1500, help="of the capped veth link")
    args = parser.parse_args(argv)
    from peer import state_service

    if state_service.STATE_DATAPLANE_MIN_BYTES != STATE_DATAPLANE_MIN_BYTES:
        raise SystemExit("bench.transport: update STATE_DATAPLANE_MIN_BYTES to "
                         "peer/state_service.py's")
    ctx = mp.get_context("spawn")
    old_env = os.environ.get("SHOAL_TLS_ON_LOOPBACK")
    os.environ["SHOAL_TLS_ON_LOOPBACK"] = "1"  # (d') runs mTLS on 127.0.0.1 as between machines
    signal.signal(signal.SIGTERM, _raise_exit)  # so finally blocks end children and namespaces
    try:
        rows = run_loopback(ctx, args.mib, args.repeats, not args.no_grpc)
        capped = "capped link: skipped (--netns-mib 0)"
        if args.netns_mib > 0:
            capped = run_capped(ctx, args.netns_mib, args.rate_mbit, args.mtu)
    except KeyboardInterrupt:
        print("transport bench interrupted; its processes and namespaces are gone", file=sys.stderr)
        return 130
    finally:
        if old_env is None:
            os.environ.pop("SHOAL_TLS_ON_LOOPBACK", None)
        else:
            os.environ["SHOAL_TLS_ON_LOOPBACK"] = old_env
    by_name = {name: mbps for name, mbps, _ in rows}
    raw = by_name[RAW]
    print(f"transport bench: {args.mib:g} MiB float32, loopback, 2 processes, "
          f"median of {args.repeats}; {machine()}")
    print(f"{'path':<62} {'MB/s':>6} {'/ raw':>6}  {'range':>10}")
    for name, mbps, spread in rows:
        print(f"{name:<62} {mbps:>6.0f} {mbps / raw:>6.2f}  {spread:>10}")
    if args.mib * MIB < STATE_DATAPLANE_MIN_BYTES:
        print(f"note: (p) and (p') went in-band: states under {STATE_DATAPLANE_MIN_BYTES >> 20} "
              "MiB do (peer/state_service.py STATE_DATAPLANE_MIN_BYTES)")
    print(capped)
    ratio = by_name[PRODUCT] / raw
    print(targets_line([(TARGET, ratio)]))
    print(f"transport: grpc/raw = {TARGET.figure(ratio)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
