"""What the stage-0 driver (peer/pipeline/driver.py, peer/sync/spsa_driver.py) uses of the peer
it runs in: a narrow protocol instead of the daemon. peer/context.py's `PeerContext` extends it
with what services, recovery and the sync modes use; the daemon implements both, and
tests/fakes.py fakes both.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from peer.pipeline import wire
from peer.pipeline.p2p import Inbox
from peer.pipeline.stage_host import StageHost
from peer.pipeline.unreachable import UnreachableLog
from protocols import codec
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import SwarmView
from protocols.runspec import RunSpec


class DriverContext(Protocol):
    """What a stage-0 driver uses of the peer it runs in (peer/context.py's `PeerContext` adds
    what services, recovery and the sync modes use). Every member is read and called on the
    event loop; none blocks unless it is a coroutine."""

    #: this peer's id (hex); the sync rounds and the "lowest id wins" rule order replicas by it
    peer_id: str
    #: the run spec the coordinator gave at join; fixed for the life of the process
    spec: RunSpec
    #: the stage this peer holds (None before it took one); its torch work runs on the
    #: StageHost's compute thread through `host.run`
    host: StageHost | None
    #: this peer's state as its heartbeats report it ("joining", "syncing", "training", ...)
    state: str
    #: the last swarm view (heartbeat replies and `refresh_view` renew it); may lag
    view: SwarmView | None
    #: bytes on the wire by kind ("activations", "state", "sync:<mode>"), for heartbeats
    counter: wire.ByteCounter
    #: peers whose address refused a call since the last heartbeat (it reports them)
    unreachable: UnreachableLog
    #: peer-to-peer hops: the deliveries this peer's driver waits for (Stage.Deliver fills them)
    inbox: Inbox

    def channel(self, address: str) -> grpc.aio.Channel:
        """The (cached, signed) gRPC channel to a peer's address."""
        ...

    def address_of(self, peer_id: str) -> str:
        """A peer's address from the view; KeyError when the view does not list it."""
        ...

    def live_replicas(self, stage: int) -> list[str]:
        """The ready replicas of `stage` in the view, in peer-id order."""
        ...

    def stage_info(self, stage: int, field: str) -> object:
        """A field of `stage`'s StageInfo in the view (rebuild, step, grad_norm, ...), or None."""
        ...

    def activation_limits(self) -> codec.Limits:
        """The size limits of one activation or gradient message of this run."""
        ...

    def note_compute(self, samples: int, seconds: float) -> None:
        """Count `samples` computed here in `seconds` (the throughput heartbeats report)."""
        ...

    async def refresh_view(self, retry_s: float = 30.0) -> None:
        """Ask the coordinator for the current view and keep it, retrying for up to `retry_s`
        while it does not answer; raises when it cannot."""
        ...

    async def sync_step(self, step: int, replicas: list[str] | None = None) -> pb.StepDone:
        """Sync this replica's stage for `step` and step it (takes the step lock; may wait for
        the stage's other replicas up to the sync timeout). `replicas`: the stage's replicas for
        this round as the driver listed them in its EndSteps, the candidates they all agree on."""
        ...
