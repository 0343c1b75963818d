"""The one place that maps a run's `sync.mode` to its classes: the replica's `SyncMode` and the
stage-0 driver that goes with it.

Everything else in the peer asks the mode object through its hooks (peer/sync/base.py) and never
compares mode names. Adding a mode is one class and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

from peer.context import PeerContext
from peer.pipeline.driver import Driver
from peer.sync.allreduce import AllreduceMode, RobustAllreduceMode
from peer.sync.base import SyncMode
from peer.sync.demo import DemoMode
from peer.sync.demo_delayed import DelayedDemoMode
from peer.sync.diloco import DilocoMode
from peer.sync.diloco_delayed import DelayedDilocoMode
from peer.sync.diloco_streaming import StreamingDilocoMode
from peer.sync.spsa import SpsaMode
from peer.sync.spsa_driver import SpsaDriver
from protocols.runspec import RunSpec


def _allreduce(spec: RunSpec) -> SyncMode:
    a = spec.sync.allreduce
    if a.aggregator != "mean":
        return RobustAllreduceMode(a.aggregator, a.trim, a.clip_norm)
    return AllreduceMode(a.aggregator, a.trim, a.clip_norm)


def _demo(spec: RunSpec) -> SyncMode:
    return DelayedDemoMode(spec) if spec.sync.demo.delayed else DemoMode(spec)


def _diloco(spec: RunSpec) -> SyncMode:
    d = spec.sync.diloco
    if d.streaming_fragments > 0:
        return StreamingDilocoMode(spec)
    return DelayedDilocoMode(spec) if d.delayed else DilocoMode(spec)


#: sync.mode -> the factory of its replica-side mode
MODES: dict[str, Callable[[RunSpec], SyncMode]] = {
    "allreduce": _allreduce,
    "demo": _demo,
    "diloco": _diloco,
    "spsa": SpsaMode,
}

#: every Forward header meta "mode" a sync mode's stream may carry (services refuse a stream
#: of a mode this replica does not run, instead of computing it as a plain forward)
FORWARD_KINDS: frozenset[str] = frozenset().union(*(cls.forward_kinds for cls in (
    AllreduceMode, RobustAllreduceMode, DemoMode, DelayedDemoMode, DilocoMode, DelayedDilocoMode,
    StreamingDilocoMode, SpsaMode)))


def make_sync_mode(spec: RunSpec) -> SyncMode:
    """The run's sync mode; one per replica and stage."""
    factory = MODES.get(spec.sync.mode)
    if factory is None:
        raise NotImplementedError(f"sync mode {spec.sync.mode!r} is not wired into the peer")
    return factory(spec)


def make_driver(ctx: PeerContext, mode: SyncMode, data: str | None, router_kind: str) -> Driver:
    """The stage-0 step loop of the run's mode: SPSA's forward-only loop, else the pipeline's."""
    if isinstance(mode, SpsaMode):
        return SpsaDriver(ctx, mode, data, router_kind)
    return Driver(ctx, data, router_kind)
