"""The State service a peer serves: downloads of its stage's state (joins, re-downloads,
CheckFree's neighbour pulls, `shoal export`), in-band or over the peer's data plane, and the
snapshot those downloads are made from (`encode_state`, in kept buffers: peer/snapshot.py).

Split out of peer/services.py (which serves it beside Stage and Sync and re-exports these
names) because the bulk path has its own concerns: the data-plane ticket, the snapshot buffers'
lifetime, the digest that follows the copy. Authorization comes first, as for every service
(peer/authz.py's DOWNLOAD rule: any admitted identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING

import grpc
import numpy as np

from peer import authz
from peer.consistency import READY_STATES
from peer.pipeline import wire
from peer.policy import Policy
from peer.snapshot import SnapshotBuffers
from protocols import codec, dataplane, digest, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg

if TYPE_CHECKING:
    from peer.services import ServiceContext

log = logging.getLogger("shoal.services")

#: a state of at least this many bytes goes over the data plane to a receiver that takes it
#: (SHOAL_STATE_DATAPLANE_MIN_BYTES overrides it: swarm tests send their small states that way)
STATE_DATAPLANE_MIN_BYTES = int(os.environ.get("SHOAL_STATE_DATAPLANE_MIN_BYTES", "")
                                or dataplane.DATAPLANE_MIN_BYTES)


class StateService(pbg.StateServicer):
    """`State.Download`: the stage's state, snapshotted between steps and encoded under the step
    lock on a worker thread (the loop keeps serving). To a receiver that takes it
    (StateRequest.accept_dataplane) and a state of at least STATE_DATAPLANE_MIN_BYTES, the answer
    is a header pointing at the peer's data plane (`ctx.dataplane`, a protocols.dataplane
    DataPlaneServer the daemon runs, TLS with the peer's leaf when its gRPC server is mTLS),
    with a BLAKE3 payload digest when the receiver accepts it (StateRequest.accept_digests);
    otherwise, or when the data plane is full, the in-band stream of 2 MiB chunks as before.

    Data-plane snapshots are copied into buffers kept between downloads (`snapshots`,
    peer/snapshot.py): a buffer is held from the snapshot until the data plane has sent it (or
    failed to, or dropped its ticket), so a later download never overwrites a snapshot still
    being sent; it copies the state afresh into a free buffer."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.d = ctx
        self.policy = Policy.of(ctx)
        self.snapshots = SnapshotBuffers()

    async def Download(self, request: pb.StateRequest, context):
        d = self.d
        try:
            await self.policy.authorize(authz.DOWNLOAD)
        except authz.Denied as exc:
            await context.abort(exc.code, f"Download: {exc.message}")
            raise  # abort raises; this keeps a fake context from going on
        host = d.host
        if host is None or host.stage != request.stage or d.state not in (*READY_STATES,
                                                                          "draining"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this peer does not hold a ready stage {request.stage}")
            return
        plane: dataplane.DataPlaneServer | None = getattr(d, "dataplane", None)  # daemon's
        # Snapshot between steps: the step lock keeps an optimizer step from tearing it (the
        # arrays may share memory with the live tensors, so they are encoded under it too).
        checkpoint = (d.mode.joiner_checkpoint() if request.ledger_snapshot and d.mode is not None
                      else None)
        if checkpoint is not None:  # SPSA: the last hash-checked checkpoint; the joiner replays
            step, arrays, state_hash = checkpoint
            enc = await self._encoded(request, plane, arrays)
        else:
            async with d.step_lock:
                if request.include_optimizer:  # a joining replica: everything, as it is
                    arrays = await host.run(host.state_arrays, True)
                    state_hash = host.state_hash()
                else:  # export / inference: the agreed weights, hashed as sent
                    arrays, state_hash = await host.run(host.agreed_arrays)
                step = host.step
                enc = await self._encoded(request, plane, arrays)
        payload = enc.payload
        # a snapshot buffer goes back when the data plane is done with it, else below
        snapshots = self.snapshots
        release = ((lambda: snapshots.give_back(enc.payload)) if snapshots.holds(payload)
                   else None)
        try:
            header = pb.CallHeader(kind="state", step=step, stage=host.stage, sender=d.peer_id)
            header.meta["state_hash"] = state_hash
            header.meta["sync_mode"] = d.spec.sync.mode
            codec.fill_header(header, enc)
            if self._over_dataplane(request, plane, enc.total_bytes):
                try:
                    answer = plane.offer(header, payload, on_done=release)
                except dataplane.TooManyTickets as exc:
                    log.info("state download in-band: %s", exc)
                    payload = await asyncio.to_thread(bytes, payload)  # protobuf takes bytes
                else:
                    release = None  # the data plane gives it back
                    d.counter.add("state", sent=answer.ByteSize() + enc.total_bytes)
                    yield pb.TensorChunk(header=answer)
                    return
        finally:
            if release is not None:
                release()
        for chunk in tensor_stream.chunks(header, payload, wire.CHUNK_BYTES):
            d.counter.add("state", sent=chunk.ByteSize())
            yield chunk

    @staticmethod
    def _over_dataplane(request: pb.StateRequest, plane: dataplane.DataPlaneServer | None,
                        nbytes: int) -> bool:
        return (request.accept_dataplane and plane is not None
                and nbytes >= STATE_DATAPLANE_MIN_BYTES)

    async def _encoded(self, request: pb.StateRequest,
                       plane: dataplane.DataPlaneServer | None, arrays: dict) -> codec.Encoded:
        """`_encode` on a worker thread. A download cancelled meanwhile (the receiver went away)
        gives its snapshot buffer back once the thread is done with it, instead of holding it
        for ever."""
        job = asyncio.get_running_loop().run_in_executor(None, self._encode, request, plane,
                                                         arrays)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(self._abandoned)
            raise

    def _abandoned(self, job: asyncio.Future) -> None:
        if not job.cancelled() and job.exception() is None:
            payload = job.result().payload
            if self.snapshots.holds(payload):
                self.snapshots.give_back(payload)

    def _encode(self, request: pb.StateRequest, plane: dataplane.DataPlaneServer | None,
                arrays: dict) -> codec.Encoded:
        """The state's payload, digested with BLAKE3 when it goes over the data plane to a
        receiver that checks BLAKE3 (cheaper for both ends: protocols.digest), else SHA-256; a
        data-plane payload in a snapshot buffer (`snapshots`)."""
        nbytes = sum(getattr(a, "nbytes", 0) for a in arrays.values())
        if not self._over_dataplane(request, plane, nbytes):
            return codec.encode(arrays, pb.RAW)
        alg = digest.BLAKE3 if digest.BLAKE3 in request.accept_digests else digest.SHA256_TREE
        return encode_state(arrays, alg, self.snapshots)


def encode_state(arrays: dict, alg: str, buffers: SnapshotBuffers | None = None
                 ) -> codec.Encoded:
    """`codec.encode(arrays, pb.RAW, digest=alg)` with the payload assembled in one numpy buffer
    (so `Encoded.payload` is a uint8 array, for the data plane, which takes any buffer).

    With `buffers` the payload is a buffer `take`n from them (one kept from an earlier snapshot
    of the same size when one is free: its pages are mapped already); the caller gives it back
    (`buffers.give_back(enc.payload)`, when `buffers.holds` it) once nothing reads it.

    Why one numpy buffer: a large numpy buffer gets transparent huge pages (THP is "madvise"
    here and numpy advises it), a fresh `bytes` object (codec.encode's b"".join) gets 4 KiB
    pages, and faulting those in made the sender's snapshot ~2.5x slower. Why kept buffers: on
    this project's VMs freed memory goes back to the host within seconds and faulting a fresh
    buffer in was most of the snapshot (peer/snapshot.py); a fresh one is faulted in on a helper
    thread ahead of the copy (protocols.dataplane.Prefault). The digest is computed on another
    thread as the copy goes, 8 MiB behind it (protocols.digest's receive-while-landing hashers),
    over the buffer's bytes: what is sent is what is hashed.
    Same TensorHeaders, payload bytes and digest as codec.encode (tested); arrays of any other
    kind than the codec's plain little-endian dtypes go through codec.encode (no buffer taken)."""
    tensors, parts = [], []
    for name, value in arrays.items():
        array = np.asarray(value)
        label = "bool" if array.dtype == np.bool_ else array.dtype.name
        if codec.DTYPES.get(label) != array.dtype or not array.dtype.isnative:
            return codec.encode(arrays, pb.RAW, digest=alg)
        parts.append(array)
        tensors.append(pb.TensorHeader(name=name, dtype=label, shape=array.shape,
                                       encoding=pb.RAW, payload_bytes=array.nbytes))
    nbytes = sum(a.nbytes for a in parts)
    if buffers is None:
        payload, fresh = np.empty(nbytes, np.uint8), True
    else:
        payload, fresh = buffers.take(nbytes)
    try:
        hasher = digest.stream_for(alg, memoryview(payload), 1)
        try:
            with dataplane.Prefault(payload) if fresh else contextlib.nullcontext():
                offset = 0
                for array in parts:  # one copy each, strided or not, straight into the payload
                    _copy_hashing(array, payload[offset: offset + array.nbytes], offset, hasher)
                    offset += array.nbytes
                hasher.filled(nbytes)
            value = hasher.digest()
        finally:
            hasher.close()
    except BaseException:
        if buffers is not None:
            buffers.give_back(payload)
        raise
    return codec.Encoded(tensors, payload, value, alg)


SNAPSHOT_PIECE = 8 << 20  # bytes copied before the hashing thread hears of them


def _copy_hashing(array: np.ndarray, out: np.ndarray, offset: int, hasher) -> None:
    """Copy `array` into `out` (its bytes at `offset` of the payload), telling `hasher` as each
    piece is final; a strided array is copied whole."""
    if not array.flags.c_contiguous or array.nbytes <= SNAPSHOT_PIECE:
        np.copyto(out.view(array.dtype).reshape(array.shape), array)
        hasher.filled(offset + array.nbytes)
        return
    source = array.reshape(-1).view(np.uint8)
    for start in range(0, array.nbytes, SNAPSHOT_PIECE):
        stop = min(array.nbytes, start + SNAPSHOT_PIECE)
        np.copyto(out[start:stop], source[start:stop])
        hasher.filled(offset + stop)
