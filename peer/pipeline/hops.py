"""Sending one hop of a microbatch: the stage-0 driver's Forward and Backward calls to a block
replica, retried on the next-best replica, and what a failed call says about that replica.

A mixin of `Driver` (peer/pipeline/driver.py), split out of it by responsibility: it uses the
driver's `d` (the peer, as a DriverContext), `router` (the SWARM estimates), `links` (the
SkipPipe planner's measurements) and `stalls` (the spans this process was stopped). It is the
seam a block replica that forwards to the next stage itself would share (issue #15's
peer-to-peer hops).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
import torch

from peer.pipeline import wire
from peer.pipeline.router import NoReplicaAvailable
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg

if TYPE_CHECKING:
    from peer.pipeline.context import DriverContext
    from peer.pipeline.links import LinkEstimates
    from peer.pipeline.router import Router
    from peer.pipeline.stalls import StallWatch

log = logging.getLogger("shoal.driver")
MAX_HOP_ATTEMPTS = 4


class MicrobatchDropped(Exception):
    pass


class StageEmpty(MicrobatchDropped):
    """A forward hop found no usable replica of its stage: the microbatch may bypass it."""


class HopCalls:
    """`hop_failed` and `_hop` (see the module docstring)."""

    d: DriverContext
    router: Router
    links: LinkEstimates
    stalls: StallWatch

    def hop_failed(self, target: str, samples: int, t0: float, exc: grpc.aio.AioRpcError
                   ) -> bool:
        """A timed-out hop slows the replica's estimate (unless this process was stopped
        meanwhile: peer/pipeline/stalls.py); any other error bans it until its lease would
        expire (ALGORITHMS.md §1). Returns whether the failure is the replica's: False when it
        timed out across a stop of this process, and may go to the same replica again."""
        now = time.monotonic()
        self.d.unreachable.note_error(target, exc)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            stopped = self.stalls.stalled_during(t0, now)
            if stopped > 0.0:  # this process was stopped: the timeout is ours, not the replica's
                self.router.abandon(target, samples, now)
                log.info("a call to %s timed out across %.1f s this process was stopped; not "
                         "held against it", target[:8], stopped)
                return False
            self.router.on_timeout(target, samples, now - t0, now)
        else:
            self.router.ban(target, now + self.d.spec.membership.lease_s)
        return True

    async def _hop(self, kind: str, stage: int, step: int, mb_id: str, path: list[int],
                   hop: int, x: torch.Tensor, peer: str | None = None,
                   meta: Mapping[str, str] | None = None,
                   prefer: str | None = None) -> tuple[torch.Tensor, str]:
        """One forward or backward hop of a microbatch, retried on the next-best replica (a
        forward hop; a backward hop must reach the `peer` holding its graph). A forward goes to
        `prefer` first while it is usable (the plan's choice). `meta` goes into the call header
        (SPSA's perturbed streams say so there)."""
        d = self.d
        samples = int(x.shape[0])
        tried: set[str] = set()
        attempts, stalled_once = (MAX_HOP_ATTEMPTS if peer is None else 1), False
        while attempts > 0:
            attempts -= 1
            now = time.monotonic()
            try:
                target = peer or self.router.choose(stage, samples, now, exclude=tried,
                                                    prefer=prefer)
            except NoReplicaAvailable as exc:
                raise StageEmpty(f"stage {stage}: {exc}") from exc
            timeout = self.router.timeout_for(target, samples, backward=kind == "backward")
            header = pb.CallHeader(kind=kind, microbatch_id=mb_id, step=step, stage=stage,
                                   path=path, hop=hop, sender=d.peer_id, sent_at=time.time())
            header.meta.update(meta or {})
            t0 = time.monotonic()
            try:
                stub = pbg.StageStub(d.channel(d.address_of(target)))
                method = stub.Forward if kind == "forward" else stub.Backward
                reply, arrays = await wire.call_tensors(
                    method, header, {"x": x.float().numpy()},
                    encoding=wire.ACTIVATION_ENCODINGS[d.spec.pipeline.activations],
                    limits=d.activation_limits(), counter=d.counter, kind="activations",
                    timeout=timeout)
                wall = time.monotonic() - t0
                self.router.record(target, samples, wall, time.monotonic())
                self.links.record_call(target, kind, samples, wall, reply.meta,
                                       2 * reply.total_bytes)
                return torch.from_numpy(arrays["x"].copy()), target
            except grpc.aio.AioRpcError as exc:
                if self.hop_failed(target, samples, t0, exc):
                    tried.add(target)
                elif not stalled_once:  # this process was stopped: once more, same replica
                    stalled_once, attempts = True, attempts + 1
                log.info("%s of %s on %s failed: %s", kind, mb_id, target[:8], exc.code().name)
            except (KeyError, NoReplicaAvailable) as exc:
                if peer is not None:
                    raise MicrobatchDropped(str(exc)) from exc
                raise StageEmpty(f"stage {stage}: {exc}") from exc
        if peer is None:
            raise StageEmpty(f"stage {stage} {kind}: no replica answered ({len(tried)} tried)")
        raise MicrobatchDropped(f"stage {stage} {kind}: no replica answered ({len(tried)} tried)")
