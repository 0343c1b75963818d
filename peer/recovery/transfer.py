"""The one verified state transfer: a stage's state downloaded from a live replica, hash-checked
against what the coordinator attests.

`State.Download` streams the sender's state arrays and the state hash it claims
(peer/services.py's StateService). Whoever takes a state — a joining or re-downloading replica
(`download_state`), a rebuild that needs a neighbour's weights (peer/recovery/rebuild.py) — loads
it into a StageHost and recomputes the hash there. Two checks:

- the state hashes to what its sender claims (corruption, a torn snapshot);
- the hash is the one the coordinator attests for the stage at that step (StageInfo.
  attested_hash at attested_step: the majority of the stage's replicas, as their heartbeats
  report `StageHost.state_hash`, the same function): a sender that lies about its own state is
  refused, whatever it claims. The attestation trails a training swarm by its heartbeats, so a
  state a step or two ahead of it is re-checked after a view refresh or downloaded again
  (ATTEST_TRIES times); sources whose reported (step, hash) is the attested one are tried first.

What cannot be checked is said: with no attestation for the stage at all (an older
coordinator, or no replica reported a hash yet) the sender's claim is all there is; a state that
never lined up with an attestation of its step is refused when `strict` (export, which has no
later check), else taken with a warning (a replica's rounds and heartbeats compare it with the
majority at its next step: peer/consistency.py, peer/sync/rounds.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from peer import consistency
from peer.context import PeerContext
from peer.pipeline import wire
from peer.pipeline.stage_host import StageError, StageHost
from peer.sync.base import SyncMode
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import SwarmView

log = logging.getLogger("shoal.peer")
DOWNLOAD_TIMEOUT_S = 120
ATTEST_TRIES = 4  # downloads of one source whose step no attestation matched, before giving up
ATTEST_POLLS = 3  # view refreshes while the attestation trails the downloaded step
ATTEST_POLL_S = 0.3


class Unverified(StageError):
    """No attestation of the downloaded state's step could be had (the swarm kept moving)."""


async def attested_at(ctx, stage: int, step: int) -> str | None:
    """The hash the coordinator attests for `stage` at `step`: refreshes the view (at most
    ATTEST_POLLS times) while the attestation trails `step`. "" when it attests another step
    (the swarm moved past `step`, or did not get there in time); None when it attests nothing
    for the stage at all."""
    seen = False
    for i in range(ATTEST_POLLS + 1):
        at, h = consistency.attested(ctx.view, stage)
        if h:
            seen = True
            if at == step:
                return h
            if at > step:
                return ""
        if i == ATTEST_POLLS:
            break
        if i:
            await asyncio.sleep(ATTEST_POLL_S)
        with contextlib.suppress(Exception):
            await ctx.refresh_view()
    return "" if seen else None


def attested_first(view: SwarmView | None, stage: int, sources: list[str]) -> list[str]:
    """`sources` with those whose reported (step, hash) is the stage's attested one first."""
    at, h = consistency.attested(view, stage)
    if not h or view is None:
        return list(sources)

    def honest(pid: str) -> bool:
        p = view.peer(pid)
        return p is not None and (p.stats.step, p.stats.state_hash) == (at, h)

    return sorted(sources, key=lambda pid: not honest(pid))


async def fetch_state(ctx: PeerContext, pid: str, into: StageHost, *,
                      ledger_snapshot: bool = False, strict: bool = False) -> str:
    """Download the state of `into.stage` from peer `pid` into `into`; returns its hash.

    Event loop; the loading and hashing run on `into`'s compute thread. Raises StageError when
    the state does not hash to what the sender claims or to what the coordinator attests for its
    step (then `into` holds a refused state: load another or discard it), Unverified (`strict`
    only) when no attestation of its step could be had, grpc.aio.AioRpcError when the call
    fails, KeyError when the view does not list `pid`, ValueError (codec) for a malformed stream.
    A SPSA checkpoint (`ledger_snapshot`) is of an older step: only its claim is checked here,
    the ledger replay and the heartbeats check the rest.
    """
    stub = pbg.StateStub(ctx.channel(ctx.address_of(pid)))
    for _ in range(ATTEST_TRIES):
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
        if ledger_snapshot:
            return got
        expected = await attested_at(ctx, into.stage, header.step)
        if expected is None:
            log.info("stage %d: no attested hash in the view; the state from %s is checked "
                     "against its own claim only", into.stage, pid[:8])
            return got
        if expected == got:
            return got
        if expected:
            raise StageError(f"stage {into.stage} state from {pid[:8]} at step {header.step} "
                             f"hashes to {got[:12]}, but the coordinator attests "
                             f"{expected[:12]} for that step: refused")
        if consistency.vouched(ctx.view, into.stage, pid):
            at, _ = consistency.attested(ctx.view, into.stage)
            if header.step > at:
                log.info("stage %d: state of step %d from %s, newer than the attested step %d, "
                         "taken because the coordinator attests that replica's own report",
                         into.stage, header.step, pid[:8], at)
                return got
        log.info("stage %d: state from %s is at step %d, which no attestation matched; "
                 "downloading again", into.stage, pid[:8], header.step)
    if strict:
        raise Unverified(f"stage {into.stage}: the state from {pid[:8]} never lined up with an "
                         f"attestation of its step in {ATTEST_TRIES} downloads (the swarm keeps "
                         "moving); retry when it is quieter")
    log.warning("stage %d: the state from %s (step %d) could not be checked against an "
                "attestation of its step (the swarm moved on); taken on its claim, the next "
                "round's and heartbeats' hash checks compare it with the stage's majority",
                into.stage, pid[:8], into.step)
    return got


async def download_state(ctx: PeerContext, mode: SyncMode, sources: list[str]) -> bool:
    """Take this replica's stage (`ctx.host`) from the first of `sources` that gives a verified
    state, then let the sync mode bring it up to date (`SyncMode.after_download`: SPSA replays the
    ledger from the checkpoint it asked for). Returns whether one did; logs each failure.

    Event loop; call with the step lock held, or before the replica serves.
    """
    host = ctx.host
    assert host is not None
    for pid in attested_first(ctx.view, host.stage, sources):
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
