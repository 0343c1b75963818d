"""The SPSA ledger's two calls: PostSpsa and GetSpsaLedger (sync.mode = "spsa").

coordinator/ledger.py holds the ledger (the closed steps every stage-0 replica replays) and
coordinator/spsa_verify.py the verification; this module is their gRPC face: it checks a
post's fields and its caller (a live stage-0 member), and tells a verifying replica which
codes it recomputes. coordinator/service.py registers these handlers beside its own; like its
handlers, they run after `protocols.auth.AuthInterceptor` and refuse nonsense with
INVALID_ARGUMENT and a message naming the field, through the service's `refuse` (which counts
refusals for /metrics).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import Message

from coordinator.ledger import (
    MAX_EXPECT,
    LedgerBehind,
    LedgerRefused,
    SpsaLedger,
    ledger_reply,
    training_stage0,
)
from coordinator.membership import Membership
from coordinator.messages import MAX_STEP, BadRequest, check_text
from protocols import shoal_pb2 as pb
from protocols.auth import current_caller

#: aborts a call: (context, method name, status code, message); never returns
Refuse = Callable[[grpc.aio.ServicerContext, str, grpc.StatusCode, str], Awaitable[None]]


class SpsaCalls:
    """PostSpsa and GetSpsaLedger over one run's ledger (None: the run keeps no ledger, and
    both calls answer FAILED_PRECONDITION)."""

    def __init__(self, ledger: SpsaLedger | None, membership: Membership,
                 refuse: Refuse) -> None:
        self.ledger = ledger
        self.membership = membership
        self._refuse = refuse

    async def PostSpsa(self, request: pb.SpsaPost, context: grpc.aio.ServicerContext
                       ) -> Message:
        """A stage-0 replica's codes of one SPSA step; answers the closed steps from it on."""
        caller = current_caller()
        ledger = self.ledger
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
        return self._checks(ledger_reply(ledger, request.step, 0), caller.peer_id, 0)

    async def GetSpsaLedger(self, request: pb.SpsaLedgerRequest,
                            context: grpc.aio.ServicerContext) -> Message:
        if self.ledger is None:
            await self._refuse(context, "GetSpsaLedger", grpc.StatusCode.FAILED_PRECONDITION,
                               "this run's sync mode is not spsa: there is no ledger")
        self.ledger.close_due(time.monotonic())
        reply = ledger_reply(self.ledger, request.from_step, request.to_step)
        caller = current_caller()
        member = self.membership.get(caller.peer_id) if caller is not None else None
        return (self._checks(reply, member.peer_id, request.from_step)
                if member is not None and member.stage == 0 else reply)

    def _checks(self, reply: pb.SpsaLedgerReply, peer_id: str, step: int
                ) -> pb.SpsaLedgerReply:
        """Verified SPSA: tell a stage-0 caller what it recomputes at `step` if that step is
        open (else at the ledger's next step)."""
        ledger = self.ledger
        if ledger is not None and ledger.verification is not None:
            if not ledger.next_step <= step <= ledger.next_step + 1:
                step = ledger.next_step
            reply.check_step = step
            reply.check_peers.extend(ledger.checks_for(peer_id, step,
                                                       training_stage0(self.membership)))
        return reply
