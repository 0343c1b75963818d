"""The Coordinator gRPC service: Join, Heartbeat, Leave, GetSwarmView.

Every call has already passed `protocols.auth.AuthInterceptor` (signature, time, nonce,
certificate, membership) when a handler here runs; Join is signed by the joining key itself and
this module decides its admission (join token proof or allow-list). Handlers then validate what
the interceptor cannot see, the message fields, and refuse nonsense with INVALID_ARGUMENT and a
message naming the field; a refused call never disturbs the others.

Reachability (coordinator/reach.py): Join registers an empty host (":PORT") as the host the call
came from and answers the result in JoinReply.address; after a join, and after an address a
heartbeat announces, the member is dialled back off the calling path, and every heartbeat reply
carries its reach (and, when unreachable, the relay to attach to).

Load (issue #19, coordinator/pacing.py): every JoinReply and HeartbeatReply tells the peer the
heartbeat period and lease to use, the run spec's in swarms of up to 64 peers and slower ones in
larger swarms, so that heartbeats take about half a core at their measured cost; each member's
lease is the one it was told. Joins are admitted at a rate (and with at most 64 in flight, and
not while the event loop lags); the others get RESOURCE_EXHAUSTED with `retry-after-ms`, which
CoordinatorClient.join honours. Views sent with replies in large swarms stay under a byte
budget. While Joins are being turned away, leases get one lease of grace.

Cost model (the budget is 1000 peers at 1 Hz, p99 < 50 ms on 2 cores): a heartbeat is one dict
lookup, a stats check and an O(1) update; it writes nothing to disk (the journal saves leases and
stats every few seconds) and carries the swarm view only when the peer's known epoch is stale:
to a client that applies them (HeartbeatRequest.view_deltas), only what changed since its known
epoch (coordinator/views.py).
Views are built at most every VIEW_MIN_INTERVAL_S (a burst of joins would otherwise rebuild a
thousand-peer view per heartbeat); a view carries its own epoch, so a peer sent a slightly older
view simply receives the newer one on a later heartbeat. Each view is serialized once: handlers
return the reply's bytes, a small reply followed by the cached bytes of its `view` field
(protobuf merges concatenated messages, so the peer parses an ordinary reply). Copying a
thousand-peer view into every reply instead costs ~0.3 ms per heartbeat during a join storm.
Views carry the stats a router needs (state, samples/s, queue, step, loss), not byte counters:
the full numbers are on the HTTP status API. Stats change without moving the epoch, so a view
asked for by GetSwarmView is also rebuilt once it is VIEW_STATS_MAX_AGE_S old (a swarm whose
membership never changes would otherwise serve the steps and gradient norms of its start).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from coordinator.assignment import rebalance_due
from coordinator.ca import CoordinatorCA
from coordinator.gcpolicy import GcPolicy
from coordinator.ledger import (
    MAX_EXPECT,
    LedgerBehind,
    LedgerRefused,
    SpsaLedger,
    ledger_reply,
    training_stage0,
)
from coordinator.membership import Banned, CoolingDown, Member, Membership
from coordinator.messages import (
    MAX_STEP,
    BadRequest,
    check_address,
    check_benchmark,
    check_text,
    heartbeat_kinds,
    is_loopback_peer,
    stats_from_wire,
)
from coordinator.pacing import JoinGate, Pacer, ViewBudget
from coordinator.placement import TooSmall
from coordinator.reach import Reachability, observed_address
from coordinator.store import Batch, Journal, StoreError
from coordinator.suspicion import MAX_REPORTED, expire_reported
from coordinator.views import ViewCache, ViewSnapshot
from protocols import reach as reach_wire
from protocols import shoal_pb2 as pb
from protocols.auth import Admission, AdmissionDenied, current_caller, issue_certificate
from protocols.coordinator_client import OBSERVER_STAGE, VERSION
from protocols.identity import Identity, peer_id_of
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.coordinator")

SERVICE_NAME = "shoal.v1.Coordinator"
VIEW_MIN_INTERVAL_S = 0.25
VIEW_STATS_MAX_AGE_S = 1.0
# Heartbeat rate limit per member, a token bucket: it refills at BEAT_RATE_FACTOR times the
# spec's rate (1 / membership.heartbeat_s) and holds a lease's worth of beats twice over plus
# BEAT_BURST_SLACK (retries, a client catching up after a stall), so an honest peer never
# meets it; a peer beating much faster gets RESOURCE_EXHAUSTED.
BEAT_RATE_FACTOR = 2.0
BEAT_BURST_SLACK = 4.0
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a Join turned away (JoinGate)


class DataMismatch(Exception):
    """A joining peer's data fingerprint is not the run's (FAILED_PRECONDITION, not retried)."""


def _serialize(reply: bytes | Message) -> bytes:
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


class CoordinatorService:
    """The servicer, plus the periodic tick (expiry, history, rebalancing) and the view cache.

    Handlers return serialized replies (bytes); register them with `add_to_server`.
    """

    def __init__(self, *, spec: RunSpec, swarm_id: str, identity: Identity,
                 admission: Admission, membership: Membership, serial: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.spec_toml = spec.to_toml()
        self.swarm_id = swarm_id
        self.identity = identity
        self.admission = admission
        self.membership = membership
        self.serial = serial
        self.observers: dict[str, float] = {}  # peer id -> certificate expiry
        self.clock = clock
        self.cert_ttl_s = spec.membership.certificate_s
        self.started_at = clock()
        self.restarts = 0
        self.grpc_address = ""
        self.version = VERSION
        self.loop_lag_s = 0.0  # worst event-loop lag of the last seconds (set by main)
        self.loop_lag_now_s = 0.0  # the event loop's lag at its last sample (set by main)
        self.journal: Journal | None = None
        self.ca: CoordinatorCA | None = None  # the swarm's TLS CA (set by coordinator.main)
        self.tls = False  # whether the gRPC port serves TLS (set by coordinator.main)
        self.join_token_file = ""  # the join token's path, for the dashboard (set by main)
        self.last_rebalance = clock()
        self.rejected: dict[str, int] = {}  # INVALID_ARGUMENT / PERMISSION_DENIED by method
        self.heartbeat_seconds = _Histogram((0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05))
        self._view: ViewSnapshot | None = None
        self._views = ViewCache()  # members' serialized view entries (coordinator/views.py)
        self._saved_meta: dict[str, str] = {}
        #: the first peer's data fingerprint, when the spec has none (kept in the store's meta)
        self.data_fingerprint = ""
        self.spsa_ledger = (SpsaLedger(spec.sync.spsa.samples_per_step, spec.sync.timeout_s,
                                       verify=spec.sync.spsa.verify,
                                       tolerance=spec.sync.spsa.verify_tolerance,
                                       repair=spec.sync.spsa.verify_repair)
                            if spec.sync.keeps_ledger else None)
        self.beat_kinds = heartbeat_kinds(spec.sync.mode)
        ms = spec.membership
        self.beat_rate = BEAT_RATE_FACTOR / ms.heartbeat_s
        self.beat_burst = 2.0 * ms.lease_s / ms.heartbeat_s + BEAT_BURST_SLACK
        # the period and lease told to peers (coordinator/pacing.py), and Join back-pressure
        self.pacer = Pacer(ms.heartbeat_s, ms.lease_s)
        self.join_gate = JoinGate()
        self.view_budget = ViewBudget()  # view bytes per second sent in large swarms
        self._cpu_mark = (time.process_time(), 0, 0)  # cpu, heartbeats, joins
        self.gc_policy: GcPolicy | None = None  # set by coordinator.main in its own process
        self.views_sent = {"bytes": 0, "whole": 0, "deltas": 0}  # in replies, since the start
        # reachability (coordinator/reach.py): the dial-back, and the relays on offer
        self.reach = Reachability(identity, membership, ca=lambda: self.ca,
                                  tls=lambda: self.tls, clock=clock,
                                  on_change=self._journal_soon)

    # ------------------------------------------------------------------ RPCs

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the four methods of shoal.v1.Coordinator with byte-passing serializers."""
        def method(handler: Callable, request_type: type[Message]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=request_type.FromString,
                response_serializer=_serialize)

        handlers = {"Join": method(self.Join, pb.JoinRequest),
                    "Heartbeat": method(self.Heartbeat, pb.HeartbeatRequest),
                    "Leave": method(self.Leave, pb.LeaveRequest),
                    "GetSwarmView": method(self.GetSwarmView, pb.SwarmViewRequest),
                    "PostSpsa": method(self.PostSpsa, pb.SpsaPost),
                    "GetSpsaLedger": method(self.GetSpsaLedger, pb.SpsaLedgerRequest)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> bytes:
        now = self.clock()
        caller = current_caller()
        wait_s = self.join_gate.admit(time.monotonic(), self.membership.live_count(),
                                      self.loop_lag_now_s, caller.peer_id if caller else "")
        if wait_s is not None:  # a join storm: come back later (the client honours it)
            self.rejected["Join"] = self.rejected.get("Join", 0) + 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the coordinator is busy admitting other peers; retry in {wait_s:.1f} s",
                trailing_metadata=((RETRY_AFTER_KEY, str(max(1, round(wait_s * 1000)))),))
        try:
            return await self._join(request, context, now)
        finally:
            self.join_gate.done()

    async def _join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext,
                    now: float) -> bytes:
        caller = current_caller()
        try:
            observer = request.stage_hint == OBSERVER_STAGE
            key = bytes(request.public_key)
            if len(key) != 32:
                raise BadRequest(f"public_key must be 32 raw bytes (Ed25519), got {len(key)}")
            if caller is not None and caller.public_key != key:
                raise BadRequest("public_key differs from the key that signed the Join call; "
                                 "sign Join with the key you are joining with")
            address = "" if observer else check_address(
                observed_address(request.address, context.peer()),
                is_loopback_peer(context.peer()))
            bench = None if observer else check_benchmark(request.benchmark)
            n = self.membership.n_stages
            if not OBSERVER_STAGE <= request.stage_hint < n:
                raise BadRequest(f"stage_hint must be -1 (none), -2 (observer) or a stage "
                                 f"0..{n - 1}, got {request.stage_hint}")
            if request.step_hint > MAX_STEP:
                raise BadRequest(f"step_hint must be < 2**53, got {request.step_hint}")
            check_text("version", request.version, 64)
            self.admission.check(key, bytes(request.token_proof), request.timestamp, now)
            self.membership.check_may_join(peer_id_of(key), now)
            tls_fields = self._tls_fields(bytes(request.tls_csr), peer_id_of(key))
            if not observer:
                self._check_data(request.data_fingerprint)
        except DataMismatch as exc:
            await self._refuse(context, "Join", grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except BadRequest as exc:
            await self._refuse(context, "Join", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AdmissionDenied as exc:
            await self._refuse(context, "Join", exc.code, str(exc))
        except Banned as exc:
            await self._refuse(context, "Join", grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except CoolingDown as exc:  # UNAVAILABLE: a restarting client retries by itself
            await self._refuse(context, "Join", grpc.StatusCode.UNAVAILABLE, str(exc))
        peer_id = peer_id_of(key)
        known = self.membership.get(peer_id)
        if known is not None and known.live and not self._beat_allowed(known, now):
            await self._refuse(context, "Join", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"peer {peer_id} joins again much faster than every "
                               f"{self.spec.membership.heartbeat_s:g} s; slow down")
        if request.stage_hint == OBSERVER_STAGE:
            return self._join_observer(peer_id, key, now, tls_fields)
        known_live = known is not None and known.live
        pace = self.pacer.update(self.membership.live_count() + (not known_live))
        try:
            member = self.membership.join(peer_id, key, address, bench, request.stage_hint,
                                          request.step_hint, now, relay=request.relay,
                                          has_leaf=bool(tls_fields.get("tls_certificate")),
                                          lease_s=pace.lease_s)
        except TooSmall as exc:  # not retried by the peer: it exits with this message
            log.warning("peer %s refused: %s", peer_id, exc)
            await self._refuse(context, "Join", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            raise  # context.abort raised already; for readers and type checkers
        # an observer that joins as a member (a peer reads the spec first) is one no longer:
        # its Leave must end the membership (see Leave)
        self.observers.pop(peer_id, None)
        cert = self._issue(member, now)
        await self._commit(context)
        self.reach.check(member, now)  # dials back later, off this call
        log.info("peer %s joined at %s: stage %d, epoch %d", peer_id, address, member.stage,
                 self.membership.epoch)
        reply = pb.JoinReply(
            certificate=cert, coordinator_public_key=self.identity.public_key,
            run_spec_toml=self.spec_toml, stage=member.stage, epoch=self.membership.epoch,
            lease_seconds=pace.lease_s, heartbeat_interval=pace.heartbeat_s,
            swarm_id=self.swarm_id, address=address, **tls_fields)
        view = self.view(now)
        if not self.view_budget.take(len(view.join_field), time.monotonic(),
                                     self.membership.live_count()):
            return reply.SerializeToString()  # no view: the peer's heartbeats will get one
        self._sent_view(len(view.join_field), delta=False)
        return reply.SerializeToString() + view.join_field

    def _check_data(self, fingerprint: str) -> None:
        """DataMismatch when a joining peer's data fingerprint (peer/pipeline/data.py) differs
        from the run spec's data.fingerprint or, when the spec has none, from the first peer's,
        which is then remembered. A peer that reports none is not checked."""
        if not fingerprint:
            return
        check_text("data_fingerprint", fingerprint, 80)
        expected = self.spec.data.fingerprint or self.data_fingerprint
        if not expected:
            self.data_fingerprint = fingerprint
            return
        if fingerprint != expected:
            whose = ("the run spec's data.fingerprint" if self.spec.data.fingerprint else
                     "the data of the run's first peer")
            raise DataMismatch(
                f"this peer's data fingerprint {fingerprint} differs from {whose} {expected}: "
                "its stage-0 data or tokenizer are not the run's; start it with the run's data "
                "(--data or the spec's data.path) and model folder")

    def _tls_fields(self, csr: bytes, peer_id: str) -> dict[str, bytes]:
        """JoinReply's tls_certificate (a leaf for the CSR, issued to the verified caller) and
        tls_ca; BadRequest for a CSR that is malformed or names another peer (coordinator/ca.py)."""
        if self.ca is None:
            return {}
        if not csr:
            return {"tls_ca": self.ca.cert_pem}
        try:
            return {"tls_certificate": self.ca.sign(csr, peer_id), "tls_ca": self.ca.cert_pem}
        except ValueError as exc:
            raise BadRequest(f"tls_csr: {exc}") from None

    def _join_observer(self, peer_id: str, key: bytes, now: float,
                       tls_fields: dict[str, bytes]) -> bytes:
        """An observer (export, inspection) gets a certificate and the view, but no stage."""
        self.serial += 1
        cert = issue_certificate(self.identity, key, self.swarm_id, self.cert_ttl_s, now,
                                 self.serial, role="observer")
        self.observers[peer_id] = now + self.cert_ttl_s
        for pid in [p for p, t in self.observers.items() if t < now]:
            del self.observers[pid]
        log.info("observer %s joined", peer_id)
        reply = pb.JoinReply(
            certificate=cert, coordinator_public_key=self.identity.public_key,
            run_spec_toml=self.spec_toml, stage=OBSERVER_STAGE, epoch=self.membership.epoch,
            lease_seconds=self.spec.membership.lease_s,
            heartbeat_interval=self.spec.membership.heartbeat_s, swarm_id=self.swarm_id,
            **tls_fields)
        return reply.SerializeToString() + self.view(now).join_field

    def is_member(self, peer_id: str) -> bool:
        """Members with a live lease, and observers until their certificate expires."""
        if self.membership.is_member(peer_id):
            return True
        until = self.observers.get(peer_id)
        return until is not None and until >= self.clock()

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
                        ) -> bytes:
        t0 = time.perf_counter()
        now = self.clock()
        caller = current_caller()
        if caller is None:  # only without the interceptor (a misconfigured server)
            await self._refuse(context, "Heartbeat", grpc.StatusCode.UNAUTHENTICATED,
                               "unsigned heartbeat; sign calls with protocols.auth")
        member = self.membership.get(caller.peer_id)
        if member is not None and member.live and not self._beat_allowed(member, now):
            await self._refuse(context, "Heartbeat", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"peer {caller.peer_id} heartbeats much faster than every "
                               f"{self.spec.membership.heartbeat_s:g} s "
                               f"(membership.heartbeat_s); slow down")
        if len(request.unreachable) > MAX_REPORTED:
            await self._refuse(context, "Heartbeat", grpc.StatusCode.INVALID_ARGUMENT,
                               f"a heartbeat reports at most {MAX_REPORTED} unreachable peers "
                               f"({len(request.unreachable)} given)")
        try:
            stats = stats_from_wire(request.stats, self.beat_kinds, self.membership.n_stages)
            moved = self.reach.announced(request, context.peer())
        except BadRequest as exc:
            await self._refuse(context, "Heartbeat", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        epoch_before = self.membership.epoch
        pace = self.pacer.pace
        try:
            member = self.membership.heartbeat(caller.peer_id, stats, now, pace.lease_s)
        except KeyError:
            await self._refuse(context, "Heartbeat", grpc.StatusCode.PERMISSION_DENIED,
                               f"peer {caller.peer_id} is not a member (its lease lapsed or it "
                               f"left); re-join the coordinator")
        for peer_id in expire_reported(self.membership, member.peer_id, request.unreachable,
                                       now, self._silence_grace()):
            log.info("peer %s expired: unreachable, reported by %s", peer_id, member.peer_id)
        was_relayed_by = member.relayed_by
        if moved is not None and self.membership.change_address(member.peer_id, *moved, now):
            log.info("peer %s now at %s%s", member.peer_id, moved[0],
                     f" (relayed by {moved[1]})" if moved[1] else "")
            if was_relayed_by and not moved[1]:  # its relay failed it (peer/relayed.py)
                self.reach.relay_lost(was_relayed_by, now)
            self.reach.check(member, now)
        reply = pb.HeartbeatReply(epoch=self.membership.epoch, lease_expires=member.lease_expires,
                                  stage=member.stage, action=member.pending_action,
                                  reach=member.reach, heartbeat_interval=pace.heartbeat_s,
                                  lease_seconds=pace.lease_s)
        if member.reach == reach_wire.UNREACHABLE:
            reply.relay = self.reach.relay_for(member)
        member.pending_action = ""
        cert = caller.certificate
        if cert is not None and cert.not_after - now < self.cert_ttl_s / 3:
            reply.renewed.CopyFrom(self._issue(member, now))
        out = reply.SerializeToString()
        if request.known_epoch != self.membership.epoch and not self.view_budget.empty(
                time.monotonic(), self.membership.live_count()):
            view = self.view(now)
            if view.epoch != request.known_epoch:
                field = (self._views.delta_field(self.membership, view, request.known_epoch)
                         if request.view_deltas and request.known_epoch else None)
                field = field or view.heartbeat_field
                if self.view_budget.take(len(field), time.monotonic(),
                                         self.membership.live_count()):
                    out += field
                    self._sent_view(len(field), delta=field is not view.heartbeat_field)
        if self.membership.epoch != epoch_before and self.journal is not None:
            self.journal.request()  # a state change: persist soon, but do not wait for it
        self.heartbeat_seconds.observe(time.perf_counter() - t0)
        return out

    @property
    def relay_address(self) -> str:
        """host:port of this coordinator's own Relay service, named to unreachable members; ""
        while it runs none (coordinator.main sets it when it serves one)."""
        return self.reach.relay_address

    @relay_address.setter
    def relay_address(self, value: str) -> None:
        self.reach.relay_address = value

    def _journal_soon(self) -> None:
        if self.journal is not None:
            self.journal.request()

    def _beat_allowed(self, member: Member, now: float) -> bool:
        """Take one token from `member`'s heartbeat bucket (see BEAT_RATE_FACTOR)."""
        tokens = self.beat_burst if member.beat_tokens < 0 else min(
            self.beat_burst, member.beat_tokens + max(0.0, now - member.beat_at) * self.beat_rate)
        member.beat_at = now
        if tokens < 1.0:
            member.beat_tokens = tokens
            return False
        member.beat_tokens = tokens - 1.0
        return True

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
                    ) -> Message:
        caller = current_caller()
        if caller is None:
            await self._refuse(context, "Leave", grpc.StatusCode.UNAUTHENTICATED,
                               "unsigned Leave; sign calls with protocols.auth")
        try:
            reason = check_text("reason", request.reason, 200) or "leaving"
        except BadRequest as exc:
            await self._refuse(context, "Leave", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        observer = self.observers.pop(caller.peer_id, None) is not None
        if observer and not self.membership.is_member(caller.peer_id):
            return pb.LeaveReply()
        self.membership.leave(caller.peer_id, reason, self.clock())
        await self._commit(context)
        log.info("peer %s left: %s", caller.peer_id, reason)
        return pb.LeaveReply()

    async def ban(self, peer_id: str, reason: str) -> bool:
        """The operator's `shoal ban`: revoke `peer_id` now (members and observers) and refuse
        its key from now on; durable when this returns. Returns whether it was a live member."""
        now = self.clock()
        self.observers.pop(peer_id, None)
        was_live = self.membership.ban(peer_id, reason, now)
        await self._commit()
        return was_live

    async def GetSwarmView(self, request: pb.SwarmViewRequest,
                           context: grpc.aio.ServicerContext) -> bytes:
        # Asked for: as fresh as is cheap, stats included.
        raw = self.view(self.clock(), max_age_s=0.05, stats_max_age_s=VIEW_STATS_MAX_AGE_S).raw
        self._sent_view(len(raw), delta=False)
        return raw

    def _sent_view(self, n_bytes: int, *, delta: bool) -> None:
        """Count a view (or delta) of `n_bytes` sent in a reply (/metrics; bench.coordinator)."""
        self.views_sent["bytes"] += n_bytes
        self.views_sent["deltas" if delta else "whole"] += 1

    async def PostSpsa(self, request: pb.SpsaPost, context: grpc.aio.ServicerContext
                       ) -> Message:
        """A stage-0 replica's codes of one SPSA step; answers the closed steps from it on."""
        caller = current_caller()
        ledger = self.spsa_ledger
        member = self.membership.get(caller.peer_id) if caller is not None else None
        if ledger is None or member is None or member.stage != 0:
            await self._refuse(context, "PostSpsa", grpc.StatusCode.FAILED_PRECONDITION,
                               "PostSpsa is for the stage-0 replicas of a run with "
                               "sync.mode = 'spsa'")
        try:
            if request.step > MAX_STEP:
                raise BadRequest(f"step must be < 2**53, got {request.step}")
            if len(request.expect) > MAX_EXPECT:
                raise BadRequest(f"expect names {len(request.expect)} replicas; at most "
                                 f"{MAX_EXPECT}")
            stage0 = {x.peer_id for x in self.membership.live_members() if x.stage == 0}
            for pid in request.expect:
                check_text("expect", pid, 128)
                if pid not in stage0:
                    raise BadRequest(f"expect names {pid!r:.40}, which is not a live stage-0 "
                                     f"member; send an empty list to let the coordinator "
                                     f"fill it in")
            expect = list(dict.fromkeys(request.expect)) or training_stage0(self.membership)
            if len(request.checks) > MAX_EXPECT:
                raise BadRequest(f"{len(request.checks)} checks; at most {MAX_EXPECT}")
            checks = [(c.peer, bytes(c.codes), (c.shard, c.shards)) for c in request.checks]
            ledger.post(request.step, caller.peer_id, bytes(request.codes), expect,
                        time.monotonic(), max_start=self.membership.step() + 2,
                        shard=(request.shard, request.shards), checks=checks)
        except LedgerBehind as exc:  # UNAVAILABLE: the client retries; the step may catch up
            await self._refuse(context, "PostSpsa", grpc.StatusCode.UNAVAILABLE, str(exc))
        except (BadRequest, LedgerRefused) as exc:
            await self._refuse(context, "PostSpsa", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._spsa_checks(ledger_reply(ledger, request.step, 0), caller.peer_id, 0)

    def _spsa_checks(self, reply: pb.SpsaLedgerReply, peer_id: str, step: int
                     ) -> pb.SpsaLedgerReply:
        """Verified SPSA: tell a stage-0 caller what it recomputes at `step` if that step is
        open (else at the ledger's next step)."""
        ledger = self.spsa_ledger
        if ledger is not None and ledger.verification is not None:
            if not ledger.next_step <= step <= ledger.next_step + 1:
                step = ledger.next_step
            reply.check_step = step
            reply.check_peers.extend(ledger.checks_for(peer_id, step,
                                                       training_stage0(self.membership)))
        return reply

    async def GetSpsaLedger(self, request: pb.SpsaLedgerRequest,
                            context: grpc.aio.ServicerContext) -> Message:
        if self.spsa_ledger is None:
            await self._refuse(context, "GetSpsaLedger", grpc.StatusCode.FAILED_PRECONDITION,
                               "this run's sync mode is not spsa: there is no ledger")
        self.spsa_ledger.close_due(time.monotonic())
        reply = ledger_reply(self.spsa_ledger, request.from_step, request.to_step)
        caller = current_caller()
        member = self.membership.get(caller.peer_id) if caller is not None else None
        return (self._spsa_checks(reply, member.peer_id, request.from_step)
                if member is not None and member.stage == 0 else reply)

    def _silence_grace(self) -> float:
        """Seconds of a member's silence that are the coordinator's own lag (and a join
        storm's, when its gate is busy), not the member's."""
        return self.loop_lag_s + (self.pacer.pace.lease_s
                                  if self.join_gate.busy(time.monotonic()) else 0.0)

    # ------------------------------------------------------------------ periodic work

    async def tick(self, now: float) -> None:
        """Once a second: expire silent peers, sample the curve, rebalance when due, persist."""
        m = self.membership
        self._pace()
        if self.gc_policy is not None:
            self.gc_policy.tick()
        expired = m.sweep(now, self._silence_grace())
        for peer_id in expired:
            log.info("peer %s expired (lease lapsed)", peer_id)
        # each step below is O(members): let the calls that queued meanwhile run between them,
        # so that a large swarm's tick is several short stalls, not one long one
        await asyncio.sleep(0)
        m.sample_history(now)
        self.reach.tick(now)
        await asyncio.sleep(0)
        if self.spsa_ledger is not None:
            self.spsa_ledger.close_due(time.monotonic())
        move = None
        if rebalance_due(self.last_rebalance, now, self.spec.membership.rebalance_s):
            self.last_rebalance = now
            move = m.rebalance(now)
            if move is not None:
                log.info("rebalance: peer %s stage %d -> %d", move.peer_id, move.from_stage,
                         move.to_stage)
            await asyncio.sleep(0)
        placed = m.place_relayed(now) if move is None else None
        if placed is not None:
            move = placed
            log.info("placement: peer %s stage %d -> %d (%s)", placed.peer_id, placed.from_stage,
                     placed.to_stage, "relayed: to a driver's stage" if placed.to_stage == 0
                     else "reachable: partners a relayed replica")
        if expired or move is not None:
            await self._commit()

    def _pace(self) -> None:
        """Feed the pacer this process's CPU per heartbeat since the last tick (a second
        without Joins only: a join storm's CPU is not the cost of a beat), or the Join gate
        what the Joins cost; recompute the pace for the live swarm."""
        c = self.membership.counters
        cpu, beats, joins = time.process_time(), c["heartbeats"], c["joins"] + c["rejoins"]
        cpu0, beats0, joins0 = self._cpu_mark
        self._cpu_mark = (cpu, beats, joins)
        if joins == joins0:
            self.pacer.observe(cpu - cpu0, beats - beats0)
        else:  # what the beats did not take went to the Joins (and the turned-away ones)
            self.join_gate.observe(max(0.0, cpu - cpu0 - (beats - beats0) * self.pacer.cost_s),
                                   joins - joins0)
        live = self.membership.live_count()
        self.pacer.update(live)


    def view(self, now: float, max_age_s: float = VIEW_MIN_INTERVAL_S,
             stats_max_age_s: float = math.inf) -> ViewSnapshot:
        """The swarm view, rebuilt when the epoch moved (at most every `max_age_s`) or when its
        stats are older than `stats_max_age_s`."""
        snap = self._view
        if snap is None or (now - snap.built_at >= max_age_s
                            and (snap.epoch != self.membership.epoch
                                 or now - snap.built_at >= stats_max_age_s)):
            snap = self._view = self._views.snapshot(self.membership, self.swarm_id, now)
        return snap

    def build_view(self) -> pb.SwarmView:
        """The current membership as a SwarmView message (live members only)."""
        return pb.SwarmView.FromString(self._views.build(self.membership, self.swarm_id))

    # ------------------------------------------------------------------ persistence

    def collect(self, progress: bool) -> Batch:
        """The journal's batch: structural changes always, leases/stats/history when periodic."""
        changed, deleted, events = self.membership.take_changes()
        batch = Batch(members=changed, deleted=deleted, events=events,
                      bans=self.membership.take_bans())
        if progress:
            batch.progress = self.membership.take_progress()
            batch.history = self.membership.history.take_unsaved()
        meta = {"epoch": str(self.membership.epoch), "serial": str(self.serial)}
        if self.data_fingerprint:
            meta["data_fingerprint"] = self.data_fingerprint
        batch.meta = {k: v for k, v in meta.items() if self._saved_meta.get(k) != v}
        self._saved_meta.update(meta)
        return batch

    async def _commit(self, context: grpc.aio.ServicerContext | None = None) -> None:
        """Wait until the changes so far are on disk; a failed write refuses the call."""
        if self.journal is None:
            return
        try:
            await self.journal.commit()
        except StoreError as exc:
            if context is None:
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{exc}; the coordinator cannot save state (disk full or "
                                f"read-only?); retry later")

    # ------------------------------------------------------------------ helpers

    def _issue(self, member: Member, now: float) -> pb.SignedCertificate:
        self.serial += 1
        cert = issue_certificate(self.identity, member.public_key, self.swarm_id,
                                 self.cert_ttl_s, now, self.serial)
        self.membership.note_certificate(member.peer_id, now + self.cert_ttl_s)
        return cert

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str,
                      code: grpc.StatusCode, message: str) -> None:
        self.rejected[method] = self.rejected.get(method, 0) + 1
        log.debug("%s refused (%s): %s", method, code.name, message)
        await context.abort(code, message)


class _Histogram:
    """A Prometheus-style cumulative histogram of durations in seconds."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1
