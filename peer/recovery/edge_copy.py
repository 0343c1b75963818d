"""CheckFree+: the copy of stage 0 that the first and last block stages keep, kept current.

Stage 0 (the embedding, the final norm and the tied head: peer/pipeline/stages.py's StageZero)
has no neighbours to average, so CheckFree+ keeps a copy of it on its neighbours in the pipeline,
block stages 1 and S (their `edge_embedding` and `edge_norm` buffers, peer/pipeline/model.py's
EDGE_COPY_KEYS). When every stage-0 replica is lost, the coordinator marks stage 0 for a
"checkfree+" rebuild and its next holder takes stage 0's parameters from that copy
(peer/recovery/rebuild.py, optim/checkfree.stage_zero_from_edge_copy).

A copy is only worth what it is current: every replica of stage 1 or S (and only those, and
only under `pipeline.checkfree_plus`) downloads stage 0's agreed weights from a live stage-0
replica each time its own stage has advanced `REFRESH_EVERY_STEPS` steps since the last refresh
(`EdgeCopies.poll`, called by the heartbeat loop; the download runs beside the heartbeats). The
download is the export's request (State.Download without optimizer state, the agreed weights: under
DiLoCo the last outer step's), made as every peer download is (peer/recovery/transfer.py
`receive_state`: the data plane when the sender offers it): it must hash to what the sender
claims, and, when the coordinator
attests stage 0 at the same step, to that; otherwise it is refused and the old copy kept.

How stale the copy can be: REFRESH_EVERY_STEPS (5) steps plus one heartbeat and the download,
while stage 0 answers; a holder that joins takes its replica's copy with the state. The copy is
small: VOCAB_SIZE x d_model + d_model floats (66 KB at d_model 64, 1 MB at 1024), so the cost
is one such download per edge replica every 5 steps. The buffers are not part of the state hash
(replicas of stage 1 may hold copies of different ages without disagreeing).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import torch

from peer import consistency
from peer.context import PeerContext
from peer.pipeline.stage_host import StageHost
from peer.pipeline.stage_state import hash_of_arrays
from peer.recovery.transfer import receive_state
from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.recovery")
REFRESH_EVERY_STEPS = 5
DOWNLOAD_TIMEOUT_S = 60
#: stage 0's parameter -> the edge stage's buffer that copies it
COPIES = {"embedding.weight": "edge_embedding", "norm.weight": "edge_norm"}


class CopyRefused(RuntimeError):
    """A downloaded stage 0 did not hash to its claim or the coordinator's attestation."""


def holds_copy(host: StageHost | None) -> bool:
    """Whether `host` is a block stage that keeps a CheckFree+ copy of stage 0."""
    return host is not None and host.stage > 0 and all(
        hasattr(host.module, b) for b in COPIES.values())


async def download_stage_zero(d: PeerContext, pid: str) -> tuple[dict[str, torch.Tensor], int]:
    """Stage 0's agreed parameters and step from replica `pid`, hash-checked (module docstring).
    Raises CopyRefused, grpc.aio.AioRpcError, KeyError (pid not in the view), ValueError."""
    header, arrays = await receive_state(d, d.address_of(pid), pid,
                                         pb.StateRequest(stage=0, include_optimizer=False),
                                         timeout=DOWNLOAD_TIMEOUT_S)
    claimed = header.meta.get("state_hash", "")
    got = hash_of_arrays(arrays)
    if got != claimed:
        raise CopyRefused(f"stage 0 from {pid[:8]} hashes to {got[:12]}, it claimed {claimed[:12]}")
    at, attested = consistency.attested(d.view, 0)
    if attested and at == header.step and attested != got:
        raise CopyRefused(f"stage 0 from {pid[:8]} at step {header.step} hashes to {got[:12]}, "
                          f"the coordinator attests {attested[:12]}")
    params = {}
    for name in COPIES:
        a = arrays.get(f"model.{name}")
        if a is None:
            raise CopyRefused(f"stage 0 from {pid[:8]} lacks {name}")
        params[name] = torch.from_numpy(np.array(a, dtype=np.float32))
    return params, int(header.step)


def install_copy(host: StageHost, params: dict[str, torch.Tensor]) -> None:
    """Copy stage 0's parameters into `host`'s edge buffers (compute thread). Raises ValueError
    on a shape mismatch or non-finite values, leaving the old copy."""
    for name, buf in COPIES.items():
        t, mine = params[name], getattr(host.module, buf)
        if tuple(t.shape) != tuple(mine.shape):
            raise ValueError(f"stage 0's {name} has shape {tuple(t.shape)}, the copy "
                             f"{tuple(mine.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"stage 0's {name} holds NaN or Inf")
    with torch.no_grad():
        for name, buf in COPIES.items():
            getattr(host.module, buf).copy_(params[name].to(getattr(host.module, buf).device))


class EdgeCopies:
    """The refresh schedule of one peer's copy of stage 0 (see the module docstring)."""

    def __init__(self, every: int = REFRESH_EVERY_STEPS) -> None:
        self.every = every
        self.last_step: int | None = None  # the holder's step at the last refresh
        self.copy_step: int | None = None  # stage 0's step the copy is of
        self.task: asyncio.Task | None = None
        self._host: StageHost | None = None

    def due(self, d: PeerContext) -> bool:
        host = d.host
        if not (d.spec.pipeline.checkfree_plus and holds_copy(host)) or self.task is not None:
            return False
        assert host is not None
        if host is not self._host:  # a new stage (a move, a re-download): refresh at once
            self._host, self.last_step = host, None
        return (d.state in consistency.READY_STATES
                and (self.last_step is None or host.step >= self.last_step + self.every))

    def poll(self, d: PeerContext) -> None:
        """Start a refresh in the background when one is due (heartbeat loop; returns at once)."""
        if self.due(d):
            self.task = asyncio.ensure_future(self.refresh(d))
            self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("refreshing the copy of stage 0 failed: %s", task.exception())

    async def refresh(self, d: PeerContext) -> bool:
        """Download stage 0 from the first live replica that gives a checked state and install
        it as this stage's copy. Returns whether it did."""
        host = d.host
        if host is None:
            return False
        step = host.step
        for pid in d.live_replicas(0):
            try:
                params, at = await download_stage_zero(d, pid)
                if d.host is not host:
                    return False  # the peer moved meanwhile
                await host.run(install_copy, host, params)
            except (grpc.aio.AioRpcError, CopyRefused, KeyError, ValueError) as exc:
                log.warning("copy of stage 0 from %s refused or failed: %s", pid[:8], exc)
                continue
            first = self.copy_step is None
            self._host, self.last_step, self.copy_step = host, step, at
            (log.info if first else log.debug)(
                "stage %d: copy of stage 0 refreshed at step %d (stage 0 at step %d, from %s)",
                host.stage, step, at, pid[:8])
            return True
        return False

    def stop(self) -> None:
        """Cancel a refresh in flight (shutdown)."""
        if self.task is not None:
            self.task.cancel()
