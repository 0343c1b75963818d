"""DeMo with its exchange overlapped (`sync.demo.delayed = true`): the round of step t runs in the
background while step t+1 computes, and its packets are applied one step late.

Why: a DeMo round is a few small messages, but over a WAN link each costs round trips, and in the
synchronous mode every replica waits for them at every EndStep before the next step can start.
Here EndStep(t) compresses step t's gradient (momentum, top-k DCT, error feedback, as DeMo), starts
round t, and applies round t-1's relayed packets, which have had a whole step to arrive. That is
the overlapped schedule Psyche runs DisTrO with: each update is one step stale.

Timing, per replica, at EndStep(t) (theta_t the weights after step t):
    packets_t   = compress(grad at theta_{t-1})          -> round t starts, in the background
    theta_t     = sign_step(theta_{t-1}, relayed(round t-1))     (step 1: no update)
At the run's last step (run.steps) round t is awaited and applied too (the flush), so the run
ends with every round applied and the replicas' hashes agree there.

Invariants: every replica applies the same relayed bytes in the same order, so the stage's
replicas stay bit-identical; the hash a replica sends with round t is of theta_{t-1}, which
the round's leader compares as in the synchronous mode (a replica named "diverged" there falls
behind when it applies the round).

Limit (why this is opt-in): a replica behind its stage cannot replay the rounds it missed, since
the round a replica needs next is one it did not take part in and is still in flight for the
others. A joiner, or a replica whose round failed, downloads the stage instead, and again while
each download lands behind the stage: in the swarm test (tests/swarm/test_sync_modes_swarm.py,
a tiny model stepping several times a second) a joiner took 3 downloads. In a swarm that steps
faster than a download takes, a joiner would not catch up; the synchronous mode replays.
"""

from __future__ import annotations

import asyncio

from peer.context import PeerContext
from peer.pipeline.stage_host import StageHost
from peer.sync.base import forget_pending
from peer.sync.demo import DemoMode
from peer.sync.rounds import Arrays, Meta, SyncFailed, SyncRounds
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

RoundResult = tuple[Arrays, Meta]


class DelayedDemoMode(DemoMode):
    """DeMo whose round of step t is applied at step t+1 (see the module docstring)."""

    replays_rounds = False

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.total_steps = spec.run.steps
        self.pending: tuple[int, asyncio.Future] | None = None  # (step, its round) in flight

    def is_last_step(self, step: int) -> bool:
        return self.total_steps > 0 and step >= self.total_steps

    def apply_rounds(self, host: StageHost, rounds: list[RoundResult]) -> float:
        """Each round's sign step in order, then close the step (compute thread)."""
        for result, meta in rounds:
            self.update(host, result, meta)
        norm = self._state(host).norm
        host.finish_step(norm)
        return norm

    def _drop_pending(self) -> None:
        if self.pending is not None and not self.pending[1].done():
            self.pending[1].cancel()
        self.pending = None

    async def round_step(self, ctx: PeerContext, rounds: SyncRounds, step: int) -> pb.StepDone:
        """Step `step`: start its round in the background, apply the previous one's (event
        loop, step lock held)."""
        host = ctx.host
        assert host is not None
        arrays, meta = await host.run(self.contribution, host)
        meta = {**meta, "state_hash": ctx.state_hash}  # of step - 1: compared in the round
        current = asyncio.ensure_future(rounds.run(step, (meta, arrays)))
        previous = self.pending
        if previous is not None and previous[0] != step - 1:
            previous[1].cancel()  # a round of a step this replica did not follow (it fell
            previous = None       # behind and downloaded): not this state's to apply
        self.pending = (step, current)
        awaited = [previous] if previous is not None else []
        if self.is_last_step(step):
            awaited.append(self.pending)
            self.pending = None
        results: list[RoundResult] = []
        for round_step, task in awaited:
            try:
                result, rmeta = await task
            except SyncFailed as exc:
                self._drop_pending()
                ctx.fall_behind(f"DeMo round of step {round_step}: {exc}")
                return pb.StepDone(step=step, stage=host.stage, stepped=False, detail=str(exc))
            if ctx.peer_id in rmeta.get("diverged", "").split(","):
                self._drop_pending()
                ctx.fall_behind(f"round {round_step} began from other weights than the stage's "
                                "lowest-id replica")
                return pb.StepDone(step=step, stage=host.stage, stepped=False,
                                   detail=f"diverged before round {round_step}")
            results.append((result, rmeta))
        forget_pending(host)  # graphs of this step cannot outlive its weights
        norm = await host.run(self.apply_rounds, host, results)
        ctx.state_hash = await host.run(host.state_hash)
        return pb.StepDone(step=step, stage=host.stage, included=rounds.last_included,
                           state_hash=ctx.state_hash, grad_norm=norm, stepped=True)
