"""`SyncMode`: how the replicas of one stage agree on each optimizer step, as one abstract class.

The daemon and the services know a sync mode only through these hooks; which class a run uses is
peer/sync/registry.py's business, nowhere else's. Two families:
- `RoundMode` (allreduce.py, demo.py, demo_delayed.py, diloco.py, diloco_delayed.py): the
  stage's replicas run a leader-collects round (peer/sync/rounds.py) on the steps where
  `exchanges(step)`:
  `contribution` (every replica) -> `aggregate` (the round's leader) -> `apply` (every replica,
  the same aggregate bytes);
- modes that exchange nothing between the replicas of a stage and agree otherwise: SPSA
  (spsa.py) gets each step's closed message set with EndStep and overrides the EndStep, forward
  and download hooks.

Threads: "event loop" hooks run on the peer's asyncio loop and must not block it (torch work goes
through `host.run`); "compute thread" hooks run on the StageHost's single compute thread, where
they may take as long as the math takes and are the only place that mutates the stage's tensors.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from peer.context import PeerContext
from peer.pipeline.stage_host import StageError, StageHost
from peer.sync.rounds import LOCAL_STEP, Arrays, Meta, SyncFailed, SyncRounds
from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.sync")
Parts = Mapping[str, tuple[Meta, Arrays]]
#: a stage's state as served to a joiner: (step, state arrays, state hash)
Checkpoint = tuple[int, Mapping[str, object], str]


def forget_pending(host: StageHost) -> None:
    """Drop the graphs of a step: they cannot outlive the weights they were computed with."""
    for mb in list(host.pending):
        host.forget(mb)


class SyncMode(ABC):
    """One replica's side of a sync mode (one instance per replica and stage)."""

    #: the name in `sync.mode` and in the byte counter's kind `sync:<name>`
    name: ClassVar[str]
    #: a joining replica asks for the source's last hash-checked checkpoint
    #: (StateRequest.ledger_snapshot) instead of its live state, and replays from there
    #: (`after_download`). Default False: the live state, as it is.
    joins_from_checkpoint: ClassVar[bool] = False
    #: a replica may adopt a later step without applying the steps between (recovery's
    #: fast-forward, when no replica of the stage applied them). False where every step's
    #: update must be applied (SPSA). Default True.
    fast_forwards: ClassVar[bool] = True
    #: the Forward header meta "mode" values this mode's stage-0 drivers send and its replicas
    #: serve with `serve_forward` (SPSA's perturbed pairs). Default: none.
    forward_kinds: ClassVar[frozenset[str]] = frozenset()
    #: a replica that missed rounds may apply their kept aggregates in order (peer/sync/replay.py)
    #: instead of downloading its stage. Default False.
    replays_rounds: ClassVar[bool] = False

    def exchanges(self, step: int) -> bool:
        """Whether step `step` runs a round with the stage's other replicas (any thread; pure).
        When False, `step` applies `apply(host, {}, LOCAL_STEP)` on this replica alone.
        Default False."""
        return False

    @abstractmethod
    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        """Step the stage with a round's result (or a local step: meta LOCAL_STEP).

        Compute thread; may block. Mutates the host's parameters, optimizer, `mode_state` and
        step counter (through `host.finish_step`). The same bytes must leave every replica
        bit-identical. Returns the gradient norm to report.
        """

    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        """The round's result from its parts (the round's leader; see `RoundMode`). Default: this
        mode runs no rounds, so a part sent to it is refused (ValueError)."""
        raise ValueError(f"sync mode {self.name!r} runs no rounds; it takes no contributions")

    async def step(self, ctx: PeerContext, rounds: SyncRounds, step: int) -> pb.StepDone:
        """Sync and step this replica's stage for `step` (the caller checked that the stage is
        after `step - 1`).

        Event loop, with the step lock held; may wait for the network (a round) up to the sync
        timeout. Mutates the stage (through `apply`) and `ctx.state_hash`; a failed round makes
        the replica `ctx.fall_behind`. Default: the local step.
        """
        return await self.local_step(ctx, step)

    async def local_step(self, ctx: PeerContext, step: int) -> pb.StepDone:
        """A step on this replica alone: nothing on the wire (DiLoCo's inner steps, SPSA)."""
        host = ctx.host
        assert host is not None
        forget_pending(host)
        norm = await host.run(self.apply, host, {}, dict(LOCAL_STEP))
        ctx.state_hash = await host.run(host.state_hash)
        return pb.StepDone(step=step, stage=host.stage, included=1,
                           state_hash=ctx.state_hash, grad_norm=norm, stepped=True)

    # ------------------------------------------------------------------ joining

    def joiner_checkpoint(self) -> Checkpoint | None:
        """The state to serve a joiner that asked for a checkpoint (StateRequest.ledger_snapshot),
        or None to serve the live state. Event loop; must not block. Default None."""
        return None

    async def after_download(self, ctx: PeerContext) -> None:
        """The stage was just downloaded into `ctx.host` (hash-checked): bring it up to date.

        Event loop, before the replica serves or with the step lock held; may wait for the
        network. May mutate the stage (through the compute thread). Default: nothing.
        """
        return None

    # ------------------------------------------------------------------ EndStep and Forward

    def carries_step(self, request: pb.StepEnd) -> bool:
        """Whether this EndStep carries the step's whole agreement (SPSA's closed message set), so
        that no other EndStep of the step need be waited for. Any thread; pure. Default False."""
        return False

    async def replay(self, ctx: PeerContext, to_step: int) -> int:
        """Bring a replica that missed steps up to after `to_step` from the swarm's record of
        them (SPSA: the coordinator's ledger). Event loop, step lock held; may wait for the
        network. Returns the steps replayed. Default: nothing to replay (0)."""
        return 0

    def take_step_end(self, ctx: PeerContext, request: pb.StepEnd) -> str | None:
        """Take what an EndStep for which `carries_step` is True brings (SPSA: the closed set and
        the hash check). Event loop; must not block. Mutates this mode's own state and counts
        bytes in `ctx.counter`. Returns why the replica drifted (it must re-download), or None.
        Raises StageError for a malformed request. Default: nothing to take."""
        return None

    def serve_forward(self, host: StageHost, header: pb.CallHeader, x: torch.Tensor
                      ) -> torch.Tensor:
        """A Forward call whose header meta "mode" is one of `forward_kinds` of some sync mode.
        Compute thread; must not keep graphs or change the stage. Default: refused (StageError),
        since this replica does not run the mode the sender runs."""
        kind = header.meta.get("mode", "")
        raise StageError(f"an {kind} forward needs sync.mode = {kind!r} and a direction j")


class RoundMode(SyncMode):
    """A sync mode whose replicas run a leader-collects round (peer/sync/rounds.py) on every
    step where `exchanges(step)` is True. Their rounds can be replayed: `apply` depends only
    on the aggregate and the state the replicas share."""

    replays_rounds = True

    def exchanges(self, step: int) -> bool:
        """Default: every step runs a round."""
        return True

    @abstractmethod
    def contribution(self, host: StageHost) -> tuple[Arrays, Meta]:
        """This replica's part of the round. Compute thread; may block. May mutate the mode's
        per-replica state (momentum, error feedback, DiLoCo's inner step); never the weights
        a round's result is applied to, except as the mode documents."""

    @abstractmethod
    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        """The round's result from the parts, by peer id (the round's leader only).

        Event loop (inline, CPU work bounded by the stage's size). Deterministic in the parts
        and their ids' order; never raises on bad parts (they are dropped, meta `dropped` says
        why; no usable part: meta `skip`). Must not mutate the parts.
        """

    async def step(self, ctx: PeerContext, rounds: SyncRounds, step: int) -> pb.StepDone:
        """The local step when `exchanges(step)` is False, else the round (`round_step`)."""
        if not self.exchanges(step):
            return await self.local_step(ctx, step)
        return await self.round_step(ctx, rounds, step)

    async def round_step(self, ctx: PeerContext, rounds: SyncRounds, step: int) -> pb.StepDone:
        """Contribute to round `step`, wait for its aggregate and apply it (see `step`)."""
        host = ctx.host
        assert host is not None
        arrays, meta = await host.run(self.contribution, host)
        meta = {**meta, "state_hash": ctx.state_hash}  # of step - 1: compared in the round
        try:
            result, rmeta = await rounds.run(step, (meta, arrays))
        except SyncFailed as exc:
            ctx.fall_behind(str(exc))
            return pb.StepDone(step=step, stage=host.stage, stepped=False, detail=str(exc))
        forget_pending(host)  # graphs of this step cannot outlive its weights
        norm = await host.run(self.apply, host, result, rmeta)
        ctx.state_hash = await host.run(host.state_hash)
        if ctx.peer_id in rmeta.get("diverged", "").split(","):
            ctx.fall_behind(f"round {step} began from other weights than the stage's "
                            "lowest-id replica")
        else:  # for a replica that missed this round (peer/sync/replay.py)
            rounds.keep(step, (result, rmeta), ctx.state_hash)
        return pb.StepDone(step=step, stage=host.stage, included=rounds.last_included,
                           state_hash=ctx.state_hash, grad_norm=norm, stepped=True)


# ---------------------------------------------------------------- helpers of the round modes


def trim_count(trim: float, replicas: int) -> int:
    """Replicas trimmed per side for a fraction `trim`: at least one when trim > 0."""
    return max(1, math.ceil(trim * replicas)) if trim > 0 else 0


def samples_of(meta: Meta) -> int:
    """A part's sample count (0 when missing or malformed)."""
    try:
        return int(meta.get("samples", "0"))
    except ValueError:
        return 0


def dropped_text(dropped: Mapping[str, str]) -> str:
    """Meta `dropped`: who was left out of an aggregate and why, in peer-id order."""
    return "; ".join(f"{rid}: {why}" for rid, why in sorted(dropped.items()))


def skipped(dropped: Mapping[str, str], why: str) -> tuple[Arrays, Meta]:
    """The aggregate of a round with no usable part: every replica steps without an update."""
    log.warning("sync round skipped: %s (dropped: %s)", why, dropped_text(dropped) or "none")
    return {}, {"skip": "1", "included": "", "dropped": dropped_text(dropped), "detail": why}


def mean_grads(host: StageHost) -> list[torch.Tensor]:
    """This replica's per-sample mean gradient, one tensor per parameter (zeros if none)."""
    n = host.samples
    return [p.grad.detach() / n if p.grad is not None and n else
            torch.zeros_like(p, dtype=torch.float32) for p in host.module.parameters()]
