"""The one verified state transfer: a stage's state downloaded from a live replica, hash-checked.

`State.Download` streams the sender's state arrays and the state hash it claims
(peer/services.py's StateService). Whoever takes a state — a joining or re-downloading replica
(`download_state`), a rebuild that needs a neighbour's weights (peer/recovery/rebuild.py) — loads
it into a StageHost and recomputes the hash there: a state that does not hash to what its sender
claimed is refused, whatever the reason (corruption, a sender that lies, a torn snapshot).
"""

from __future__ import annotations

import logging

import grpc

from peer.context import PeerContext
from peer.pipeline import wire
from peer.pipeline.stage_host import StageError, StageHost
from peer.sync.base import SyncMode
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg

log = logging.getLogger("shoal.peer")
DOWNLOAD_TIMEOUT_S = 120


async def fetch_state(ctx: PeerContext, pid: str, into: StageHost, *,
                      ledger_snapshot: bool = False) -> str:
    """Download the state of `into.stage` from peer `pid` into `into`; returns its hash.

    Event loop; the loading and hashing run on `into`'s compute thread. Raises StageError when
    the state does not hash to what the sender claims (then `into` holds a refused state: load
    another or discard it), grpc.aio.AioRpcError when the call fails, KeyError when the view
    does not list `pid`, ValueError (codec) for a malformed stream.
    """
    stub = pbg.StateStub(ctx.channel(ctx.address_of(pid)))
    call = stub.Download(pb.StateRequest(stage=into.stage, include_optimizer=True,
                                         ledger_snapshot=ledger_snapshot),
                         timeout=DOWNLOAD_TIMEOUT_S)
    header, arrays = await wire.receive(call.__aiter__(), ctx.state_limits(), ctx.counter,
                                        "state")
    await into.run(into.load_state_arrays, arrays)
    got = await into.run(into.state_hash)
    claimed = header.meta.get("state_hash", "")
    if got != claimed:
        raise StageError(f"stage {into.stage} state from {pid[:8]} hashes to {got[:12]}, it "
                         f"claimed {claimed[:12]}")
    return got


async def download_state(ctx: PeerContext, mode: SyncMode, sources: list[str]) -> bool:
    """Take this replica's stage (`ctx.host`) from the first of `sources` that gives a verified
    state, then let the sync mode bring it up to date (`SyncMode.after_download`: SPSA replays the
    ledger from the checkpoint it asked for). Returns whether one did; logs each failure.

    Event loop; call with the step lock held, or before the replica serves.
    """
    host = ctx.host
    assert host is not None
    for pid in sources:
        try:
            got = await fetch_state(ctx, pid, host, ledger_snapshot=mode.joins_from_checkpoint)
            log.info("stage %d: downloaded state at step %d from %s (hash %s)", host.stage,
                     host.step, pid[:8], got[:12])
            await mode.after_download(ctx)
            return True
        except (grpc.aio.AioRpcError, StageError, KeyError, ValueError,
                RuntimeError) as exc:
            log.warning("state download from %s failed: %s", pid[:8], exc)
    return False
