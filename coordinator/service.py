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
stats every few seconds) and carries the swarm view only when the peer's known epoch is stale,
serialized once for all replies (coordinator/view_replies.py).

This module holds the calls; the coordinator's state, its once-a-second tick, views and
persistence are CoordinatorUpkeep's (coordinator/upkeep.py), and the SPSA ledger's two calls,
registered here too, are coordinator/spsa_calls.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from coordinator.membership import Banned, CoolingDown, Member
from coordinator.messages import (
    MAX_STEP,
    BadRequest,
    check_address,
    check_benchmark,
    check_text,
    is_loopback_peer,
    stats_from_wire,
)
from coordinator.placement import TooSmall
from coordinator.reach import observed_address
from coordinator.suspicion import MAX_REPORTED, expire_reported
from coordinator.upkeep import CoordinatorUpkeep
from protocols import reach as reach_wire
from protocols import shoal_pb2 as pb
from protocols.auth import AdmissionDenied, current_caller, issue_certificate
from protocols.coordinator_client import OBSERVER_STAGE
from protocols.identity import peer_id_of

log = logging.getLogger("shoal.coordinator")

SERVICE_NAME = "shoal.v1.Coordinator"
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a Join turned away (JoinGate)


class DataMismatch(Exception):
    """A joining peer's data fingerprint is not the run's (FAILED_PRECONDITION, not retried)."""


def _serialize(reply: bytes | Message) -> bytes:
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


class CoordinatorService(CoordinatorUpkeep):
    """The servicer: Join, Heartbeat, Leave, GetSwarmView and the SPSA ledger's calls,
    over the state and periodic work of CoordinatorUpkeep (coordinator/upkeep.py).

    Handlers return serialized replies (bytes); register them with `add_to_server`.
    """

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
                    "PostSpsa": method(self.spsa_calls.PostSpsa, pb.SpsaPost),
                    "GetSpsaLedger": method(self.spsa_calls.GetSpsaLedger,
                                            pb.SpsaLedgerRequest)}
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
        # no view when the budget is spent: the peer's heartbeats will get one
        return reply.SerializeToString() + self.views.for_join(now)

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
        out = reply.SerializeToString() + self.views.for_heartbeat(
            now, request.known_epoch, request.view_deltas)
        if self.membership.epoch != epoch_before and self.journal is not None:
            self.journal.request()  # a state change: persist soon, but do not wait for it
        self.heartbeat_seconds.observe(time.perf_counter() - t0)
        return out

    def _beat_allowed(self, member: Member, now: float) -> bool:
        """Take one token from `member`'s heartbeat bucket (coordinator/pacing.py)."""
        return self.beat_limit.allow(member, now)

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
        return self.views.for_request(self.clock())
