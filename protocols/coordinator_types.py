"""The in-process shapes of the coordinator protocol's messages, and the constants both ends share.

Messages are dataclasses inside the process; protobuf exists only at the wire (`to_proto` /
`from_proto`). The peer side (protocols.coordinator_client) and the coordinator (coordinator/)
both speak in these shapes; protocols.coordinator_client re-exports every name here.

A `JoinResult` or `HeartbeatResult` decodes its swarm view lazily: a simulated swarm of thousands
of peers must not pay for views it never reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

#: stage_hint of a Join that asks to observe (export, inspection): a certificate, no stage, no
#: lease; the observer can read the view and call peers' State/Stage services, nothing else.
OBSERVER_STAGE = -2
PEER_STATES = ("joining", "syncing", "training", "draining", "lost", "rebuilt")
#: the states in which a peer serves its stage and counts as one of its live replicas
READY_STATES = ("training", "rebuilt")
VERSION = "0.1.0"


# ------------------------------------------------------------------------- message shapes


@dataclass(frozen=True, slots=True)
class Benchmark:
    """What a peer measured (or declared) about itself at start-up."""

    samples_per_s: float = 0.0
    bandwidth_mbps: float = 0.0
    device: str = ""
    memory_bytes: int = 0  # the device's total
    declared: bool = False
    memory_available_bytes: int = 0  # what a stage may use there; 0: not reported (older peer)

    def to_proto(self) -> pb.Benchmark:
        return pb.Benchmark(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, m: pb.Benchmark) -> Benchmark:
        return cls(m.samples_per_s, m.bandwidth_mbps, m.device, m.memory_bytes, m.declared,
                   m.memory_available_bytes)


@dataclass(slots=True)
class PeerStats:
    """What a peer reports in each heartbeat. `loss` is NaN when unknown (block stages)."""

    state: str = "joining"
    samples_per_s: float = 0.0
    queue: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    loss: float = math.nan
    step: int = 0
    tokens_per_s: float = 0.0
    dropped_microbatches: int = 0
    grad_norm: float = 0.0
    state_hash: str = ""
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    microbatches_done: int = 0
    held_stage: int = -1  # the stage whose weights it holds now; -1 none (or not said)

    def to_proto(self) -> pb.PeerStats:
        return pb.PeerStats(
            state=self.state, samples_per_s=self.samples_per_s, queue=self.queue,
            bytes_sent=self.bytes_sent, bytes_received=self.bytes_received, loss=self.loss,
            step=self.step, tokens_per_s=self.tokens_per_s,
            dropped_microbatches=self.dropped_microbatches, grad_norm=self.grad_norm,
            state_hash=self.state_hash, bytes_by_kind=self.bytes_by_kind,
            microbatches_done=self.microbatches_done,
            held_stage=self.held_stage if self.held_stage >= 0 else None)

    @classmethod
    def from_proto(cls, m: pb.PeerStats) -> PeerStats:
        return cls(m.state, m.samples_per_s, m.queue, m.bytes_sent, m.bytes_received, m.loss,
                   m.step, m.tokens_per_s, m.dropped_microbatches, m.grad_norm, m.state_hash,
                   dict(m.bytes_by_kind), m.microbatches_done,
                   m.held_stage if m.HasField("held_stage") else -1)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and infinities become None). Cheap: no deep copy."""
        d = {k: getattr(self, k) for k in _STATS_FIELDS}
        d["bytes_by_kind"] = dict(self.bytes_by_kind)
        for k in _STATS_FLOATS:
            if not math.isfinite(d[k]):
                d[k] = None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PeerStats:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("loss") is None:
            kw["loss"] = math.nan
        return cls(**kw)


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(PeerStats))
_STATS_FLOATS = ("samples_per_s", "loss", "tokens_per_s", "grad_norm")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One member of the swarm as the coordinator describes it to everyone."""

    peer_id: str
    public_key: bytes
    address: str
    stage: int
    state: str
    benchmark: Benchmark
    stats: PeerStats
    lease_expires: float
    joined_at: float
    #: "" (not checked yet) | "direct" | "relayed" | "unreachable": the coordinator's dial-back
    reach: str = ""
    relay: bool = False  # offers to relay for unreachable peers (`shoal peer --relay`)

    @classmethod
    def from_proto(cls, m: pb.PeerInfo) -> PeerInfo:
        return cls(m.peer_id, m.public_key, m.address, m.stage, m.state,
                   Benchmark.from_proto(m.benchmark), PeerStats.from_proto(m.stats),
                   m.lease_expires, m.joined_at, m.reach, m.relay)


@dataclass(frozen=True, slots=True)
class StageInfo:
    """One stage: its replicas, their summed throughput, and what CheckFree needs."""

    stage: int
    replicas: tuple[str, ...]
    throughput: float
    grad_norm: float
    step: int
    rebuild: str  # "" | "checkfree" | "checkfree+" | "snapshot" | "copy"
    #: the stage state most live ready replicas report (contract 1 of #12; "" / 0 while none
    #: does): what a downloaded state is verified against, and who is right in a disagreement
    attested_hash: str = ""
    attested_step: int = 0

    @classmethod
    def from_proto(cls, m: pb.StageInfo) -> StageInfo:
        return cls(m.stage, tuple(m.replicas), m.throughput, m.grad_norm, m.step, m.rebuild,
                   m.attested_hash, m.attested_step)


@dataclass(frozen=True, slots=True)
class SwarmView:
    """The membership at one epoch. Peers route only to `peers`; `revoked` must be refused."""

    epoch: int
    swarm_id: str
    peers: tuple[PeerInfo, ...]
    stages: tuple[StageInfo, ...]
    revoked: tuple[str, ...]

    @classmethod
    def from_proto(cls, m: pb.SwarmView) -> SwarmView:
        return cls(m.epoch, m.swarm_id, tuple(PeerInfo.from_proto(p) for p in m.peers),
                   tuple(StageInfo.from_proto(s) for s in m.stages), tuple(m.revoked))

    def replicas(self, stage: int) -> list[PeerInfo]:
        return [p for p in self.peers if p.stage == stage]

    def peer(self, peer_id: str) -> PeerInfo | None:
        return next((p for p in self.peers if p.peer_id == peer_id), None)


@dataclass(slots=True)
class JoinResult:
    """What the coordinator answered to Join: the run, this peer's stage, and its certificate.

    `view` is decoded on first use (a thousand-peer view costs milliseconds to convert).
    """

    certificate: pb.SignedCertificate
    coordinator_public_key: bytes
    spec_toml: str
    spec: RunSpec
    stage: int
    epoch: int
    lease_s: float
    heartbeat_s: float
    swarm_id: str
    view_proto: pb.SwarmView
    _view: SwarmView | None = None
    #: the address the coordinator registered for this peer (JoinReply.address: the given one,
    #: its empty host filled with the host the coordinator saw the Join come from)
    address: str = ""

    @property
    def view(self) -> SwarmView:
        if self._view is None:
            self._view = SwarmView.from_proto(self.view_proto)
        return self._view


@dataclass(slots=True)
class HeartbeatResult:
    """What the coordinator answered to a heartbeat.

    `action` is "" normally, "move" when a rebalance gave this peer another stage (`stage`),
    "rejoin" when the client had to join again (the coordinator had forgotten it), "leave" when
    the coordinator wants the peer gone. `stage` is authoritative in every reply: a peer whose
    stage differs from the one it holds must move even if the reply that said "move" was lost.
    `view` is None unless the epoch moved.
    """

    epoch: int
    lease_expires: float
    stage: int
    action: str
    view_proto: pb.SwarmView | None = None
    _view: SwarmView | None = None
    #: this peer's reachability as the coordinator found it (PeerInfo.reach) and, when it is
    #: "unreachable", the relay to attach to (host:port; "" when none is offered)
    reach: str = ""
    relay: str = ""

    @property
    def view(self) -> SwarmView | None:
        if self._view is None and self.view_proto is not None:
            self._view = SwarmView.from_proto(self.view_proto)
        return self._view
