"""The gRPC services a peer serves: Stage (forward, backward, p2p deliveries; its EndStep is
peer/step_barrier.py's), Sync, and State (peer/state_service.py).

Every handler validates what it receives through the codec (dtype, shape, size, digest,
finiteness) before torch sees it, answers bad input with INVALID_ARGUMENT and a message, and
keeps serving. Torch work goes to the StageHost's compute thread.

Authorization comes first: every handler asks peer/authz.py's `Policy` about the caller (the
signing identity) and the call's header or request before any payload is decoded; a refused
call gets the policy's status and message, and its stream is drained (bounded) but never
decoded. Whoever a message names as its sender, the services act for the caller: sync parts
are keyed by it, pending graphs are its own (and count against its quota), EndSteps count it.

The services see the peer as a `ServiceContext` (a `PeerContext` plus the replica's sync mode
and rounds), never the daemon; what depends on the sync mode is asked of the mode's hooks
(peer/sync/base.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
import torch

from peer import authz
from peer.consistency import READY_STATES
from peer.context import PeerContext
from peer.pipeline import p2p, wire
from peer.pipeline.links import COMPUTE_S, QUEUED, SERVER_S
from peer.pipeline.stage_host import NotYours, PendingQuota, StageError
from peer.policy import Policy
from peer.recovery.rebuild import catch_up
from peer.state_service import StateService
from peer.step_barrier import StepBarrier
from peer.sync.base import SyncMode
from peer.sync.registry import FORWARD_KINDS
from peer.sync.rounds import ACK_KEY, SyncRounds
from protocols import auth, codec, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.tensor_stream import Assembler, MalformedStream

log = logging.getLogger("shoal.services")
INFERENCE = authz.INFERENCE  # the Forward meta "mode" of an inference call (no graph kept)
class ServiceContext(PeerContext, Protocol):
    """What the services use of the peer: a `PeerContext` plus the replica's sync objects and
    its serving state (all read and written on the event loop)."""

    #: the sync mode of the stage held now (None before the first stage); replaced on a move
    mode: SyncMode | None
    #: the sync rounds of the stage held now (None before the first stage)
    rounds: SyncRounds | None
    #: set once a drain began: no new work is taken
    draining: bool
    #: microbatches being computed here now (the services count them; heartbeats report it)
    queue: int


class NotServing(Exception):
    """This replica does not take the call now (draining, syncing, wrong stage)."""


def _error_chunk(text: str) -> pb.TensorChunk:
    h = pb.CallHeader(kind="error")
    h.meta["error"] = text
    return pb.TensorChunk(header=h)


async def receive_authorized(
    request_iterator: AsyncIterator[pb.TensorChunk], context, policy: Policy,
    method: str, limits: codec.Limits, counter: wire.ByteCounter, kind: str,
    precheck: Callable[[pb.CallHeader], None] | None = None,
) -> tuple[pb.CallHeader, dict]:
    """One tensor call, header first: the CallHeader is authorized (`policy`, which fills its
    sender with the caller), then `precheck`ed (the pending-graph quota), before the payload
    is allocated or decoded. A refused call is drained and aborted with the policy's status
    (context.abort raises)."""
    stream = wire.counted(request_iterator, counter, kind).__aiter__()
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        raise MalformedStream("the stream ended before its CallHeader") from None
    if first.WhichOneof("part") != "header":
        raise MalformedStream("payload data arrived before the CallHeader")
    try:
        await policy.authorize(method, header=first.header)
        if precheck is not None:
            precheck(first.header)
    except (authz.Denied, PendingQuota, NotYours) as exc:
        code, text = ((exc.code, exc.message) if isinstance(exc, authz.Denied)
                      else (grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, PendingQuota)
                            else grpc.StatusCode.PERMISSION_DENIED, f"{method}: {exc}"))
        await tensor_stream.drain(stream)
        await context.abort(code, text)
        raise  # abort raises; this keeps a fake context from going on
    assembler = Assembler(limits)
    try:
        assembler.add(first)
        async for chunk in stream:
            assembler.add(chunk)
        return assembler.finish()
    except codec.CodecError:
        await tensor_stream.drain(stream)  # the sender then sees INVALID_ARGUMENT, not INTERNAL
        raise


class StageService(StepBarrier, pbg.StageServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.d = ctx
        self.policy = Policy.of(ctx)
        self._init_barrier()  # EndStep's (peer/step_barrier.py)
        self._forwarder: p2p.Forwarder | None = None  # made on the first peer-to-peer hop

    def _check_serving(self, header: pb.CallHeader) -> None:
        d = self.d
        if d.draining:
            raise NotServing(f"peer {d.peer_id[:8]} is draining; send to another replica")
        if d.host is None or d.state not in READY_STATES:
            raise NotServing(f"peer {d.peer_id[:8]} is {d.state}, not serving yet")
        if header.stage != d.host.stage:
            raise NotServing(f"this peer holds stage {d.host.stage}, not {header.stage}")
        if header.meta.get("mode") == INFERENCE:
            return  # no graph is kept and no step is taken: the step does not matter
        # peer/authz.py allowed the step: the next one, or a jump up to the attested swarm step
        if (header.step and header.step > d.host.step + 1 and d.mode is not None
                and d.mode.fast_forwards):
            # the sole replica of a rebuilt stage adopts the step (never under SPSA, where every
            # step's codes must be applied: it replays the ledger at EndStep instead)
            catch_up(d, header.step - 1)
        if header.step and header.step != d.host.step + 1:
            raise NotServing(f"microbatch of step {header.step} but this replica is after step "
                             f"{d.host.step}")

    async def _tensor_call(
        self, request_iterator: AsyncIterator[pb.TensorChunk], context, kind: str,
        work: Callable[[pb.CallHeader, torch.Tensor], torch.Tensor],
    ) -> AsyncIterator[pb.TensorChunk]:
        """Receive, authorize and compute one Forward or Backward; answer with the output, or,
        peer to peer (peer/pipeline/p2p.py), pass the output on and answer with an ack."""
        d = self.d
        upstream = None
        method = authz.FORWARD if kind == "forward" else authz.BACKWARD
        try:
            header, arrays = await receive_authorized(
                request_iterator, context, self.policy, method, d.activation_limits(),
                d.counter, "activations", self._quota if kind == "forward" else None)
            received = time.monotonic()
            self._check_serving(header)
            if kind == "forward" and header.meta.get("mode") != INFERENCE:
                await self._drop_departed()
            if set(arrays) != {"x"}:
                raise StageError(f"{kind} expects one tensor named 'x', got {sorted(arrays)}")
            x = torch.from_numpy(arrays["x"].copy())
            if kind == "backward" and p2p.is_p2p(header):
                upstream = d.host.owner_of(header.microbatch_id)  # where its gradient goes
            d.queue += 1
            try:
                t0 = time.monotonic()
                y, compute_s = await d.host.run_timed(work, header, x)
                d.note_compute(int(x.shape[0]), time.monotonic() - t0)
            finally:
                d.queue -= 1
        except codec.CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {exc}")
            return
        except PendingQuota as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{kind}: {exc}")
            return
        except NotYours as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{kind}: {exc}")
            return
        except StageError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{kind}: {exc}")
            return
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        out = pb.CallHeader(kind=kind, microbatch_id=header.microbatch_id, step=header.step,
                            stage=d.host.stage, sender=d.peer_id, sent_at=time.time())
        payload = {"x": y.numpy()}
        if p2p.is_p2p(header) and header.meta.get("mode") is None:
            try:
                out.meta.update(await self._pass_on(kind, header, y, upstream, context))
            except p2p.Downstream as exc:
                await context.abort(grpc.StatusCode.ABORTED, str(exc)[:400])
                return
            payload = {}
        # what the caller's SkipPipe planner needs (peer/pipeline/links.py): the compute this
        # call took here, the whole time it spent here once received (its wait for the compute
        # thread too), and the calls still queued or running here
        out.meta.update({COMPUTE_S: f"{compute_s:.6f}",
                         SERVER_S: f"{time.monotonic() - received:.6f}", QUEUED: str(d.queue)})
        enc = wire.ACTIVATION_ENCODINGS[d.spec.pipeline.activations]
        for chunk in wire.encode_chunks(out, payload, enc):
            d.counter.add("activations", sent=chunk.ByteSize())
            yield chunk

    async def Forward(self, request_iterator, context):
        def work(h: pb.CallHeader, x: torch.Tensor) -> torch.Tensor:
            kind = h.meta.get("mode")
            if kind == INFERENCE:
                return self.d.host.infer(x)
            if kind in FORWARD_KINDS:  # a sync mode's own stream (SPSA's [h+; h-] pairs)
                return self.d.mode.serve_forward(self.d.host, h, x)
            return self.d.host.forward(h.microbatch_id, x, h.step, h.sender)

        async for chunk in self._tensor_call(request_iterator, context, "forward", work):
            yield chunk

    async def Backward(self, request_iterator, context):
        async for chunk in self._tensor_call(
                request_iterator, context, "backward",
                lambda h, g: self.d.host.backward(h.microbatch_id, g, h.sender)):
            yield chunk

    async def _pass_on(self, kind: str, header: pb.CallHeader, y: torch.Tensor,
                       upstream: str | None, context) -> dict[str, str]:
        """Peer to peer: hand this hop's output to the next replica (or the origin) and return
        the ack's meta; p2p.Downstream when that fails (the graph is then dropped)."""
        if self._forwarder is None:
            self._forwarder = p2p.Forwarder(self.d)
        mb_id, left = header.microbatch_id, context.time_remaining()
        host = self.d.host
        try:
            if kind == "forward":
                return await self._forwarder.pass_forward(header, y, left)
            if upstream is None:
                raise p2p.Downstream(f"{p2p.DOWNSTREAM}stage {host.stage} held no graph owner "
                                     f"for {mb_id[:40]}")
            return await self._forwarder.pass_backward(header, y, upstream, left)
        except p2p.Downstream:
            if kind == "forward":
                host.forget(mb_id)
            raise

    async def Deliver(self, request_iterator, context):
        """Peer to peer: the last activation or the input gradient of a microbatch this
        peer's driver has outstanding (peer/pipeline/p2p.py), from a block replica it expects
        it from."""
        d = self.d

        def expected(h: pb.CallHeader) -> None:
            sender = d.view.peer(h.sender) if d.view is not None else None
            try:
                d.inbox.check(h.microbatch_id, h.kind, h.sender,
                              sender.stage if sender is not None else -1,
                              h.meta.get(p2p.NONCE, ""))
            except p2p.NotExpected as exc:
                raise NotYours(str(exc)) from None

        try:
            header, arrays = await receive_authorized(
                request_iterator, context, self.policy, authz.DELIVER, d.activation_limits(),
                d.counter, "activations", expected)
            if set(arrays) != {"x"}:
                raise StageError(f"a delivery carries one tensor named 'x', got {sorted(arrays)}")
            taken = p2p.parse_taken(header.meta.get(p2p.TAKEN, ""))
            sender = d.view.peer(header.sender) if d.view is not None else None
            d.inbox.deliver(header.microbatch_id, header.kind, header.sender,
                            sender.stage if sender is not None else -1,
                            header.meta.get(p2p.NONCE, ""), torch.from_numpy(arrays["x"].copy()),
                            taken)
        except (codec.CodecError, StageError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Deliver: {exc}")
        except p2p.NotExpected as exc:  # it went away meanwhile (timed out, dropped)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"Deliver: {exc}")
        return pb.Delivered()

    def _quota(self, header: pb.CallHeader) -> None:
        """Refuse (PendingQuota) a training forward whose graph would not fit its sender's
        quota, from the header's shape, before its payload is read."""
        host = self.d.host
        if (host is None or header.meta.get("mode") or not header.tensors
                or not header.tensors[0].shape):
            return
        host.check_quota(header.sender, header.microbatch_id, int(header.tensors[0].shape[0]))

    async def _drop_departed(self) -> None:
        """Graphs of senders that left the swarm will get no backward: drop them (and those
        of ended steps, or older than their TTL) before a new one is kept."""
        host = self.d.host
        gone = authz.departed_senders(self.d.view, {p.owner for p in list(host.pending.values())})
        if gone:
            dropped = await host.run(host.forget_owner, gone)
            log.info("dropped %d pending graphs of %d departed senders", dropped, len(gone))

class SyncService(pbg.SyncServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.d = ctx
        self.policy = Policy.of(ctx)

    async def Exchange(self, request_iterator, context):
        d = self.d
        try:
            header, arrays = await receive_authorized(
                request_iterator, context, self.policy, authz.EXCHANGE, d.sync_limits(),
                d.counter, f"sync:{d.spec.sync.mode}")
            if d.rounds is None:
                raise NotServing("this peer holds no stage yet")
            if d.state not in READY_STATES and header.meta.get("replay") != "1":
                # re-downloading: it cannot aggregate a round it will not take part in (the
                # caller tries the next replica); the rounds it kept it still serves
                raise NotServing(f"peer {d.peer_id[:8]} is {d.state}: not aggregating rounds")
            if header.meta.get("replay") != "1":  # the member fails over without this ack
                await context.send_initial_metadata(((ACK_KEY, "1"),))
            # the part is keyed by the signing caller (the policy bound header.sender to it)
            result, meta = await d.rounds.serve(header, arrays, header.sender)
        except codec.CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sync: {exc}")
            return
        except (NotServing, ValueError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"sync: {exc}")
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "sync round did not complete")
            return
        out = pb.CallHeader(kind="sync", step=header.step, stage=header.stage, sender=d.peer_id)
        out.meta.update(meta)
        for chunk in wire.encode_chunks(out, result, pb.RAW):
            d.counter.add(f"sync:{d.spec.sync.mode}", sent=chunk.ByteSize())
            yield chunk


def serve(ctx: ServiceContext, address: str,
          credentials: grpc.ServerCredentials | None = None, *,
          reach: pbg.ReachServicer | None = None, relay: pbg.RelayServicer | None = None,
          ) -> tuple[grpc.aio.Server, int]:
    """A gRPC server with the Stage, Sync and State services of `ctx`, listening on `address`
    (HOST:PORT, port 0: any); every call is authenticated against the swarm's coordinator (its
    key and swarm id from `ctx.client` once joined) and refused from revoked peers. With
    `credentials` (protocols.tls.PeerServerTls) it serves mTLS only, and a client certificate
    must name the call's signer (AuthInterceptor). `reach` (peer/reach.py) answers the
    coordinator's dial-back; `relay` (protocols.relay.RelayHub, `shoal peer --relay`) carries
    unreachable peers' connections. Returns the server (not started) and its port (0 when the
    address is in use)."""
    server = grpc.aio.server(
        options=tensor_stream.grpc_options(),
        interceptors=[auth.AuthInterceptor(
            issuer_public_key=lambda: ctx.client.coordinator_public_key if ctx.client else b"",
            swarm_id=lambda: ctx.client.swarm_id if ctx.client else "",
            is_member=lambda pid: not (ctx.view and pid in ctx.view.revoked),
            key_only_methods=frozenset(),
        )],
    )
    pbg.add_StageServicer_to_server(StageService(ctx), server)
    pbg.add_SyncServicer_to_server(SyncService(ctx), server)
    pbg.add_StateServicer_to_server(StateService(ctx), server)
    if reach is not None:
        pbg.add_ReachServicer_to_server(reach, server)
    if relay is not None:
        pbg.add_RelayServicer_to_server(relay, server)
    if credentials is not None:
        return server, server.add_secure_port(address, credentials)
    return server, server.add_insecure_port(address)

