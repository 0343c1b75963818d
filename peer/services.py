"""The gRPC services a peer serves: Stage (forward, backward, end of step, p2p deliveries), Sync,
and State (peer/state_service.py).

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

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from peer import authz
from peer.consistency import READY_STATES
from peer.context import PeerContext
from peer.pipeline import p2p, wire
from peer.pipeline.deadline import MeasuredDeadline
from peer.pipeline.links import COMPUTE_S, QUEUED, SERVER_S
from peer.pipeline.stage_host import NotYours, PendingQuota, StageError
from peer.recovery.rebuild import catch_up
from peer.state_service import StateService
from peer.sync.base import SyncMode
from peer.sync.registry import FORWARD_KINDS
from peer.sync.replay import replay_rounds
from peer.sync.rounds import ACK_KEY, DEAD_PROBE_AFTER_S, SyncRounds
from peer.sync.rounds import PROBE_S as DEAD_PROBE_S
from protocols import auth, codec, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.tensor_stream import Assembler, MalformedStream

log = logging.getLogger("shoal.services")
#: an EndStep this many rounds ahead of the replica or fewer: the rounds are replayed before it
#: is answered (see `StageService.EndStep`)
REPLAY_INLINE = 8
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
    request_iterator: AsyncIterator[pb.TensorChunk], context, policy: authz.Policy,
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


@dataclass
class _StepEnds:
    """EndStep calls of one step, and the one task that syncs and steps the stage for them."""

    expected: set[str]
    got: set[str] = field(default_factory=set)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    gone: set[str] = field(default_factory=set)  # their address refused a connection


class StageService(pbg.StageServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.d = ctx
        self.policy = authz.Policy.of(ctx)
        self._ends: dict[int, _StepEnds] = {}
        self._barrier = MeasuredDeadline()  # the wait for a step's EndSteps
        # stage-0 replicas whose EndStep the last barrier stepped without (frozen, cut off):
        # not waited for until one of their EndSteps comes in again (rounds.py does the same)
        self._suspects: set[str] = set()
        self._abstaining: set[asyncio.Task] = set()
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

    def _abstain(self, request: pb.StepEnd) -> None:
        """This replica will not contribute to round `request.step` (it is re-downloading): tell
        the round's aggregator, which may be this very replica (the lowest id), so that neither
        the round nor the download, which waits for the step, sits out the sync timeout."""
        d = self.d
        if (d.rounds is None or not request.stage_replicas or d.mode is None
                or not d.mode.exchanges(request.step)):
            return
        d.rounds.agreed.setdefault(request.step, list(request.stage_replicas))
        task = asyncio.ensure_future(d.rounds.abstain(request.step))
        self._abstaining.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._abstaining.discard)

    async def EndStep(self, request: pb.StepEnd, context) -> pb.StepDone:
        t0 = time.monotonic()
        done = await self._end_step(request, context)
        done.server_s = time.monotonic() - t0
        return done

    async def _end_step(self, request: pb.StepEnd, context) -> pb.StepDone:
        d = self.d
        try:
            await self.policy.authorize(authz.END_STEP, step_end=request)
        except authz.Denied as exc:
            await context.abort(exc.code, f"EndStep: {exc.message}")
            raise  # abort raises; this keeps a fake context from going on
        host = d.host
        if host is None or host.stage == 0 or d.state not in READY_STATES:
            if d.state == "syncing" and host is not None and host.stage != 0:
                self._abstain(request)
                self._ended(request, carried=False)  # this sender will not send it again
            return pb.StepDone(step=request.step, stepped=False, detail=f"peer is {d.state}")
        if request.step <= host.step:
            return pb.StepDone(step=request.step, stage=host.stage, stepped=False,
                               state_hash=d.state_hash, detail="already past this step")
        # SPSA: the closed set rides on EndStep, and missed steps are replayed, not skipped
        carried = d.mode is not None and d.mode.carries_step(request)
        if request.step > host.step + 1 and carried:  # replay the missed steps instead
            try:
                async with d.step_lock:
                    await d.mode.replay(d, request.step - 1)
            except (RuntimeError, StageError, ValueError) as exc:
                log.warning("stage %d: ledger replay failed: %s", host.stage, exc)
        # round modes: a few rounds missed (a freeze, a download that landed behind) are
        # replayed here, so that this replica takes part in this very round and is back in
        # step with the swarm; further behind, it catches up in the background (fall_behind)
        gap = request.step - 1 - host.step
        if (0 < gap <= REPLAY_INLINE and not carried and d.mode is not None
                and d.mode.replays_rounds and d.rounds is not None):
            async with d.step_lock:
                got = await replay_rounds(d, d.mode, d.rounds)
            if got.rounds:
                log.info("stage %d: replayed %d rounds for EndStep(%d), after step %d",
                         host.stage, got.rounds, request.step, host.step)
        # a carried step never fast-forwards: every step's update must be applied; nor does a
        # step beyond the attested swarm step + 1 (peer/authz.py let it through only because
        # the attestation may lag): the replica re-downloads, from replicas, what is real
        jump_ok = request.step <= self.policy.receiver().jump_bound()
        if request.step > host.step + 1 and (carried or not jump_ok
                                             or not catch_up(d, request.step - 1)):
            d.fall_behind(f"EndStep({request.step}) while after step {host.step}",
                          behind_of=request.step - 1)
            self._abstain(request)
            self._ended(request, carried)
            return pb.StepDone(step=request.step, stage=host.stage, stepped=False,
                               detail="behind; re-downloading the stage")
        if carried:  # the closed set is the whole agreement: no other EndStep to wait for
            try:
                drifted = d.mode.take_step_end(d, request)
            except StageError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"EndStep: {exc}")
                raise  # abort raises; this keeps a fake context from going on
            if drifted:
                d.fall_behind(drifted)
                return pb.StepDone(step=request.step, stage=host.stage, stepped=False,
                                   detail="drifted; re-downloading the stage")
        if d.rounds is not None and request.stage_replicas:
            d.rounds.agreed.setdefault(request.step, list(request.stage_replicas))
        ends = self._ended(request, carried)
        if ends.task is None:
            ends.task = asyncio.ensure_future(self._finish(request.step, ends))
        return await asyncio.shield(ends.task)

    def _ended(self, request: pb.StepEnd, carried: bool) -> _StepEnds:
        """Count `request.sender` as having ended `request.step` here, also when this replica
        could not take part (it was re-downloading): the sender does not send it again, and the
        step's later EndSteps must not wait for it."""
        ends = self._ends.get(request.step)
        if ends is None:
            ends = self._ends[request.step] = _StepEnds(
                expected=set() if carried else set(request.stage0_replicas))
        ends.got.add(request.sender)
        self._suspects.discard(request.sender)
        ends.arrived.set()
        for step, earlier in self._ends.items():  # a sender that moved on is not coming back
            if step < request.step:
                earlier.arrived.set()
        return ends

    def _moved_on(self, step: int) -> set[str]:
        """Stage-0 replicas that already ended a later step here: they ended `step` without this
        replica (their view did not list it yet, as at a swarm's start), so waiting for them
        would wait out the sync timeout, and hold up the replica that did list it."""
        return {s for st, e in self._ends.items() if st > step for s in e.got}

    async def _finish(self, step: int, ends: _StepEnds) -> pb.StepDone:
        """Wait for the step's EndSteps from every stage-0 replica it names (at most the
        measured deadline: peer/pipeline/deadline.py), then sync and step."""
        d = self.d
        started = time.monotonic()
        deadline = started + self._barrier.seconds(d.spec.sync.timeout_s)
        probing: asyncio.Future | None = None
        while True:
            if ends.expected - self._moved_on(step) - ends.gone - self._suspects <= ends.got:
                self._barrier.complete(time.monotonic() - started)
                break
            if probing is None and time.monotonic() - started >= DEAD_PROBE_AFTER_S:
                # a stage-0 replica killed a moment ago is still named by the others until its
                # lease lapses: its port refuses, and every step would wait the deadline for it
                probing = asyncio.ensure_future(self._refusing(ends.expected - ends.got))
            if probing is not None and probing.done():
                ends.gone |= probing.result()
                if ends.gone:
                    ends.arrived.set()
            if time.monotonic() >= deadline:
                missing = sorted(p[:8] for p in ends.expected - ends.got)
                log.warning("step %d: stepping without the EndStep of %s (waited %.1f s)",
                            step, ",".join(missing), time.monotonic() - started)
                self._suspects |= ends.expected - ends.got
                break
            ends.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ends.arrived.wait(),
                                       min(0.25, max(0.05, deadline - time.monotonic())))
        if probing is not None and not probing.done():
            probing.cancel()
        reply = await d.sync_step(step)
        for old in [s for s in self._ends if s < step - 4]:
            del self._ends[old]
        return reply

    async def _refusing(self, peers: set[str]) -> set[str]:
        """The `peers` that cannot be connected to now (`_cannot_connect`), as a killed peer
        whose lease has not lapsed; a frozen or cut-off one is waited for as before."""
        order = sorted(peers)
        answers = await asyncio.gather(*(self._cannot_connect(p) for p in order),
                                       return_exceptions=True)
        gone = {p for p, a in zip(order, answers, strict=True) if a is True}
        if gone:
            log.info("not waiting for the EndStep of %s (it cannot be connected to)",
                     ",".join(sorted(p[:8] for p in gone)))
        return gone

    async def _cannot_connect(self, peer_id: str) -> bool:
        """Whether the channel to `peer_id` fails to connect within DEAD_PROBE_S: nothing
        listens at its address, or whatever answers there (a TCP proxy, the lab's delay relay)
        closes the connection. No call is made, so a live peer logs nothing; a frozen one
        accepts TCP but never completes the handshake, and stays "connecting"."""
        channel = self.d.channel(self.d.address_of(peer_id))
        state = channel.get_state(try_to_connect=True)
        deadline = time.monotonic() + DEAD_PROBE_S
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except TimeoutError:
                return False
            # an open connection that broke goes idle: connect again, or it stays idle
            state = channel.get_state(try_to_connect=True)
        return False


class SyncService(pbg.SyncServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.d = ctx
        self.policy = authz.Policy.of(ctx)

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

