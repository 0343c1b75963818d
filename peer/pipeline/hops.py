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
from collections.abc import Callable, Mapping
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


class Downstream(MicrobatchDropped):
    """A peer-to-peer hop failed after the replica called (that replica answered ABORTED with
    "downstream: ..."): the microbatch is dropped, the replica called is not blamed."""


#: a p2p reply's meta: the seconds the hops after the callee took; an ABORTED status whose
#: details start with DOWNSTREAM is a failure after the callee
AFTER_S = "after_s"
DOWNSTREAM = "downstream: "


class HopCalls:
    """`hop_failed` and `_hop` (see the module docstring)."""

    d: DriverContext
    router: Router
    links: LinkEstimates
    stalls: StallWatch

    def read_replicas(self) -> None:
        """The router's replicas of every block stage from the peer's view: the live ones,
        seeded with their reported (else self-benchmarked) speed; relayed ones marked."""
        d = self.d
        relayed = {p.peer_id for p in d.view.peers if p.reach == "relayed"}
        for s in range(1, d.spec.pipeline.stages + 1):
            live = set(d.live_replicas(s))
            seeds = {p.peer_id: max(p.stats.samples_per_s, p.benchmark.samples_per_s, 1e-3)
                     for p in d.view.replicas(s) if p.peer_id in live}
            self.router.update_replicas(s, seeds, relayed)

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
        """One forward or backward hop of a microbatch, answered with its output (the hub):
        `_call_hop`'s reply tensor."""
        _, arrays, target = await self._call_hop(kind, stage, step, mb_id, path, hop, x,
                                                 peer=peer, meta=meta, prefer=prefer)
        if set(arrays) != {"x"}:
            self.router.ban(target, time.monotonic() + self.d.spec.membership.lease_s)
            raise MicrobatchDropped(f"stage {stage} {kind}: {target[:8]} answered without its "
                                    "output tensor")
        return torch.from_numpy(arrays["x"].copy()), target

    async def _call_hop(self, kind: str, stage: int, step: int, mb_id: str, path: list[int],
                        hop: int, x: torch.Tensor, peer: str | None = None,
                        meta: Mapping[str, str] | None = None, prefer: str | None = None,
                        hops_left: int = 1, time_left: float | None = None,
                        on_target: Callable[[str], None] | None = None,
                        ) -> tuple[pb.CallHeader, dict, str]:
        """One forward or backward hop of a microbatch, retried on the next-best replica (a
        forward hop; a backward hop must reach the `peer` holding its graph). A forward goes to
        `prefer` first while it is usable (the plan's choice). `meta` goes into the call header
        (SPSA's perturbed streams say so there). Returns the reply's header and tensors and the
        replica that answered.

        Peer-to-peer hops (peer/pipeline/p2p.py): the callee passes the microbatch on before it
        answers, so the call's timeout covers `hops_left` hops (at most `time_left`, the time the
        call this one serves has left), its reply meta says how long the hops after the callee
        took (`after_s`: not the callee's own speed) and an ABORTED reply is a failure after the
        callee (`p2p.Downstream`), which is not held against it. `on_target` hears each replica
        chosen before it is sent to."""
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
            timeout = hops_left * self.router.timeout_for(target, samples,
                                                          backward=kind == "backward")
            if time_left is not None:
                timeout = min(timeout, time_left - (time.monotonic() - now))
                if timeout <= 0:
                    raise MicrobatchDropped(f"stage {stage} {kind}: no time left for the hop")
            header = pb.CallHeader(kind=kind, microbatch_id=mb_id, step=step, stage=stage,
                                   path=path, hop=hop, sender=d.peer_id, sent_at=time.time())
            header.meta.update(meta or {})
            if on_target is not None:
                on_target(target)
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
                own = max(wall - _seconds(reply.meta.get(AFTER_S)), 1e-6)
                self.router.record(target, samples, own, time.monotonic())
                self.links.record_call(target, kind, samples, wall, reply.meta,
                                       header.total_bytes + reply.total_bytes)
                return reply, arrays, target
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ABORTED and (exc.details() or "").startswith(
                        DOWNSTREAM):
                    self.router.record(target, samples, time.monotonic() - t0, time.monotonic())
                    raise Downstream(exc.details() or DOWNSTREAM) from exc
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


def _seconds(text: str | None) -> float:
    """A duration from a reply's meta (0 when absent or not a finite, non-negative number)."""
    try:
        v = float(text or 0.0)
    except ValueError:
        return 0.0
    return v if 0.0 <= v < float("inf") else 0.0
