"""The one verified state transfer: a stage's state downloaded from a live replica, hash-checked
against what the coordinator attests.

`State.Download` streams the sender's state arrays and the state hash it claims
(peer/state_service.py's StateService). The download asks for the data plane (protocols.dataplane:
the payload over one raw TCP connection, mTLS when the peers' gRPC link is, BLAKE3 payload
digest checked as bytes land; `receive_state`, and `receive_state_over` for a caller without a
PeerContext: `shoal export`), and falls back to the in-band gRPC stream when the sender's data
plane cannot be reached (a relayed peer, a firewall): that sender's address is then asked
in-band for the rest of the process. Either way the payload digest is checked
before anything is decoded, and the state hash checks below are the same.

Whoever takes a state — a joining or re-downloading replica (`download_state`), a rebuild that
needs a neighbour's weights (peer/recovery/rebuild.py) — loads it into a StageHost and
recomputes the hash there. Two checks:

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
from protocols import codec, dataplane, digest, tls
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import SwarmView

log = logging.getLogger("shoal.peer")
DOWNLOAD_TIMEOUT_S = 120
ATTEST_TRIES = 4  # downloads of one source whose step no attestation matched, before giving up
ATTEST_POLLS = 3  # view refreshes while the attestation trails the downloaded step
ATTEST_POLL_S = 0.3
_IN_BAND_ONLY: set[str] = set()  # addresses whose data plane could not be reached


async def receive_state(ctx: PeerContext, address: str, peer_id: str, request: pb.StateRequest,
                        *, timeout: float = DOWNLOAD_TIMEOUT_S
                        ) -> tuple[pb.CallHeader, dict]:
    """One `State.Download` from the peer `peer_id` at `address` exactly as peers make it: over
    `ctx.channel(address)` (protocols.tls.peer_channel), with this peer's leaf
    (`ctx.client.tls()`), `ctx.counter` and `ctx.state_limits()`; see `receive_state_over`."""
    own = ctx.client.tls() if getattr(ctx, "client", None) is not None else None
    return await receive_state_over(ctx.channel(address), address, peer_id, request,
                                    own_tls=own, counter=ctx.counter,
                                    limits=ctx.state_limits(), timeout=timeout)


async def receive_state_over(channel: grpc.aio.Channel, address: str, peer_id: str,
                             request: pb.StateRequest, *, own_tls: tls.PeerTls | None,
                             counter: wire.ByteCounter, limits: codec.Limits,
                             timeout: float = DOWNLOAD_TIMEOUT_S
                             ) -> tuple[pb.CallHeader, dict]:
    """One `State.Download` from the peer `peer_id` at `address` over `channel` (a signed
    protocols.tls.peer_channel to it), asking for the data plane and BLAKE3 unless that address's
    data plane failed before; the answer is received whichever way it comes
    (protocols.dataplane.receive: payload digest and finiteness checked against `limits`, then
    decoded). For callers without a PeerContext too (`shoal export`, an observer with a leaf).

    The data plane is dialed at `address`'s host, over mTLS with `own_tls` (the callee's leaf
    must name `peer_id`) exactly when `channel` is mTLS: `own_tls` given and the link not local
    (protocols.tls.link_is_local), peer_channel's rule. A data plane that cannot be reached or
    fails mid-transfer makes one more call in-band, and that address is asked in-band for the
    rest of the process. Bytes count in `counter` as "state" received (gRPC messages and
    payload). Event loop; the data-plane bytes arrive on a worker thread. Raises what
    dataplane.receive raises (codec errors, ValueError, for a bad payload), grpc errors."""
    stub = pbg.StateStub(channel)
    host = tls.split_host_port(address)[0]
    ask = pb.StateRequest()
    ask.CopyFrom(request)
    if address not in _IN_BAND_ONLY:
        ask.accept_dataplane = True
        ask.accept_digests[:] = [digest.BLAKE3]
    context = (dataplane.peer_client_context(own_tls.ca_pem, own_tls.cert_pem, own_tls.key_pem)
               if own_tls is not None and not tls.link_is_local(host) else None)
    call = stub.Download(ask, timeout=timeout)
    try:
        header, arrays = await dataplane.receive(
            wire.counted(call.__aiter__(), counter, "state"), limits,
            ssl_context=context, server_hostname=peer_id or None, dial_host=host,
            timeout=min(timeout, 30.0))
    except dataplane.DataPlaneError as exc:
        if not ask.accept_dataplane:
            raise
        log.warning("state download from %s: its data plane failed (%s); asking in-band",
                    peer_id[:8] or address, exc)
        _IN_BAND_ONLY.add(address)
        return await receive_state_over(channel, address, peer_id, request, own_tls=own_tls,
                                        counter=counter, limits=limits, timeout=timeout)
    if dataplane.is_dataplane(header):
        counter.add("state", received=header.total_bytes)
        log.info("state of stage %d from %s: %d bytes over the data plane (%s, %s digest)",
                 header.stage, peer_id[:8] or address, header.total_bytes,
                 "mTLS" if context is not None else "plaintext", header.digest or "SHA-256 tree")
    return header, arrays


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
    address = ctx.address_of(pid)
    for _ in range(ATTEST_TRIES):
        header, arrays = await receive_state(ctx, address, pid, pb.StateRequest(
            stage=into.stage, include_optimizer=True, ledger_snapshot=ledger_snapshot))
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
