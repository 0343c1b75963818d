"""Async DiLoCo in the peer (`sync.diloco.delayed = true`): the outer exchange of round r runs in
the background while round r+1's inner steps compute, and its average is applied one round late.

Timing, exactly as `optim.diloco.DelayedOuter` defines it: at the outer step that ends round r,
with theta_r the shared weights the round started from,
    delta_r     = theta_r - theta_local          -> its round starts now, in the background
    theta_{r+1} = outer_step(theta_r, avg(delta_{r-1}))   (round 0: theta_1 = theta_0)
and every replica restarts from theta_{r+1}. At the run's last outer step the round just started
is awaited and applied too (the flush), so the run ends on fully-applied shared weights and the
replicas' hashes agree there. The wait for avg(delta_{r-1}) costs nothing unless the exchange took
longer than H inner steps.

Invariants: every replica applies the same round results in the same order (the rounds' leaders
send everyone the same bytes), so replicas stay bit-identical. A round that failed for this
replica makes it fall behind and re-download, as in synchronous DiLoCo. A replica that joined
during a round has no pending exchange for it: at its first outer step it applies no average while
the others apply one, the heartbeats' hash check sees the difference, and it re-downloads (one
extra state transfer per such join; no silent drift).
"""

from __future__ import annotations

import asyncio

from peer.context import PeerContext
from peer.pipeline.stage_host import StageHost
from peer.sync.base import forget_pending
from peer.sync.diloco import DilocoMode
from peer.sync.rounds import Arrays, Meta, SyncFailed, SyncRounds
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

RoundResult = tuple[Arrays, Meta]
SKIPPED: RoundResult = ({}, {"skip": "1"})


class DelayedDilocoMode(DilocoMode):
    """DiLoCo with one-round-delayed outer updates: its outer steps override `round_step`.
    A round's aggregate is applied a round later, so a laggard cannot replay it alone: it
    downloads the stage."""

    replays_rounds = False

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.total_steps = spec.run.steps
        self.pending: tuple[int, asyncio.Future] | None = None  # (step, its round) in flight

    def is_last_outer_step(self, step: int) -> bool:
        return self.total_steps > 0 and step + self.inner_steps > self.total_steps

    def apply_rounds(self, host: StageHost, rounds: list[RoundResult]) -> float:
        """Outer steps on each round's average in order, then restart from the shared weights."""
        for result, meta in rounds:
            self.outer_step(host, result, meta)
        return self.restart_round(host)

    async def round_step(self, ctx: PeerContext, rounds: SyncRounds, step: int) -> pb.StepDone:
        """The outer step `step`: start its round in the background, apply the previous one's
        (event loop, step lock held; see the module docstring)."""
        host = ctx.host
        assert host is not None
        arrays, meta = await host.run(self.contribution, host)  # the inner step, then delta_r
        current = asyncio.ensure_future(rounds.run(step, (meta, arrays)))
        previous, self.pending = self.pending, (step, current)
        awaited = [previous] if previous is not None else []
        if self.is_last_outer_step(step):
            awaited.append(self.pending)
            self.pending = None
        results: list[RoundResult] = [] if previous is not None else [SKIPPED]
        for round_step, task in awaited:
            try:
                results.append(await task)
            except SyncFailed as exc:
                if self.pending is not None and not self.pending[1].done():
                    self.pending[1].cancel()
                self.pending = None
                ctx.fall_behind(f"outer round of step {round_step}: {exc}")
                return pb.StepDone(step=step, stage=host.stage, stepped=False, detail=str(exc))
        forget_pending(host)  # graphs of this step cannot outlive its weights
        norm = await host.run(self.apply_rounds, host, results)
        ctx.state_hash = await host.run(host.state_hash)
        return pb.StepDone(step=step, stage=host.stage, included=rounds.last_included,
                           state_hash=ctx.state_hash, grad_norm=norm, stepped=True)
