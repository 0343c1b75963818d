"""`PeerContext`: what the peer's collaborators may use of the peer they run in.

Services (peer/services.py), recovery (peer/recovery/), the sync modes (peer/sync/) and the
stage-0 drivers get this narrow protocol, never the daemon itself; peer/daemon.py's `PeerDaemon`
implements it and tests/fakes.py fakes it. It extends the driver's `DriverContext`
(peer/pipeline/context.py) with what services, recovery and the sync modes need.

Threads: every member is read, written and called on the event loop only. Torch work goes through
`host.run` onto the StageHost's compute thread.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from peer.pipeline.context import DriverContext
from protocols import codec
from protocols.coordinator_client import CoordinatorClient


class PeerContext(DriverContext, Protocol):
    """The peer as its collaborators see it (see the module docstring; the inherited members
    are documented on `DriverContext`)."""

    #: held while the stage steps, is downloaded, is snapshotted or fast-forwards: one of them
    #: at a time (a state served to a joiner is never torn by an optimizer step)
    step_lock: asyncio.Lock
    #: the coordinator client (views, the SPSA ledger); joined before any collaborator runs
    client: CoordinatorClient
    #: where this peer keeps stage snapshots (`--snapshot-dir`), or None for none
    snapshot_dir: str | None

    @property
    def state_hash(self) -> str:
        """The stage's state hash after `host.step`, or "" while it is not known for that step."""
        ...

    @state_hash.setter
    def state_hash(self, value: str) -> None:
        """Set after every change of the stage's state (a step, a download, a fast-forward): the
        hash then belongs to `host.step` as it is now."""
        ...

    def fall_behind(self, why: str, behind_of: int = 0) -> None:
        """This replica missed a step or drifted: stop serving ("syncing") and bring the stage
        back in the background (under the step lock). `behind_of` > 0: it only missed the rounds
        up to that step, so it first replays them (peer/sync/replay.py) and downloads the stage
        only when that cannot bring it there; else (it drifted) it downloads. Returns at once;
        idempotent while a catch-up runs."""
        ...

    def sync_limits(self) -> codec.Limits:
        """The size limits of one sync round's message of this stage."""
        ...

    def state_limits(self) -> codec.Limits:
        """The size limits of one stage state download."""
        ...
