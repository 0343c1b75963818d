"""The peer's side of the coordinator protocol, and the in-process shapes of its messages.

`CoordinatorClient` is what a peer daemon (and `shoal status`, and the simulated peers of the
tests and the bench) uses to join a swarm, keep its lease with heartbeats and leave. It holds the
membership certificate the coordinator issued and swaps in the renewed one that heartbeat
replies carry; every call is signed by `protocols.auth`'s client interceptors.

Failure behaviour, the contract a daemon can rely on:
- The coordinator down or unreachable (UNAVAILABLE, DEADLINE_EXCEEDED): calls retry with
  exponential backoff (0.2 s doubling to 5 s, with jitter) for up to `retry_s` seconds, then raise
  `CoordinatorUnavailable`. gRPC reconnects the channel by itself; nothing needs rebuilding.
- The coordinator forgot this peer (UNAUTHENTICATED or PERMISSION_DENIED on Heartbeat, e.g. after
  the lease expired or its state was lost): the client re-joins once with its current stage and
  step as hints, and the heartbeat returns `action="rejoin"` so the daemon knows.
- Any other refusal raises `CoordinatorRefused` with the server's message.

Messages are dataclasses inside the process; protobuf exists only at the wire (`to_proto` /
`from_proto`). A `HeartbeatResult` decodes its swarm view lazily: a simulated swarm of thousands
of peers must not pay for views it never reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pb_grpc
from protocols.auth import CallSigner, client_interceptors, token_proof, verify_certificate
from protocols.identity import Identity, peer_id_of
from protocols.runspec import RunSpec
from protocols.tensor_stream import grpc_options

log = logging.getLogger("shoal.coordinator_client")

#: stage_hint of a Join that asks to observe (export, inspection): a certificate, no stage, no
#: lease; the observer can read the view and call peers' State/Stage services, nothing else.
OBSERVER_STAGE = -2
PEER_STATES = ("joining", "syncing", "training", "draining", "lost", "rebuilt")
VERSION = "0.1.0"


# ------------------------------------------------------------------------- message shapes


@dataclass(frozen=True, slots=True)
class Benchmark:
    """What a peer measured (or declared) about itself at start-up."""

    samples_per_s: float = 0.0
    bandwidth_mbps: float = 0.0
    device: str = ""
    memory_bytes: int = 0
    declared: bool = False

    def to_proto(self) -> pb.Benchmark:
        return pb.Benchmark(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, m: pb.Benchmark) -> Benchmark:
        return cls(m.samples_per_s, m.bandwidth_mbps, m.device, m.memory_bytes, m.declared)


@dataclass(slots=True)
class PeerStats:
    """What a peer reports in each heartbeat. `loss` is NaN when unknown (block stages)."""

    state: str = "joining"
    samples_per_s: float = 0.0
    queue: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    loss: float = math.nan
    step: int = 0
    tokens_per_s: float = 0.0
    dropped_microbatches: int = 0
    grad_norm: float = 0.0
    state_hash: str = ""
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    microbatches_done: int = 0

    def to_proto(self) -> pb.PeerStats:
        return pb.PeerStats(
            state=self.state, samples_per_s=self.samples_per_s, queue=self.queue,
            bytes_sent=self.bytes_sent, bytes_received=self.bytes_received, loss=self.loss,
            step=self.step, tokens_per_s=self.tokens_per_s,
            dropped_microbatches=self.dropped_microbatches, grad_norm=self.grad_norm,
            state_hash=self.state_hash, bytes_by_kind=self.bytes_by_kind,
            microbatches_done=self.microbatches_done)

    @classmethod
    def from_proto(cls, m: pb.PeerStats) -> PeerStats:
        return cls(m.state, m.samples_per_s, m.queue, m.bytes_sent, m.bytes_received, m.loss,
                   m.step, m.tokens_per_s, m.dropped_microbatches, m.grad_norm, m.state_hash,
                   dict(m.bytes_by_kind), m.microbatches_done)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and infinities become None). Cheap: no deep copy."""
        d = {k: getattr(self, k) for k in _STATS_FIELDS}
        d["bytes_by_kind"] = dict(self.bytes_by_kind)
        for k in _STATS_FLOATS:
            if not math.isfinite(d[k]):
                d[k] = None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PeerStats:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("loss") is None:
            kw["loss"] = math.nan
        return cls(**kw)


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(PeerStats))
_STATS_FLOATS = ("samples_per_s", "loss", "tokens_per_s", "grad_norm")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One member of the swarm as the coordinator describes it to everyone."""

    peer_id: str
    public_key: bytes
    address: str
    stage: int
    state: str
    benchmark: Benchmark
    stats: PeerStats
    lease_expires: float
    joined_at: float

    @classmethod
    def from_proto(cls, m: pb.PeerInfo) -> PeerInfo:
        return cls(m.peer_id, m.public_key, m.address, m.stage, m.state,
                   Benchmark.from_proto(m.benchmark), PeerStats.from_proto(m.stats),
                   m.lease_expires, m.joined_at)


@dataclass(frozen=True, slots=True)
class StageInfo:
    """One stage: its replicas, their summed throughput, and what CheckFree needs."""

    stage: int
    replicas: tuple[str, ...]
    throughput: float
    grad_norm: float
    step: int
    rebuild: str  # "" | "checkfree" | "checkfree+" | "snapshot" | "copy"

    @classmethod
    def from_proto(cls, m: pb.StageInfo) -> StageInfo:
        return cls(m.stage, tuple(m.replicas), m.throughput, m.grad_norm, m.step, m.rebuild)


@dataclass(frozen=True, slots=True)
class SwarmView:
    """The membership at one epoch. Peers route only to `peers`; `revoked` must be refused."""

    epoch: int
    swarm_id: str
    peers: tuple[PeerInfo, ...]
    stages: tuple[StageInfo, ...]
    revoked: tuple[str, ...]

    @classmethod
    def from_proto(cls, m: pb.SwarmView) -> SwarmView:
        return cls(m.epoch, m.swarm_id, tuple(PeerInfo.from_proto(p) for p in m.peers),
                   tuple(StageInfo.from_proto(s) for s in m.stages), tuple(m.revoked))

    def replicas(self, stage: int) -> list[PeerInfo]:
        return [p for p in self.peers if p.stage == stage]

    def peer(self, peer_id: str) -> PeerInfo | None:
        return next((p for p in self.peers if p.peer_id == peer_id), None)


@dataclass(slots=True)
class JoinResult:
    """What the coordinator answered to Join: the run, this peer's stage, and its certificate.

    `view` is decoded on first use (a thousand-peer view costs milliseconds to convert).
    """

    certificate: pb.SignedCertificate
    coordinator_public_key: bytes
    spec_toml: str
    spec: RunSpec
    stage: int
    epoch: int
    lease_s: float
    heartbeat_s: float
    swarm_id: str
    view_proto: pb.SwarmView
    _view: SwarmView | None = None

    @property
    def view(self) -> SwarmView:
        if self._view is None:
            self._view = SwarmView.from_proto(self.view_proto)
        return self._view


@dataclass(slots=True)
class HeartbeatResult:
    """What the coordinator answered to a heartbeat.

    `action` is "" normally, "move" when a rebalance gave this peer another stage (`stage`),
    "rejoin" when the client had to join again (the coordinator had forgotten it), "leave" when
    the coordinator wants the peer gone. `stage` is authoritative in every reply: a peer whose
    stage differs from the one it holds must move even if the reply that said "move" was lost.
    `view` is None unless the epoch moved.
    """

    epoch: int
    lease_expires: float
    stage: int
    action: str
    view_proto: pb.SwarmView | None = None
    _view: SwarmView | None = None

    @property
    def view(self) -> SwarmView | None:
        if self._view is None and self.view_proto is not None:
            self._view = SwarmView.from_proto(self.view_proto)
        return self._view


# ------------------------------------------------------------------------- the client

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
FORGOTTEN = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class CoordinatorError(Exception):
    """Base of the client's errors."""


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator did not answer within the retry budget; the daemon may keep trying."""


class CoordinatorRefused(CoordinatorError):
    """The coordinator answered with a refusal; `code` is the gRPC status, the text says why."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class NotJoined(CoordinatorError):
    """A call that needs membership was made before `join()` succeeded."""


class CoordinatorClient:
    """A peer's connection to the coordinator. Use inside one asyncio event loop, from one task
    at a time (a heartbeat may re-join, and two re-joins at once would race).

    Args:
        address: "host:port" of the coordinator's gRPC service.
        identity: this peer's Ed25519 identity; it signs every call.
        token: the swarm's join token (None when the coordinator admits by allow-list).
        tls_dir: a folder made by protocols.tls.write_tls_dir, to talk mTLS.
        call_timeout_s: deadline of one attempt of one call.
        expect_coordinator_key: refuse a coordinator whose key differs (e.g. the key announced
            over mDNS, or one configured by the operator). Without it the key of the first
            Join is used; a later re-join that meets a different key (the coordinator lost its
            state directory) adopts it with a warning.
    """

    def __init__(self, address: str, identity: Identity, token: str | None = None, *,
                 tls_dir: str | None = None, call_timeout_s: float = 10.0,
                 expect_coordinator_key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self.identity = identity
        self.token = token
        self.tls_dir = tls_dir
        self.call_timeout_s = call_timeout_s
        self.clock = clock
        self.certificate: pb.SignedCertificate | None = None
        self.certificate_expires = 0.0
        self.coordinator_public_key = expect_coordinator_key or b""
        self._pinned = expect_coordinator_key is not None
        self.swarm_id = ""
        self.spec: RunSpec | None = None
        self.stage = -1
        self.epoch = 0
        self.known_epoch = 0
        self.lease_s = 10.0
        self.heartbeat_s = 2.0
        self.lease_expires = 0.0
        self.rejoins = 0
        self._join_args: tuple[Benchmark, str] | None = None
        self._last_step = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None

    # ------------------------------------------------------------------ calls

    async def join(self, benchmark: Benchmark, address: str, stage_hint: int = -1,
                   step_hint: int = 0, *, retry_s: float = 300.0) -> JoinResult:
        """Join the swarm (or re-attach with the stage this peer already holds).

        Raises:
            CoordinatorRefused: wrong token, key not allowed, or a malformed request.
            CoordinatorUnavailable: no answer within `retry_s`.
        """
        now = self.clock()
        key = self.identity.public_key
        request = pb.JoinRequest(
            public_key=key, timestamp=now, benchmark=benchmark.to_proto(), address=address,
            stage_hint=stage_hint, step_hint=step_hint, version=VERSION,
            token_proof=token_proof(self.token, key, now) if self.token else b"")
        reply = await self._call("Join", request, retry_s, backoff_cap_s=5.0)
        key_changed = bool(self.coordinator_public_key) and \
            reply.coordinator_public_key != self.coordinator_public_key
        if key_changed and self._pinned:
            raise CoordinatorRefused(
                f"the coordinator at {self.address} presents key "
                f"{peer_id_of(reply.coordinator_public_key)}, not the expected "
                f"{peer_id_of(self.coordinator_public_key)}; check the address",
                grpc.StatusCode.PERMISSION_DENIED)
        if key_changed:
            log.warning("the coordinator at %s has a new key (%s, was %s): it lost its state "
                        "directory or was replaced; following it", self.address,
                        peer_id_of(reply.coordinator_public_key),
                        peer_id_of(self.coordinator_public_key))
        cert = verify_certificate(reply.certificate, reply.coordinator_public_key, self.clock(),
                                  reply.swarm_id)
        self.coordinator_public_key = bytes(reply.coordinator_public_key)
        self.certificate, self.certificate_expires = reply.certificate, cert.not_after
        self.swarm_id = reply.swarm_id
        self.spec = RunSpec.from_toml(reply.run_spec_toml)
        self.stage, self.epoch, self.known_epoch = reply.stage, reply.epoch, reply.view.epoch
        self.lease_s, self.heartbeat_s = reply.lease_seconds, reply.heartbeat_interval
        self.lease_expires = self.clock() + reply.lease_seconds
        self._join_args = (benchmark, address)
        self._last_step = step_hint
        return JoinResult(reply.certificate, self.coordinator_public_key, reply.run_spec_toml,
                          self.spec, reply.stage, reply.epoch, reply.lease_seconds,
                          reply.heartbeat_interval, reply.swarm_id, reply.view)

    async def heartbeat(self, stats: PeerStats, *, retry_s: float | None = None
                        ) -> HeartbeatResult:
        """Renew the lease and report `stats`; re-joins if the coordinator forgot this peer.

        Raises:
            NotJoined: before join().
            CoordinatorUnavailable: no answer within `retry_s` (default: one lease).
            CoordinatorRefused: refused, also after a re-join attempt.
        """
        if self._join_args is None:
            raise NotJoined("call join() before heartbeat()")
        self._last_step = stats.step
        request = pb.HeartbeatRequest(stats=stats.to_proto(), known_epoch=self.known_epoch)
        try:
            reply = await self._call("Heartbeat", request,
                                     self.lease_s if retry_s is None else retry_s,
                                     backoff_cap_s=self.heartbeat_s)
        except CoordinatorRefused as exc:
            if exc.code not in FORGOTTEN:
                raise
            log.warning("coordinator refused our heartbeat (%s); re-joining with stage %d",
                        exc, self.stage)
            benchmark, address = self._join_args
            joined = await self.join(benchmark, address, self.stage, self._last_step)
            self.rejoins += 1
            return HeartbeatResult(joined.epoch, self.lease_expires, joined.stage, "rejoin",
                                   joined.view_proto)
        if reply.HasField("renewed"):
            self.certificate = reply.renewed
            self.certificate_expires = pb.Certificate.FromString(
                reply.renewed.certificate).not_after
        self.epoch, self.stage, self.lease_expires = reply.epoch, reply.stage, reply.lease_expires
        view = reply.view if reply.HasField("view") else None
        if view is not None:
            self.known_epoch = view.epoch
        return HeartbeatResult(reply.epoch, reply.lease_expires, reply.stage, reply.action, view)

    async def leave(self, reason: str = "leaving", *, retry_s: float = 5.0) -> None:
        """Tell the coordinator this peer is going; its certificate is revoked."""
        if self._join_args is None:
            return
        await self._call("Leave", pb.LeaveRequest(reason=reason[:200]), retry_s, 1.0)
        self._join_args = None
        self.certificate = None

    async def view(self, *, retry_s: float = 30.0) -> SwarmView:
        """The current swarm view (members only: this needs a certificate)."""
        if self.certificate is None:
            raise NotJoined("GetSwarmView needs membership; call join() first")
        reply = await self._call("GetSwarmView", pb.SwarmViewRequest(), retry_s, 5.0)
        self.known_epoch = max(self.known_epoch, reply.epoch)
        return SwarmView.from_proto(reply)

    async def run_heartbeats(self, stats: Callable[[], PeerStats],
                             on_reply: Callable[[HeartbeatResult], Awaitable[None] | None]
                             | None = None, stop: asyncio.Event | None = None) -> None:
        """Heartbeat every `heartbeat_s` until `stop` is set; an outage is logged, not raised.

        `on_reply` sees every reply (moves, rejoins, new views). CoordinatorRefused ends the loop.
        """
        stop = stop or asyncio.Event()
        while not stop.is_set():
            started = self.clock()
            try:
                result = await self.heartbeat(stats())
            except CoordinatorUnavailable as exc:
                log.warning("%s; still trying", exc)
            else:
                if on_reply is not None:
                    maybe = on_reply(result)
                    if asyncio.iscoroutine(maybe):
                        await maybe
            wait = max(0.0, self.heartbeat_s - (self.clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing

    def _stub_now(self) -> pb_grpc.CoordinatorStub:
        if self._stub is None:
            signer = CallSigner(self.identity, lambda: self.certificate)
            # reconnect quickly once a restarted coordinator is back (gRPC's default backoff
            # grows to minutes); views of thousands of peers exceed the default 4 MiB limit
            options = [*grpc_options(64 * 1024 * 1024),
                       ("grpc.initial_reconnect_backoff_ms", 200),
                       ("grpc.min_reconnect_backoff_ms", 200),
                       ("grpc.max_reconnect_backoff_ms", 5000)]
            interceptors = client_interceptors(signer)
            if self.tls_dir:
                from protocols.tls import channel_credentials

                self._channel = grpc.aio.secure_channel(
                    self.address, channel_credentials(self.tls_dir), options=options,
                    interceptors=interceptors)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=options,
                                                          interceptors=interceptors)
            self._stub = pb_grpc.CoordinatorStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: Any, retry_s: float,
                    backoff_cap_s: float) -> Any:
        """One RPC, retried with jittered exponential backoff while the coordinator is away."""
        deadline = self.clock() + retry_s
        delay = 0.2
        while True:
            rpc = getattr(self._stub_now(), method)
            try:
                return await rpc(request, timeout=self.call_timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRYABLE:
                    raise CoordinatorRefused(
                        f"{method} refused by the coordinator at {self.address}: "
                        f"{code.name}: {exc.details()}", code) from None
                if self.clock() + delay > deadline:
                    raise CoordinatorUnavailable(
                        f"the coordinator at {self.address} did not answer {method} for "
                        f"{retry_s:.0f} s ({code.name}: {exc.details()}); check that it runs "
                        f"and that the address is right") from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, max(backoff_cap_s, 0.2))
