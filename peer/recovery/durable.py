"""Durable checkpoints: the peers' side (writing their stages, resuming from them).

The coordinator keeps the files and the index (coordinator/checkpoints.py has the whole design;
the format is protocols/checkpoint_index.py; docs/checkpoints.md the user's view). Here:

- `DurableCheckpoints.after_step` (the daemon's `sync_step`, under the step lock, right after a
  step): at every `checkpoint.every`-th step, the stage's designated replica — the smallest peer
  id among the live ready replicas of the stage in its view, itself included — serializes its
  stage's whole state (`StageHost.state_arrays`: weights, AdamW moments, sync-mode state,
  meta.step, meta.lr_scale) into one safetensors file on the compute thread (a copy: training
  goes on while it uploads) and streams it with its SHA-256 to the coordinator's
  `Checkpoints.Put` in the background. One upload at a time; a failed upload is logged and the
  next checkpoint step tries again. Two replicas whose views differ may both upload: the
  coordinator keeps the first (they hold the same bytes).
- `take_state` (the daemon's `_take_stage`, for the first stage a peer takes): with
  `shoal peer --resume DIR` (a folder on this machine) or the run spec's `checkpoint.init` (a
  folder on the coordinator's, which serves the stage's file: `fetch_init`), a stage with a
  live replica is downloaded from it as usual (the swarm is newer than any checkpoint); a stage
  without one (every peer was lost) is loaded from the checkpoint, unless a live peer of another
  stage is past the checkpoint's step (only this stage was lost: CheckFree's rebuild, which
  keeps the stages at one step, is the better source then). The index is read, its spec hash
  checked against this run's, the stage's file read once and checked against the index's
  SHA-256, parsed as safetensors (never a pickle), every tensor checked finite, its shapes
  checked by the stage's module. The replica then starts after the checkpoint's step with its
  weights and optimizer state. A checkpoint that fails any check stops the peer with a message
  that names the file and what is wrong (SystemExit): a peer told to resume must not silently
  start over.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from peer.consistency import READY_STATES
from peer.context import PeerContext
from peer.pipeline.stage_host import StageError, StageHost
from peer.pipeline.wire import state_limits
from peer.recovery import rebuild
from peer.recovery.transfer import download_state
from peer.sync.base import SyncMode
from protocols import checkpoint_index as ci
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.recovery_report import RecoveryReport

log = logging.getLogger("shoal.checkpoints")
UPLOAD_TIMEOUT_S = 300.0
INIT_TRIES = 10


def serialize_stage(host: StageHost, spec_hash: str, peer_id: str) -> bytes:
    """The stage's whole state as safetensors bytes (compute thread; a copy of the live state)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in host.state_arrays().items()}
    meta = {"format": ci.FORMAT, "stage": str(host.stage), "step": str(host.step),
            "spec_hash": spec_hash, "peer_id": peer_id}
    return save_safetensors(arrays, metadata=meta)


def load_stage(host: StageHost, directory: str) -> int:
    """Load `host`'s stage from the checkpoint in `directory`; returns its step. Compute thread.
    Raises CheckpointError (index, spec, hash, format, values) or StageError (shapes)."""
    index = ci.read_index(directory)
    ci.check_for_run(index, host.spec, host.stage)
    data = ci.read_stage_bytes(index, host.stage)
    return load_stage_bytes(host, data, index.step,
                            str(index.folder / index.stages[host.stage].file))


def load_stage_bytes(host: StageHost, data: bytes, step: int, path: str) -> int:
    """Load `host`'s stage from one checkpoint file's hash-checked bytes (`path` names it in
    messages); returns `step`. Compute thread. Raises CheckpointError or StageError."""
    meta = ci.safetensors_metadata(data)
    if meta.get("stage") != str(host.stage) or meta.get("step") != str(step):
        raise ci.CheckpointError(f"{path} says stage {meta.get('stage')!r} step "
                                 f"{meta.get('step')!r}, its index stage {host.stage} step "
                                 f"{step}")
    try:
        arrays = load_safetensors(data)
    except SafetensorError as exc:
        raise ci.CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ci.CheckpointError(f"{path}: {name} holds NaN or inf; use an earlier "
                                     "checkpoint")
    if "meta.step" not in arrays or int(arrays["meta.step"].reshape(-1)[0]) != step:
        raise ci.CheckpointError(f"{path}: meta.step is missing or differs from the index's "
                                 f"step {step}")
    host.load_state_arrays(arrays)
    return step


def designated(d: PeerContext) -> bool:
    """Whether this replica uploads its stage's checkpoint: the smallest live peer id of it."""
    assert d.host is not None
    return min({*d.live_replicas(d.host.stage), d.peer_id}) == d.peer_id


def live_step(d: PeerContext) -> int:
    """The newest step a live holder of any stage reports in the view (0 when none does)."""
    return max((p.stats.step for p in (d.view.peers if d.view is not None else ())
                if p.state in READY_STATES and p.peer_id != d.peer_id), default=0)


async def _coordinator_stub(d: PeerContext) -> pbg.CheckpointsStub:
    return pbg.CheckpointsStub(await d.client.channel())


async def upload(d: PeerContext, stage: int, step: int, data: bytes, spec_hash: str
                 ) -> pb.CheckpointAck:
    """Stream one stage file to the coordinator's Checkpoints.Put (event loop)."""
    sha = ci.sha256_hex(data)
    n = ci.CHUNK_BYTES

    async def chunks():
        yield pb.CheckpointChunk(step=step, stage=stage, sha256=sha, size=len(data),
                                 spec_hash=spec_hash, data=data[:n])
        for off in range(n, len(data), n):
            yield pb.CheckpointChunk(data=data[off:off + n])

    stub = await _coordinator_stub(d)
    return await stub.Put(chunks(), timeout=UPLOAD_TIMEOUT_S)


async def fetch_init(d: PeerContext, stage: int) -> tuple[int, bytes]:
    """(step, bytes) of `stage` in the checkpoint the run spec's checkpoint.init names, from the
    coordinator's Checkpoints.Get, size, SHA-256 and spec hash checked. Raises CheckpointError,
    grpc.aio.AioRpcError.

    A refusal because this peer's lease lapsed (taking a stage builds it on the event loop, which
    can hold the heartbeats back for seconds on a busy machine) is retried while the heartbeat
    loop re-joins, for at most INIT_TRIES heartbeats."""
    for _ in range(INIT_TRIES - 1):
        try:
            return await _fetch_init(d, stage)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNAVAILABLE):
                raise
            log.info("stage %d: the coordinator did not serve the checkpoint yet (%s); again "
                     "after a heartbeat", stage, exc.details())
            await asyncio.sleep(d.spec.membership.heartbeat_s)
    return await _fetch_init(d, stage)


async def _fetch_init(d: PeerContext, stage: int) -> tuple[int, bytes]:
    stub = await _coordinator_stub(d)
    limit = state_limits(d.spec).max_total_bytes
    first: pb.CheckpointChunk | None = None
    parts: list[bytes] = []
    got = 0
    async for chunk in stub.Get(pb.CheckpointRequest(stage=stage), timeout=UPLOAD_TIMEOUT_S):
        first = first or chunk
        got += len(chunk.data)
        if got > min(first.size, limit):
            raise ci.CheckpointError(f"the coordinator's stage {stage} exceeds its size "
                                     f"{first.size} (or this run's bound {limit})")
        parts.append(bytes(chunk.data))
    data = b"".join(parts)
    if first is None or len(data) != first.size or ci.sha256_hex(data) != first.sha256:
        raise ci.CheckpointError(f"stage {stage} from the coordinator arrived torn or corrupt "
                                 f"({len(data)} bytes hashing to {ci.sha256_hex(data)[:12]})")
    if first.spec_hash != ci.spec_hash(d.spec):
        raise ci.CheckpointError("the coordinator's checkpoint.init is of another run spec")
    return int(first.step), data


class DurableCheckpoints:
    """The daemon's checkpoint duties: upload at checkpoint steps, resume at start."""

    def __init__(self, resume: str | None = None) -> None:
        self.resume = resume or None  # --resume; else the run spec's checkpoint.init
        self._started = False  # only the first stage a peer takes may come from a checkpoint
        self.last_step = 0
        self._task: asyncio.Task | None = None
        self.uploaded = 0

    async def after_step(self, d: PeerContext) -> None:
        """Event loop, under the step lock, right after a step: start the upload if one is due."""
        host, every = d.host, d.spec.checkpoint.every
        if (not every or host is None or host.step % every or host.step <= self.last_step
                or not designated(d)):
            return
        if self._task is not None and not self._task.done():
            log.warning("stage %d: checkpoint of step %d skipped: the upload of step %d is still "
                        "under way", host.stage, host.step, self.last_step)
            return
        self.last_step = step = host.step
        spec_hash = ci.spec_hash(d.spec)
        data = await host.run(serialize_stage, host, spec_hash, d.peer_id)
        self._task = asyncio.ensure_future(self._send(d, host.stage, step, data, spec_hash))

    async def _send(self, d: PeerContext, stage: int, step: int, data: bytes,
                    spec_hash: str) -> None:
        try:
            ack = await upload(d, stage, step, data, spec_hash)
        except Exception as exc:  # grpc errors, a coordinator away: the next checkpoint retries
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning("stage %d: checkpoint of step %d not uploaded: %s", stage, step, why)
            return
        self.uploaded += int(ack.stored)
        log.info("stage %d: checkpoint of step %d uploaded (%d bytes): %s", stage, step,
                 len(data), ack.detail)

    async def take_state(self, d: PeerContext, mode: SyncMode, stage: int,
                         init_model: str | None) -> RecoveryReport | None:
        """The daemon's `_take_stage`: recovery.rebuild.take_state, or, when resuming and no
        live replica of the stage gives its state, the checkpoint (see the module docstring).
        Raises SystemExit when the checkpoint is refused."""
        served = not self.resume and bool(d.spec.checkpoint.init)
        directory = None if self._started else (self.resume or d.spec.checkpoint.init)
        self._started = True
        if not directory:
            return await rebuild.take_state(d, mode, stage, init_model)
        where = f"the coordinator's {directory}" if served else directory
        host = d.host
        assert host is not None
        sources = [p for p in d.live_replicas(stage) if p != d.peer_id]
        if sources and await download_state(d, mode, sources):
            log.info("stage %d: a live replica gave its state (step %d); the checkpoint in %s "
                     "is not needed", stage, host.step, directory)
            return None
        try:
            if served:
                at, data = await fetch_init(d, stage)
            else:
                at = ci.read_index(directory).step
            if (ahead := live_step(d)) > at:
                log.warning("stage %d: the swarm is after step %d, past the checkpoint in %s "
                            "(step %d): not resuming from it, taking the stage as any new "
                            "holder does", stage, ahead, where, at)
                return await rebuild.take_state(d, mode, stage, init_model)
            if served:
                step = await host.run(load_stage_bytes, host, data, at, where)
            else:
                step = await host.run(load_stage, host, directory)
        except (ci.CheckpointError, StageError, grpc.aio.AioRpcError) as exc:
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
            raise SystemExit(f"shoal peer: cannot resume stage {stage} from {where}: "
                             f"{why}") from None
        log.info("stage %d: resumed from the checkpoint in %s at step %d (weights, optimizer "
                 "and sync state; hash-checked)", stage, where, step)
        return None
