"""The one shared fake of the peer's `PeerContext` (peer/context.py) and of a swarm view, for unit
tests of the driver, recovery, services and sync modes without a network or a coordinator.

`FakePeer` holds what a test gives it (spec, host, view) and answers every `PeerContext` member
the way the daemon does, from that view (peer/consistency.py's rules); what needs a network
(channels, the coordinator) raises, so a test that reaches one says so loudly. `FakeView` is a
swarm view whose holders, steps and stage infos a test can change between calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from peer import consistency
from peer.pipeline import wire
from peer.pipeline.p2p import Inbox
from peer.pipeline.unreachable import UnreachableLog
from protocols import codec
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import Benchmark, PeerInfo, PeerStats, StageInfo
from protocols.runspec import RunSpec


@dataclass
class FakeView:
    """A swarm view: `holders` (stage -> peer ids, all "training", state hash "h"), their `steps`
    (peer id -> step, default 0) and one StageInfo per stage in `stages`."""

    stages: list[StageInfo] = field(default_factory=list)
    holders: dict[int, list[str]] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    revoked: tuple[str, ...] = ()

    @property
    def peers(self) -> list[PeerInfo]:
        return [p for s in sorted(self.holders) for p in self.replicas(s)]

    def replicas(self, stage: int) -> list[PeerInfo]:
        return [PeerInfo(p, b"", f"fake:{p}", stage, "training", Benchmark(),
                         PeerStats(state="training", step=self.steps.get(p, 0), state_hash="h"),
                         0.0, 0.0)
                for p in self.holders.get(stage, [])]

    def peer(self, peer_id: str) -> PeerInfo | None:
        return next((p for p in self.peers if p.peer_id == peer_id), None)


def stage_infos(n_stages: int, step: Callable[[int], int] | int = 0,
                grad_norm: Callable[[int], float] | float = 0.0) -> list[StageInfo]:
    """StageInfo of stages 0..n_stages with the given step and gradient norm (per stage or all)."""
    def value(v: Any, s: int) -> Any:
        return v(s) if callable(v) else v
    return [StageInfo(s, (), 1.0, value(grad_norm, s), value(step, s), "")
            for s in range(n_stages + 1)]


class FakePeer:
    """A `PeerContext` (and `DriverContext`) for tests; see the module docstring."""

    def __init__(self, spec: RunSpec, host: Any = None, view: FakeView | None = None, *,
                 peer_id: str = "ab" * 8, snapshot_dir: str | None = None,
                 state: str = "training") -> None:
        self.peer_id = peer_id
        self.spec = spec
        self.host = host
        self.state = state
        self.view = view
        self.counter = wire.ByteCounter()
        self.unreachable = UnreachableLog()
        self.inbox = Inbox()  # peer-to-peer hops: deliveries awaited by the driver
        self.step_lock = asyncio.Lock()
        self.client: Any = None  # no coordinator: a test that needs one installs its own
        self.snapshot_dir = snapshot_dir
        self.state_hash = ""
        self.behind: list[str] = []  # why each fall_behind was called
        self.stepped: list[int] = []  # the steps sync_step was called for
        self.computed = 0  # samples note_compute counted

    def channel(self, address: str) -> grpc.aio.Channel:
        raise ConnectionError(f"FakePeer has no network (asked for {address})")

    def address_of(self, peer_id: str) -> str:
        return consistency.address_of(self.view, peer_id)  # type: ignore[arg-type]

    def live_replicas(self, stage: int) -> list[str]:
        return consistency.live_replicas(self.view, stage)  # type: ignore[arg-type]

    def stage_info(self, stage: int, field: str) -> object:
        info = next((s for s in (self.view.stages if self.view else ()) if s.stage == stage),
                    None)
        return getattr(info, field) if info is not None else None

    def activation_limits(self) -> codec.Limits:
        return wire.activation_limits(self.spec)

    def sync_limits(self) -> codec.Limits:
        return wire.sync_limits(1 << 20)

    def state_limits(self) -> codec.Limits:
        return wire.state_limits(self.spec)

    def note_compute(self, samples: int, seconds: float) -> None:
        self.computed += samples

    async def refresh_view(self, retry_s: float = 30.0) -> None:
        return None  # the view is whatever the test set

    async def sync_step(self, step: int, replicas: Iterable[str] | None = None) -> pb.StepDone:
        self.stepped.append(step)
        return pb.StepDone(step=step, stepped=True)

    def fall_behind(self, why: str) -> None:
        self.behind.append(why)
        self.state = "syncing"
