"""The peer's side of the coordinator protocol: join a swarm, keep the lease, leave.

`CoordinatorClient` is what a peer daemon (and `shoal status`, and the simulated peers of the
tests and the bench) uses to join a swarm, keep its lease with heartbeats and leave. It holds the
membership certificate the coordinator issued and swaps in the renewed one that heartbeat
replies carry; every call is signed by `protocols.auth`'s client interceptors.

Failure behaviour, the contract a daemon can rely on:
- The coordinator down or unreachable (UNAVAILABLE, DEADLINE_EXCEEDED): calls retry with
  exponential backoff (0.2 s doubling to 5 s, with jitter) for up to `retry_s` seconds, then raise
  `CoordinatorUnavailable`. gRPC reconnects the channel by itself; nothing needs rebuilding.
- A Join storm (issue #19): a busy coordinator turns Joins away with RESOURCE_EXHAUSTED and a
  `retry-after-ms` trailing metadata; `join` waits that long plus up to half again (jitter, so
  the storm does not come back at once) and retries, with a freshly dated request, until its
  `retry_s` runs out; it never gives up early. A Join CANCELLED by the server (its deadline
  passed while the coordinator was saturated) is retried the same way as UNAVAILABLE.
- The pace: the coordinator tells each peer its heartbeat period and lease (JoinReply,
  HeartbeatReply; coordinator/pacing.py). `heartbeat_s` and `lease_s` follow the last reply;
  `run_heartbeats` and the peer daemon beat at `heartbeat_s`.
- The coordinator forgot this peer (UNAUTHENTICATED or PERMISSION_DENIED on Heartbeat, e.g. after
  the lease expired or its state was lost): the client re-joins once with its current stage and
  step as hints, and the heartbeat returns `action="rejoin"` so the daemon knows.
- Any other refusal raises `CoordinatorRefused` with the server's message.

Trust (protocols/tls.py): before the first call the client looks at what the coordinator's port
speaks. A TLS port presents the swarm CA; the client checks it against the coordinator's
fingerprint (from the token, "SECRET sha256:HEX", or `fingerprint=`) and pins it as the only
root for every later call; no fingerprint, or another one, is `CoordinatorUntrusted` before
anything is sent. A plaintext port is accepted only on a loopback address or with
`plaintext=True`. Every Join reply is checked too: its tls_ca must be the pinned CA (or match the
fingerprint) and its coordinator_public_key the key that CA names. Join carries a CSR for the
client's P-256 key (`tls_key`, or an ephemeral one) and the reply's leaf is `tls()`'s, for
peer-to-peer mTLS (protocols.tls.peer_channel). The leaf is renewed by re-joining a day before
it ends.

Messages are dataclasses inside the process; protobuf exists only at the wire. Their shapes
(`Benchmark`, `PeerStats`, `SwarmView`, `JoinResult`, `HeartbeatResult`, ...) and the shared
constants live in protocols.coordinator_types and are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pb_grpc
from protocols import tls as tls_
from protocols.admission import parse_token
from protocols.auth import CallSigner, client_interceptors, token_proof, verify_certificate
from protocols.coordinator_types import (
    OBSERVER_STAGE,
    PEER_STATES,
    READY_STATES,
    VERSION,
    Benchmark,
    HeartbeatResult,
    JoinResult,
    PeerInfo,
    PeerStats,
    StageInfo,
    SwarmView,
)
from protocols.identity import Identity, peer_id_of
from protocols.runspec import RunSpec
from protocols.tensor_stream import grpc_options

__all__ = [
    "FORGOTTEN", "OBSERVER_STAGE", "PEER_STATES", "READY_STATES", "RETRYABLE", "VERSION",
    "Benchmark",
    "CoordinatorClient", "CoordinatorError", "CoordinatorRefused", "CoordinatorUnavailable",
    "CoordinatorUntrusted",
    "HeartbeatResult", "JoinResult", "NotJoined", "PeerInfo", "PeerStats", "StageInfo",
    "SwarmView",
]

log = logging.getLogger("shoal.coordinator_client")

# ------------------------------------------------------------------------- the client

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Join is idempotent (a live member re-joining keeps its stage), so a Join the server cancelled
# (at its deadline, the coordinator saturated by a join storm) is retried too
JOIN_RETRYABLE = RETRYABLE | {grpc.StatusCode.CANCELLED}
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a Join the coordinator turned away
# wait retry-after * uniform(1, 1 + RETRY_AFTER_JITTER), adding at most RETRY_AFTER_JITTER_MAX_S:
# the coordinator already spreads the joiners it turns away over distinct slots; the jitter only
# keeps two of them from arriving in the same instant (a 60 s wait stretched by half would miss
# its slot, and the slots left unused are admission capacity lost)
RETRY_AFTER_JITTER = 0.5
RETRY_AFTER_JITTER_MAX_S = 1.0
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


class CoordinatorUntrusted(CoordinatorRefused):
    """The coordinator is not the one this peer's fingerprint names, or cannot be verified."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.FAILED_PRECONDITION)


class _Unreachable(Exception):
    """Nothing answered the TLS probe (connection refused, timeout): retried like UNAVAILABLE."""


class NotJoined(CoordinatorError):
    """A call that needs membership was made before `join()` succeeded."""


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED refusal asks the caller to wait (its `retry-after-ms`
    trailing metadata); None for any other error, or without (or with a malformed) value."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = float(value)
            except (TypeError, ValueError):
                return None
            return min(ms, 600_000.0) / 1000 if ms >= 0 else None
    return None


def apply_view_delta(base: pb.SwarmView, delta: pb.SwarmView) -> pb.SwarmView:
    """The whole view `delta` (SwarmView.delta_from == base.epoch) makes of `base`: members
    listed in the delta replace theirs (in place) or are added (at the end), `removed` ones
    go, stages and revocations are the delta's."""
    if delta.delta_from != base.epoch:
        raise ValueError(f"a delta from epoch {delta.delta_from} does not apply to the view of "
                         f"epoch {base.epoch}")
    changed = {p.peer_id: p for p in delta.peers}
    gone = set(delta.removed)
    for peer_id in gone:
        changed.pop(peer_id, None)
    out = pb.SwarmView(epoch=delta.epoch, swarm_id=delta.swarm_id or base.swarm_id,
                       stages=delta.stages, revoked=delta.revoked)
    out.peers.extend(changed.pop(p.peer_id, p) for p in base.peers if p.peer_id not in gone)
    out.peers.extend(changed.values())
    return out


class CoordinatorClient:
    """A peer's connection to the coordinator. Use inside one asyncio event loop, from one task
    at a time (a heartbeat may re-join, and two re-joins at once would race).

    Args:
        address: "host:port" of the coordinator's gRPC service.
        identity: this peer's Ed25519 identity; it signs every call.
        token: the swarm's join token (None when the coordinator admits by allow-list).
        tls_dir: a folder made by protocols.tls.write_tls_dir, to talk mTLS (hand-made CA).
        fingerprint: the coordinator's fingerprint ("sha256:HEX"); default: the token's.
        plaintext: talk plaintext gRPC even to a non-loopback address (`--plaintext`); no CSR.
        tls_key: this peer's P-256 key (PEM) for its TLS leaf; default: an ephemeral one.
        call_timeout_s: deadline of one attempt of one call.
        expect_coordinator_key: refuse a coordinator whose key differs (e.g. the key announced
            over mDNS, or one configured by the operator). Without it the key of the first
            Join is used; a later re-join that meets a different key (the coordinator lost its
            state directory) adopts it with a warning.
    """

    def __init__(self, address: str, identity: Identity, token: str | None = None, *,
                 tls_dir: str | None = None, call_timeout_s: float = 10.0,
                 expect_coordinator_key: bytes | None = None,
                 fingerprint: str | None = None, plaintext: bool = False,
                 tls_key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self.identity = identity
        self.token = token
        self.tls_dir = tls_dir
        token_fp = parse_token(token)[1] if token else None
        self.fingerprint = tls_.check_fingerprint(fingerprint) if fingerprint else token_fp
        self.plaintext = plaintext
        self.tls_key = None if plaintext else (tls_key or tls_.new_tls_key())
        self.tls_ca: bytes | None = None  # the swarm CA, pinned once verified
        self.tls_certificate: bytes | None = None  # this peer's leaf from the last Join
        self.secure = False  # whether the channel to the coordinator is TLS
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
        # the whole view of `known_epoch` (None while none is held): what deltas apply to
        self._view_proto: pb.SwarmView | None = None
        self.lease_s = 10.0
        self.heartbeat_s = 2.0
        self.lease_expires = 0.0
        self.rejoins = 0
        self._join_args: tuple[Benchmark, str] | None = None
        self._last_step = 0
        self.relay = False  # Join says this peer offers to relay (`shoal peer --relay`)
        #: the address the coordinator registered at the last Join (JoinReply.address), or the
        #: one announced since (`announce_address`)
        self.registered_address = ""
        self._announced: tuple[str, str] | None = None  # (address, relayed_by), see announce
        self._announce_pending = False
        #: JoinRequest.data_fingerprint: stage 0's data and tokenizer (peer/pipeline/data.py)
        self.data_fingerprint = ""
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
        key = self.identity.public_key
        csr = tls_.csr_for_key(self.identity.peer_id, self.tls_key) if self.tls_key else b""

        def request() -> pb.JoinRequest:  # dated afresh for every attempt (the proof's skew)
            now = self.clock()
            return pb.JoinRequest(
                public_key=key, timestamp=now, benchmark=benchmark.to_proto(), address=address,
                stage_hint=stage_hint, step_hint=step_hint, version=VERSION,
                token_proof=token_proof(self.token, key, now) if self.token else b"",
                tls_csr=csr, relay=self.relay, data_fingerprint=self.data_fingerprint)

        reply = await self._call("Join", request, retry_s, backoff_cap_s=5.0,
                                 retryable=JOIN_RETRYABLE, honour_retry_after=True)
        self._check_tls_reply(reply)  # before anything else in the reply is trusted
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
        self._view_proto = reply.view if reply.HasField("view") else None
        self.lease_s, self.heartbeat_s = reply.lease_seconds, reply.heartbeat_interval
        self.lease_expires = self.clock() + reply.lease_seconds
        self._join_args = (benchmark, address)
        self._last_step = step_hint
        self.registered_address = reply.address or address
        self._announce_pending = self._announced is not None  # a re-join: announce it again
        return JoinResult(reply.certificate, self.coordinator_public_key, reply.run_spec_toml,
                          self.spec, reply.stage, reply.epoch, reply.lease_seconds,
                          reply.heartbeat_interval, reply.swarm_id, reply.view,
                          address=self.registered_address)

    async def heartbeat(self, stats: PeerStats, *, retry_s: float | None = None,
                        unreachable: list[str] | tuple[str, ...] = ()) -> HeartbeatResult:
        """Renew the lease and report `stats`; re-joins if the coordinator forgot this peer.
        `unreachable`: peer ids whose address refused this peer's calls since the last beat
        (peer/pipeline/unreachable.py; the coordinator reads at most 16).

        Raises:
            NotJoined: before join().
            CoordinatorUnavailable: no answer within `retry_s` (default: one lease).
            CoordinatorRefused: refused, also after a re-join attempt.
        """
        if self._join_args is None:
            raise NotJoined("call join() before heartbeat()")
        self._last_step = stats.step
        request = pb.HeartbeatRequest(stats=stats.to_proto(), known_epoch=self.known_epoch,
                                      view_deltas=True, unreachable=list(unreachable))
        announced = self._announced if self._announce_pending else None
        if announced is not None:
            request.address, request.relayed_by = announced
        try:
            reply = await self._call("Heartbeat", request,
                                     self.lease_s if retry_s is None else retry_s,
                                     backoff_cap_s=self.heartbeat_s)
        except CoordinatorRefused as exc:
            if announced is not None and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("the coordinator refused the announced address %s: %s; keeping %s",
                            announced[0], exc, self.registered_address)
                self._announced, self._announce_pending = None, False
                return await self.heartbeat(stats, retry_s=retry_s, unreachable=unreachable)
            if exc.code not in FORGOTTEN:
                raise
            log.warning("coordinator refused our heartbeat (%s); re-joining with stage %d",
                        exc, self.stage)
            benchmark, address = self._join_args
            joined = await self.join(benchmark, address, self.stage, self._last_step)
            self.rejoins += 1
            return HeartbeatResult(joined.epoch, self.lease_expires, joined.stage, "rejoin",
                                   joined.view_proto)
        if announced is not None and self._announced == announced:
            self._announce_pending = False
            self.registered_address = announced[0]
        if (self.tls_certificate and tls_.leaf_not_after(self.tls_certificate) - self.clock()
                < 86400 and reply.action != "drain"):
            # the TLS leaf ends within a day: a re-join (same stage) issues a new one
            benchmark, address = self._join_args
            with contextlib.suppress(CoordinatorError):
                await self.join(benchmark, address, self.stage, self._last_step,
                                retry_s=self.heartbeat_s)
        if reply.heartbeat_interval > 0 and reply.lease_seconds > 0:  # 0: an older coordinator
            self.heartbeat_s, self.lease_s = reply.heartbeat_interval, reply.lease_seconds
        if reply.HasField("renewed"):
            self.certificate = reply.renewed
            self.certificate_expires = pb.Certificate.FromString(
                reply.renewed.certificate).not_after
        self.epoch, self.stage, self.lease_expires = reply.epoch, reply.stage, reply.lease_expires
        view = self._take_view(reply.view) if reply.HasField("view") else None
        return HeartbeatResult(reply.epoch, reply.lease_expires, reply.stage, reply.action, view,
                               reach=reply.reach, relay=reply.relay)

    def announce_address(self, address: str, relayed_by: str = "") -> None:
        """Tell the coordinator, with the next heartbeats until one is answered, that this peer
        is now reached at `address`: through the relay whose Relay service is `relayed_by`, or
        directly again (`relayed_by` empty). Re-joins keep sending it. The coordinator checks the
        address like Join's and dials it back (HeartbeatResult.reach tells the outcome)."""
        self._announced = (address, relayed_by)
        self._announce_pending = True

    async def connect(self, *, retry_s: float = 300.0) -> None:
        """Reach the coordinator now: its port is probed and, when it speaks TLS, its CA checked
        against the fingerprint (CoordinatorUntrusted at once); retried while nothing answers.
        Optional: the first call does the same."""
        deadline = self.clock() + retry_s
        delay = 0.2
        while True:
            try:
                await self._stub_async()
                return
            except _Unreachable as exc:
                if self.clock() + delay > deadline:
                    raise CoordinatorUnavailable(
                        f"the coordinator at {self.address} did not answer for {retry_s:.0f} s "
                        f"({exc}); check that it runs and that the address is right") from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)

    def tls(self) -> tls_.PeerTls | None:
        """This client's TLS material for peer-to-peer mTLS (protocols.tls.peer_channel), or None
        (plaintext, or no leaf: not joined, or a coordinator without a CA)."""
        if self.tls_key is None or not self.tls_certificate or not self.tls_ca:
            return None
        return tls_.PeerTls(self.tls_ca, self.tls_certificate, self.tls_key)

    def _check_tls_reply(self, reply: pb.JoinReply) -> None:
        """Refuse a Join reply whose CA or key is not the verified coordinator's."""
        ca = bytes(reply.tls_ca)
        if self.secure and ca != self.tls_ca:
            raise CoordinatorUntrusted(
                f"the coordinator at {self.address} answered Join with another CA than the one "
                f"its TLS handshake presented: refusing the reply")
        if self.fingerprint:
            if not ca:
                raise CoordinatorUntrusted(
                    f"the coordinator at {self.address} sent no CA, so its fingerprint "
                    f"{self.fingerprint} cannot be checked: it runs an old version or is "
                    f"another program; refusing to join")
            try:
                tls_.verify_coordinator_ca(ca, self.fingerprint,
                                           bytes(reply.coordinator_public_key))
            except tls_.TlsTrustError as exc:
                raise CoordinatorUntrusted(f"{self.address}: {exc}") from None
        if not ca:
            return
        try:
            named = tls_.coordinator_key_of(ca)
        except tls_.TlsTrustError as exc:
            raise CoordinatorUntrusted(f"{self.address}: {exc}") from None
        if named != bytes(reply.coordinator_public_key):
            raise CoordinatorUntrusted(f"the coordinator at {self.address} presents a key that "
                                       f"its own CA does not name; refusing to join")
        self.tls_ca = ca
        leaf = bytes(reply.tls_certificate)
        if leaf and tls_.leaf_common_name(leaf) != self.identity.peer_id:
            raise CoordinatorUntrusted(f"the coordinator at {self.address} issued a TLS "
                                       f"certificate for another peer id; refusing it")
        if leaf:
            self.tls_certificate = leaf

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
        if reply.epoch >= self.known_epoch:
            self.known_epoch, self._view_proto = reply.epoch, reply
        return SwarmView.from_proto(reply)

    def _take_view(self, view: pb.SwarmView) -> pb.SwarmView | None:
        """A view from a heartbeat reply: a whole one, or a delta applied to the view held
        (`apply_view_delta`); the whole view it makes, or None for a delta from an epoch this
        client does not hold (the next heartbeat asks from the epoch it does hold)."""
        if view.delta_from:
            base = self._view_proto
            if base is None or base.epoch != view.delta_from:
                return None
            view = apply_view_delta(base, view)
        self.known_epoch, self._view_proto = view.epoch, view
        return view

    async def spsa_ledger(self, request: pb.SpsaLedgerRequest, *, retry_s: float = 30.0
                          ) -> pb.SpsaLedgerReply:
        """Closed SPSA steps [from_step, to_step) of the coordinator's ledger (to_step 0: to the
        newest)."""
        return await self._call("GetSpsaLedger", request, retry_s, 2.0)

    async def post_spsa(self, request: pb.SpsaPost, *, retry_s: float = 30.0
                        ) -> pb.SpsaLedgerReply:
        """Post this stage-0 replica's SPSA codes of one step; the reply is the ledger's tail."""
        return await self._call("PostSpsa", request, retry_s, 2.0)

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

    async def _probe(self) -> bytes | None:
        """The swarm CA the coordinator's TLS port presents, verified against the fingerprint;
        None when the port is plaintext (allowed on loopback, or with plaintext=True)."""
        if self.tls_dir:
            return None
        try:
            der = await asyncio.to_thread(tls_.fetch_server_certificate, self.address,
                                          min(self.call_timeout_s, 5.0))
        except ValueError as exc:
            raise CoordinatorRefused(f"coordinator address: {exc}",
                                     grpc.StatusCode.INVALID_ARGUMENT) from None
        except OSError as exc:
            raise _Unreachable(str(exc)) from None
        if self.plaintext:
            if der is not None:
                raise CoordinatorUntrusted(
                    f"the coordinator at {self.address} serves TLS but this client runs "
                    f"--plaintext: drop --plaintext (or run the coordinator with --plaintext)")
            return None
        host = tls_.split_host_port(self.address)[0]
        if der is None:
            if tls_.link_is_local(host):
                return None
            raise CoordinatorUntrusted(
                f"the coordinator at {self.address} serves plaintext gRPC on a non-loopback "
                f"address: start it without --plaintext, or pass --plaintext to this peer too "
                f"(a lab network you trust only)")
        if not self.fingerprint:
            raise CoordinatorUntrusted(
                f"the coordinator at {self.address} serves TLS but this peer has no fingerprint "
                f"to verify it with: use the token file the coordinator wrote (it ends with "
                f"sha256:...), or pass --coordinator-fingerprint sha256:... as `shoal "
                f"coordinator` prints it")
        try:
            ca = tls_.der_to_pem(der)
            tls_.verify_coordinator_ca(ca, self.fingerprint, self.coordinator_public_key
                                       if self._pinned else None)
        except tls_.TlsTrustError as exc:
            raise CoordinatorUntrusted(f"{self.address}: {exc}") from None
        return ca

    async def channel(self) -> grpc.aio.Channel:
        """This client's channel to the coordinator (signed calls; TLS with the swarm's CA when
        the coordinator serves it), made on first use: for the coordinator's other services."""
        await self._stub_async()
        assert self._channel is not None
        return self._channel

    async def _stub_async(self) -> pb_grpc.CoordinatorStub:
        if self._stub is None and not self.tls_dir:
            ca = await self._probe()
            if self._stub is not None:  # another task made it meanwhile
                return self._stub
            if ca is not None:
                self.tls_ca, self.secure = ca, True
        return self._stub_now()

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
            elif self.secure:
                self._channel = grpc.aio.secure_channel(
                    self.address, tls_.coordinator_channel_credentials(self.tls_ca),
                    options=[*options, ("grpc.ssl_target_name_override",
                                        tls_.COORDINATOR_TLS_NAME)],
                    interceptors=interceptors)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=options,
                                                          interceptors=interceptors)
            self._stub = pb_grpc.CoordinatorStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: Any, retry_s: float,
                    backoff_cap_s: float, *, retryable: frozenset = RETRYABLE,
                    honour_retry_after: bool = False) -> Any:
        """One RPC, retried with jittered exponential backoff while the coordinator is away.
        `request` may be a callable that makes the request afresh for each attempt. With
        `honour_retry_after`, RESOURCE_EXHAUSTED carrying a retry-after is waited out (with
        jitter) and retried until `retry_s` runs out."""
        deadline = self.clock() + retry_s
        delay = 0.2
        while True:
            try:
                rpc = getattr(await self._stub_async(), method)
                return await rpc(request() if callable(request) else request,
                                 timeout=self.call_timeout_s)
            except _Unreachable as exc:
                if self.clock() + delay > deadline:
                    raise CoordinatorUnavailable(
                        f"the coordinator at {self.address} did not answer {method} for "
                        f"{retry_s:.0f} s ({exc}); check that it runs and that the address is "
                        f"right") from None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                wait = retry_after_s(exc) if honour_retry_after else None
                if wait is not None:
                    left = deadline - self.clock()
                    if left <= 0:
                        raise CoordinatorUnavailable(
                            f"the coordinator at {self.address} was too busy to admit {method} "
                            f"for {retry_s:.0f} s ({exc.details()}); it is in a join storm or "
                            f"overloaded") from None
                    await asyncio.sleep(min(left, wait + random.uniform(
                        0.0, min(wait * RETRY_AFTER_JITTER, RETRY_AFTER_JITTER_MAX_S))))
                    continue
                if code not in retryable:
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
