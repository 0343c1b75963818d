"""Durable checkpoints: the coordinator's side. A whole run survives losing every peer.

Design (docs/checkpoints.md):

- Who writes what. Peers run on other machines than the coordinator, so the coordinator keeps
  the files. Every `checkpoint.every` optimizer steps, each stage's designated replica (the live
  ready replica with the smallest peer id, peer/recovery/durable.py) takes its stage's whole
  state right after the step — weights, AdamW moments, the sync mode's state, the step and the
  learning-rate scale, as `StageHost.state_arrays` names them — serializes it as one safetensors
  file and streams it with its SHA-256 over `Checkpoints.Put` (protocols/proto/shoal.proto).
  This module checks the upload (a live member of that stage, a checkpoint step, the run's spec
  hash, size bounded by the spec, bytes that hash to the SHA-256 sent, a safetensors header that
  names the same stage and step) and writes DIR/step-<N>/stage-<k>.safetensors atomically. It
  never imports torch: the bytes are stored as they came.
- The index. Once every stage 0..S of step N is on disk, it writes DIR/step-<N>/index.json, then
  DIR/index.json (the same, naming the step folder), each atomically and after the files they
  name (protocols/checkpoint_index.py), so an index only ever names complete files. Then it
  deletes complete checkpoints beyond the newest `checkpoint.keep` and unfinished steps older
  than the newest complete one.
- Failures. A full disk or any failing write logs an error and refuses that upload; the run goes
  on, and the previous index (and its files) stay as they were. A duplicate upload of a stage
  (two replicas that both thought they were designated) is answered `stored = false`.
- Resume. `shoal peer --resume DIR` reads a checkpoint folder local to the peer (a copy, a
  shared mount). The run spec's `checkpoint.init` names one on the coordinator's machine, which
  `Checkpoints.Get` serves stage by stage (read and hash-checked here against its index and the
  run's spec) to the peer that takes a stage while no live replica holds it. Either way the peer
  checks the spec hash and SHA-256 again, loads the state and starts after its step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from protocols import checkpoint_index as ci
from protocols import shoal_pb2 as pb
from protocols.auth import current_caller
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.checkpoints")
SERVICE_NAME = "shoal.v1.Checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{9,})$")


def with_flags(spec: RunSpec, every: int | None, directory: str | None) -> RunSpec:
    """The run spec with `shoal coordinator --checkpoint-every/--checkpoint-dir` applied (a flag
    given wins over the spec's checkpoint section). Raises RunSpecError on a bad value."""
    changes: dict[str, object] = {}
    if every is not None:
        changes["checkpoint.every"] = every
    if directory:
        changes["checkpoint.dir"] = str(Path(directory).resolve())
    return spec.replace(**changes) if changes else spec


def max_stage_bytes(spec: RunSpec) -> int:
    """A bound on one stage's checkpoint file: five fp32 copies (weights, two AdamW moments, two
    of a sync mode's) of 16 d^2 per layer plus embedding and head, and 64 MiB of slack."""
    m = spec.model
    params = 16 * m.d_model * m.d_model * m.n_layers + 2 * m.vocab * m.d_model
    return 5 * 4 * params + (64 << 20)


class CheckpointWriter:
    """Stage files as they come, an index once a step is complete, old checkpoints pruned.

    `store` runs on the event loop and does its disk work in a thread, one store at a time.
    """

    def __init__(self, directory: str | Path, spec: RunSpec) -> None:
        self.dir = Path(directory)
        self.spec = spec
        self.spec_hash = ci.spec_hash(spec)
        self.n_stages = spec.pipeline.stages + 1
        self.keep = spec.checkpoint.keep
        self.partial: dict[int, dict[int, ci.StageEntry]] = {}
        self.complete_step = 0
        self.errors = 0
        self._lock = asyncio.Lock()
        with contextlib.suppress(ci.CheckpointError):
            old = ci.read_index(self.dir)
            if old.spec_hash == self.spec_hash:
                self.complete_step = old.step

    def wants(self, step: int, stage: int) -> str:
        """Empty when an upload of (`step`, `stage`) is welcome, else why not."""
        if step <= self.complete_step:
            return (f"step {step} is not newer than the last complete checkpoint "
                    f"(step {self.complete_step})")
        if stage in self.partial.get(step, {}):
            return f"stage {stage} of step {step} is already stored"
        return ""

    async def store(self, step: int, stage: int, data: bytes, sha256: str) -> tuple[bool, str]:
        """Write one stage file of `step` (its bytes already checked); when it completes the
        step, write the indexes and prune. Returns (stored, detail); never raises OSError."""
        async with self._lock:
            if why := self.wants(step, stage):
                return False, why
            try:
                await asyncio.to_thread(self._write_stage, step, stage, data)
            except OSError as exc:
                self.errors += 1
                log.error("checkpoint of step %d: writing stage %d to %s failed (%s); the run "
                          "goes on, the last complete checkpoint (step %d) stays valid", step,
                          stage, self.dir, exc, self.complete_step)
                return False, f"the coordinator could not write the file: {exc}"
            self.partial.setdefault(step, {})[stage] = ci.StageEntry(
                ci.stage_file_name(stage), sha256, len(data))
            if len(self.partial[step]) < self.n_stages:
                if len(self.partial[step]) == 1:  # a new step: forget steps that never completed
                    await asyncio.to_thread(self._prune_unfinished)
                return True, f"stage {stage} of step {step} stored"
            index = ci.Index(step, self.spec_hash, dict(self.partial[step]),
                             self.dir / ci.step_dir_name(step), self.spec.run.name)
            try:
                await asyncio.to_thread(self._write_index, index)
            except OSError as exc:
                self.errors += 1
                log.error("checkpoint of step %d: writing its index in %s failed (%s); the run "
                          "goes on, the last complete checkpoint (step %d) stays valid", step,
                          self.dir, exc, self.complete_step)
                return False, f"the coordinator could not write the index: {exc}"
            self.complete_step = step
            for s in [s for s in self.partial if s <= step]:
                del self.partial[s]
            log.info("checkpoint of step %d complete: %d stages in %s", step, self.n_stages,
                     index.folder)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._prune)
            return True, f"stage {stage} of step {step} stored; the checkpoint is complete"

    def _write_stage(self, step: int, stage: int, data: bytes) -> None:
        folder = self.dir / ci.step_dir_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        ci.write_atomic(folder / ci.stage_file_name(stage), data)

    def _write_index(self, index: ci.Index) -> None:
        ci.write_atomic(index.folder / ci.INDEX_FILE, index.to_json().encode())
        ci.write_atomic(self.dir / ci.INDEX_FILE, index.to_json(root=True).encode())

    def _prune_unfinished(self) -> None:
        """Keep the newest `keep` steps still being uploaded; delete older ones that never
        completed (a stage whose upload keeps failing must not fill the disk)."""
        for step in sorted(self.partial, reverse=True)[self.keep:]:
            del self.partial[step]
            shutil.rmtree(self.dir / ci.step_dir_name(step), ignore_errors=True)
            log.warning("checkpoint of step %d never completed (a stage's upload did not come); "
                        "its files are deleted", step)

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints and any step newer than the newest
        complete one (still being uploaded); delete the rest."""
        steps = []
        for d in self.dir.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                steps.append((int(m.group(1)), d))
        complete = sorted((s for s, d in steps if (d / ci.INDEX_FILE).is_file()), reverse=True)
        kept = set(complete[: self.keep])
        for s, d in steps:
            if s <= self.complete_step and s not in kept:
                shutil.rmtree(d, ignore_errors=True)
                log.info("checkpoint of step %d deleted (keeping %d)", s, self.keep)


class CheckpointService:
    """`shoal.v1.Checkpoints`: takes stage files from the designated replicas."""

    def __init__(self, spec: RunSpec, writer: CheckpointWriter | None,
                 stage_of: Callable[[str], int | None]) -> None:
        """`stage_of(peer_id)`: the stage a live member holds, None for anyone else."""
        self.spec = spec
        self.writer = writer
        self.stage_of = stage_of
        self.max_bytes = max_stage_bytes(spec)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        put = grpc.stream_unary_rpc_method_handler(
            self.Put, request_deserializer=pb.CheckpointChunk.FromString,
            response_serializer=pb.CheckpointAck.SerializeToString)
        get = grpc.unary_stream_rpc_method_handler(
            self.Get, request_deserializer=pb.CheckpointRequest.FromString,
            response_serializer=pb.CheckpointChunk.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Put": put, "Get": get}),))

    async def Put(self, requests: AsyncIterator[pb.CheckpointChunk],
                  context: grpc.aio.ServicerContext) -> pb.CheckpointAck:
        w = self.writer
        if w is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this coordinator keeps no checkpoints (start it with "
                                "--checkpoint-every N --checkpoint-dir DIR)")
        caller = current_caller()
        it = requests.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty checkpoint upload")
        step, stage = int(first.step), int(first.stage)
        why = self._refusal(first, caller.peer_id if caller else "")
        if why:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT
                                if not why.startswith("peer") else
                                grpc.StatusCode.PERMISSION_DENIED, why)
        if why := w.wants(step, stage):
            return pb.CheckpointAck(stored=False, detail=why, complete_step=w.complete_step)
        parts, got = [bytes(first.data)], len(first.data)
        async for chunk in it:
            got += len(chunk.data)
            if got > first.size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the upload of stage {stage} exceeds its size {first.size}")
            parts.append(bytes(chunk.data))
        data = b"".join(parts)
        if len(data) != first.size or ci.sha256_hex(data) != first.sha256:
            await context.abort(grpc.StatusCode.DATA_LOSS,
                                f"stage {stage} of step {step}: {len(data)} bytes hashing to "
                                f"{ci.sha256_hex(data)[:12]}, the upload said {first.size} bytes "
                                f"hashing to {first.sha256[:12]}; upload it again")
        try:
            meta = ci.safetensors_metadata(data)
        except ci.CheckpointError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stage {stage}: {exc}")
        if meta.get("stage") != str(stage) or meta.get("step") != str(step):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the file's header says stage {meta.get('stage')!r} step "
                                f"{meta.get('step')!r}, the upload stage {stage} step {step}")
        stored, detail = await w.store(step, stage, data, first.sha256)
        return pb.CheckpointAck(stored=stored, detail=detail, complete_step=w.complete_step)

    async def Get(self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext
                  ) -> AsyncIterator[pb.CheckpointChunk]:
        """Stream stage `request.stage` of the checkpoint `checkpoint.init` names, read and
        checked against its index here, to a live replica of that stage."""
        init, stage = self.spec.checkpoint.init, int(request.stage)
        caller = current_caller()
        if not init:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this run names no checkpoint to start from (checkpoint.init)")
        if (held := self.stage_of(caller.peer_id if caller else "")) != stage:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"only a live replica of stage {stage} may fetch its checkpoint "
                                f"(peer {caller.peer_id[:12] if caller else '?'} holds "
                                f"{'no stage' if held is None else f'stage {held}'})")
        try:
            index, data = await asyncio.to_thread(self._read_init, stage)
        except ci.CheckpointError as exc:
            log.error("checkpoint.init: stage %d cannot be served: %s", stage, exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the coordinator's checkpoint.init: {exc}")
        n = ci.CHUNK_BYTES
        yield pb.CheckpointChunk(step=index.step, stage=stage, sha256=ci.sha256_hex(data),
                                 size=len(data), spec_hash=index.spec_hash, data=data[:n])
        for off in range(n, len(data), n):
            yield pb.CheckpointChunk(data=data[off:off + n])

    def _read_init(self, stage: int) -> tuple[ci.Index, bytes]:
        index = ci.read_index(self.spec.checkpoint.init)
        ci.check_for_run(index, self.spec, stage)
        return index, ci.read_stage_bytes(index, stage)

    def _refusal(self, first: pb.CheckpointChunk, peer_id: str) -> str:
        every, n = self.spec.checkpoint.every, self.spec.pipeline.stages + 1
        step, stage = int(first.step), int(first.stage)
        if not 0 <= stage < n:
            return f"stage must be in 0..{n - 1}, got {stage}"
        if self.stage_of(peer_id) != stage:
            return (f"peer {peer_id[:12]} is no live replica of stage {stage}; only a stage's "
                    "own replicas upload its checkpoint")
        if step <= 0 or step >= 1 << 53 or step % every:
            return f"step {step} is not a checkpoint step (every {every} steps)"
        if not 0 < first.size <= self.max_bytes:
            return f"size must be in 1..{self.max_bytes} bytes for this model, got {first.size}"
        if not re.fullmatch(r"[0-9a-f]{64}", first.sha256):
            return "sha256 must be 64 lowercase hex digits"
        if first.spec_hash != self.writer.spec_hash:
            return (f"the upload is for run spec {first.spec_hash[:12]}, this run's is "
                    f"{self.writer.spec_hash[:12]}")
        return ""


def install(server: grpc.aio.Server, spec: RunSpec, membership) -> CheckpointService:
    """Register the Checkpoints service (coordinator/main.py's `serve`), with a writer when the
    run keeps checkpoints. `membership`: coordinator.membership.Membership."""
    writer = None
    if spec.checkpoint.init:
        log.info("the run starts from the checkpoint in %s (checkpoint.init)",
                 spec.checkpoint.init)
    if spec.checkpoint.every > 0:
        writer = CheckpointWriter(spec.checkpoint.dir, spec)
        log.info("durable checkpoints every %d steps in %s (keeping %d; last complete: step %d)",
                 spec.checkpoint.every, writer.dir, writer.keep, writer.complete_step)

    def stage_of(peer_id: str) -> int | None:
        m = membership.get(peer_id)
        return m.stage if m is not None and m.live else None

    svc = CheckpointService(spec, writer, stage_of)
    svc.add_to_server(server)
    return svc
