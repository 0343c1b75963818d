"""The peer's side of reachability: answer the coordinator's dial-back, and say what it found.

`ReachService` (service Reach) answers Ping by signing the coordinator's nonce with this peer's
identity key (protocols/reach.py), proving that the member that joined listens at the address
the coordinator registered. It answers the coordinator only: the call must be signed by the key
of the coordinator this peer joined (protocols.auth.AuthInterceptor admits such calls without a
membership certificate, as role "coordinator"; over mTLS the coordinator presents a leaf from its
own CA). Anyone else, members included, gets PERMISSION_DENIED; a malformed ping gets
INVALID_ARGUMENT; the server keeps serving either way.

`ReachNotice` turns the reach each heartbeat reply carries into log lines a volunteer can act
on: once when the coordinator could not dial this peer, once when that changes.
"""

from __future__ import annotations

import logging

import grpc

from protocols import reach as reach_wire
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.auth import COORDINATOR_ROLE, current_caller
from protocols.identity import Identity

log = logging.getLogger("shoal.peer")


class ReachService(pbg.ReachServicer):
    """Reach.Ping for one peer identity (registered by peer/services.serve)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.refused = 0

    async def Ping(self, request: pb.ReachPing, context: grpc.aio.ServicerContext
                   ) -> pb.ReachPong:
        caller = current_caller()
        if caller is None or caller.role != COORDINATOR_ROLE:
            who = f"peer {caller.peer_id}" if caller is not None else "an unsigned caller"
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                               f"Reach.Ping answers only the coordinator this peer joined; "
                               f"{who} is not it")
        nonce = bytes(request.nonce)
        if len(nonce) != reach_wire.NONCE_BYTES:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"nonce must be {reach_wire.NONCE_BYTES} random bytes, got "
                               f"{len(nonce)}")
        if request.peer_id != self.identity.peer_id:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"this is peer {self.identity.peer_id}, not "
                               f"{request.peer_id!r:.40}: the address now belongs to another "
                               f"peer")
        return pb.ReachPong(nonce=nonce, signature=self.identity.sign(
            reach_wire.payload(nonce, self.identity.peer_id)))

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                      message: str) -> None:
        self.refused += 1
        log.info("Reach.Ping refused (%s): %s", code.name, message)
        await context.abort(code, message)


class ReachNotice:
    """Logs this peer's reach as heartbeat replies report it: a warning the first time the
    coordinator reports it unreachable (what was tried, what to do), a line when it changes."""

    def __init__(self) -> None:
        self.reach = ""
        self.relay = ""

    def update(self, reach: str, relay: str, address: str) -> None:
        """One heartbeat reply's `reach` and `relay` for this peer registered at `address`."""
        if not reach or (reach, relay) == (self.reach, self.relay):
            return
        before, self.reach, self.relay = self.reach, reach, relay
        if reach == reach_wire.UNREACHABLE and before != reach_wire.UNREACHABLE:
            port = address.rpartition(":")[2] or "?"
            log.warning(
                "the coordinator cannot reach this peer: it dialled %s back and got no signed "
                "answer, so other peers cannot connect to it either. Open TCP port %s to "
                "inbound connections (router port forwarding, cloud firewall), or pass "
                "--advertise HOST with an address others can reach; %s", address, port,
                f"meanwhile it is to be relayed through {relay}" if relay else
                "otherwise it will be relayed once a relay is offered (the coordinator's, or a "
                "peer started with --relay)")
        elif reach == reach_wire.UNREACHABLE and relay:
            log.info("the coordinator offers relay %s for this unreachable peer", relay)
        elif reach != reach_wire.UNREACHABLE:
            log.info("the coordinator reached this peer at %s (%s)", address, reach)
