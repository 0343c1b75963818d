"""EndStep on a block replica: the barrier that waits for a step's EndSteps from the stage-0
replicas, then syncs and steps the stage once for all of them.

A mixin of `StageService` (peer/services.py), split out of it by responsibility. A replica that
is a few rounds behind replays them before it answers (`REPLAY_INLINE`); further behind, it
falls behind and catches up in the background. The wait is a measured deadline
(peer/pipeline/deadline.py), not the sync timeout: a frozen or cut-off stage-0 replica is a
suspect that later barriers do not wait for until it sends an EndStep again, and a killed one
(its port refuses) is not waited for at all. The driver's side is peer/pipeline/step_end.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from peer import authz
from peer.consistency import READY_STATES
from peer.pipeline.deadline import MeasuredDeadline
from peer.pipeline.stage_host import StageError
from peer.policy import Policy
from peer.recovery.rebuild import catch_up
from peer.sync.replay import replay_rounds
from peer.sync.rounds import DEAD_PROBE_AFTER_S
from peer.sync.rounds import PROBE_S as DEAD_PROBE_S
from protocols import shoal_pb2 as pb

if TYPE_CHECKING:
    from peer.services import ServiceContext

log = logging.getLogger("shoal.services")
#: an EndStep this many rounds ahead of the replica or fewer: the rounds are replayed before it
#: is answered (see `StepBarrier.EndStep`)
REPLAY_INLINE = 8


@dataclass
class _StepEnds:
    """EndStep calls of one step, and the one task that syncs and steps the stage for them."""

    expected: set[str]
    got: set[str] = field(default_factory=set)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    gone: set[str] = field(default_factory=set)  # their address refused a connection


class StepBarrier:
    """`EndStep` and its barrier (see the module docstring). Uses the service's `d` (the peer)
    and `policy`; `_init_barrier` sets up its own state."""

    d: ServiceContext
    policy: Policy

    def _init_barrier(self) -> None:
        self._ends: dict[int, _StepEnds] = {}
        self._barrier = MeasuredDeadline()  # the wait for a step's EndSteps
        # stage-0 replicas whose EndStep the last barrier stepped without (frozen, cut off):
        # not waited for until one of their EndSteps comes in again (rounds.py does the same)
        self._suspects: set[str] = set()
        self._abstaining: set[asyncio.Task] = set()

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
