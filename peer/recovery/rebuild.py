"""Rebuilding a block stage that lost every replica, without a checkpoint (ALGORITHMS.md §3).

The coordinator marks a stage that empties after training with a `rebuild` method
(coordinator/membership.py). The next peer that takes the stage finds no replica to copy and
calls `rebuild_stage` (from the daemon's `_take_stage`), which follows
optim/checkfree.plan_recovery:

- inner stage s, both neighbours live (CheckFree): download the parameters of s-1 and s+1 from
  live replicas (peer/recovery/transfer.py: every download hash-checked against the state hash
  the sender claims and the one the coordinator attests), average them weighted by each
  neighbour's last gradient norm *as the coordinator's view reports it* (StageInfo.grad_norm),
  taken after clipping at `optim.grad_clip` as the reference measures it (peers report the
  pre-clip norm: `optim.checkfree.post_clip_norm`);
- edge stage with CheckFree+ (stages 1, 2, S-1, S): a copy of its swap partner, which the
  odd-microbatch swaps trained to stand in for it (at S = 3: stages 1 and 3 copy stage 2, stage 2
  averages 1 and 3; peer/pipeline/paths.py's `checkfree_swap_pairs`);
- stage 0 with CheckFree+: its embedding and norm from the copy that stage 1 (else stage S) keeps
  and refreshes every few steps (peer/recovery/edge_copy.py);
- otherwise (two adjacent stages lost, an edge stage without CheckFree+, or any failure of the
  above): the newest local snapshot in `--snapshot-dir` (peer/recovery/snapshots.py), else a copy
  of the nearest live stage, else the initial weights. This is a *degraded* recovery and is logged
  at ERROR level as such.

Every rebuild starts a fresh optimizer and multiplies the stage's learning rate by
`optim.checkfree.LR_BOOST` (1.1) for the rest of the run. The step counter is the neighbours'
(or the swarm's, from the view): the stage had no replica, so no update of it was missed.

What the peer did goes into a `RecoveryReport` (protocols/recovery_report.py); the daemon
reports it to the coordinator inside its heartbeat stats as the bytes_by_kind key
`recovery:<method>:<sources>` (value: the step it was rebuilt at). The coordinator turns it into
the rebuild event's detail and never counts it as bytes.

Collaborators get a `PeerContext` (peer/context.py), never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
import torch

from optim.checkfree import (
    LR_BOOST,
    Recovery,
    copy_neighbor,
    plan_recovery,
    post_clip_norm,
    stage_zero_from_edge_copy,
    weighted_average,
)
from optim.errors import NonFiniteValues, ShapeMismatch, StateMismatch
from peer.consistency import READY_STATES, may_fast_forward, swarm_step
from peer.context import PeerContext
from peer.pipeline.stage_host import StageError, StageHost
from peer.recovery import snapshots
from peer.recovery.transfer import attested_first, download_state, fetch_state
from peer.sync.base import SyncMode, forget_pending
from protocols.recovery_report import RecoveryReport

log = logging.getLogger("shoal.recovery")


class RebuildFailed(RuntimeError):
    """A source of the rebuild (a neighbour's download, a snapshot) could not be used."""


async def fetch_stage_params(d: PeerContext, stage: int, buffers: bool = False
                             ) -> tuple[dict[str, torch.Tensor], int]:
    """The parameters of `stage` (with `buffers`: its whole state dict, CheckFree+'s copy of
    stage 0 included) and its step, from the first live replica that gives a state whose hash
    matches what it claims and what the coordinator attests for its step
    (peer/recovery/transfer.py; replicas that report the attested state are tried first).
    Raises RebuildFailed when none does."""
    spec = d.spec
    errors = []
    for pid in attested_first(d.view, stage, d.live_replicas(stage)):
        scratch = StageHost(spec, stage, device="cpu")
        try:
            await fetch_state(d, pid, scratch)
            got = scratch.module.state_dict() if buffers else scratch.params()
            return {k: v.detach().clone() for k, v in got.items()}, scratch.step
        except (grpc.aio.AioRpcError, StageError, KeyError, ValueError) as exc:
            errors.append(f"{pid[:8]}: {exc}")
            log.warning("stage %d download from %s for a rebuild failed: %s", stage, pid[:8], exc)
        finally:
            scratch.close()
    raise RebuildFailed(f"no live replica of stage {stage} gave a hash-checked state"
                        + (f" ({'; '.join(errors)})" if errors else " (none in the view)"))


def _alive_block_stages(d: PeerContext) -> set[int]:
    return {s for s in range(1, d.spec.pipeline.stages + 1) if d.live_replicas(s)}


def _grad_norm(d: PeerContext, stage: int) -> float:
    """`stage`'s last gradient norm after clipping (CheckFree's weight; NaN when unknown)."""
    norm = d.stage_info(stage, "grad_norm")
    if not isinstance(norm, (int, float)):
        return float("nan")
    return post_clip_norm(float(norm), d.spec.optim.grad_clip)


async def rebuild_stage(d: PeerContext) -> RecoveryReport:
    """Rebuild the stage `d.host` holds (no replica of it is live) and load it into the host."""
    host = d.host
    stage, n = host.stage, d.spec.pipeline.stages
    alive = _alive_block_stages(d) - {stage}
    plan = plan_recovery(stage, n, alive, checkfree_plus=d.spec.pipeline.checkfree_plus)
    like = {k: v.detach() for k, v in host.params().items()}
    note = plan.note
    try:
        if plan.method == "weighted_average":
            (prev, step_a), (nxt, step_b) = [await fetch_stage_params(d, s) for s in plan.sources]
            w = (_grad_norm(d, plan.sources[0]), _grad_norm(d, plan.sources[1]))
            rec = weighted_average(prev, nxt, w[0], w[1], like=like)
            return await _load(d, RecoveryReport(stage, "weighted_average", plan.sources,
                                                 max(step_a, step_b), rec.weights, rec.note),
                               rec)
        if plan.method == "copy_neighbor":
            state, step = await fetch_stage_params(d, plan.sources[0])
            return await _load(d, RecoveryReport(stage, "copy_neighbor", plan.sources, step),
                               copy_neighbor(state, like=like))
        if plan.method == "edge_copy":
            return await _from_edge_copy(d, plan.sources, like)
    except (RebuildFailed, StateMismatch, ShapeMismatch, NonFiniteValues) as exc:
        note = f"{plan.method} from stages {list(plan.sources)} failed: {exc}"
    return await _degraded(d, stage, like, alive if stage > 0 else set(), note)


async def _from_edge_copy(d: PeerContext, sources: tuple[int, ...],
                          like: dict[str, torch.Tensor]) -> RecoveryReport:
    """Stage 0 from the CheckFree+ copy of it that the first of `sources` (stage 1, else S) to
    answer keeps. Raises RebuildFailed when none does."""
    errors = []
    for source in sources:
        try:
            state, step = await fetch_stage_params(d, source, buffers=True)
            rec = stage_zero_from_edge_copy(state, like=like)
        except (RebuildFailed, StateMismatch, ShapeMismatch, NonFiniteValues) as exc:
            errors.append(f"stage {source}: {exc}")
            continue
        return await _load(d, RecoveryReport(0, "edge_copy", (source,), step), rec)
    raise RebuildFailed("; ".join(errors))


async def _degraded(d: PeerContext, stage: int, like: dict[str, torch.Tensor], alive: set[int],
                    note: str) -> RecoveryReport:
    """Snapshot, else a copy of the nearest live stage, else the initial weights; loudly."""
    directory = d.snapshot_dir
    for snap in snapshots.list_snapshots(directory, stage) if directory else []:
        try:
            state = await d.host.run(snapshots.load_snapshot, snap, like)
        except snapshots.SnapshotError as exc:
            log.error("stage %d: snapshot %s unusable: %s", stage, snap.path.name, exc)
            continue
        report = RecoveryReport(stage, "snapshot", (), max(snap.step, swarm_step(d.view)),
                                note=f"{note}; restored {snap.path.name} (step {snap.step})")
        return await _load(d, report, Recovery(state, "snapshot"))
    for source in sorted(alive, key=lambda s: (abs(s - stage), s)):
        try:
            state, step = await fetch_stage_params(d, source)
            rec = copy_neighbor(state, like=like)
        except (RebuildFailed, StateMismatch, ShapeMismatch) as exc:
            note += f"; copy of stage {source} impossible: {exc}"
            continue
        report = RecoveryReport(stage, "copy_nearest", (source,), step,
                                note=f"{note}; no snapshot, copied stage {source}")
        return await _load(d, report, rec)
    report = RecoveryReport(stage, "initial", (), swarm_step(d.view),
                            note=f"{note}; no snapshot and no stage to copy: initial weights")
    return await _load(d, report, Recovery(like, "initial"))


async def _load(d: PeerContext, report: RecoveryReport, rec: Recovery) -> RecoveryReport:
    host = d.host
    await host.run(host.load_rebuilt, rec.state, report.step, LR_BOOST)
    if report.degraded:
        log.error("DEGRADED RECOVERY of stage %d: %s (step %d, lr x%.2f). %s", report.stage,
                  report.method, report.step, LR_BOOST, report.note)
    else:
        log.warning("stage %d rebuilt without a replica: %s from stages %s (weights %s) at step "
                    "%d, fresh optimizer, lr x%.2f%s", report.stage, report.method,
                    list(report.sources), report.weights, report.step, LR_BOOST,
                    f"; {report.note}" if report.note else "")
    return report


# ---------------------------------------------------------------------- daemon-side glue


async def take_state(d: PeerContext, mode: SyncMode, stage: int, init_model: str | None = None
                     ) -> RecoveryReport | None:
    """Fill a new holder's `d.host` (of `stage`): download it from a live replica; or, when the
    view says the stage lost every replica after training, rebuild it without one; or start from
    the exported model `init_model` / the initial weights when it is the first holder. Returns the
    rebuild's report, or None when nothing was rebuilt. Event loop, before the replica serves."""
    host = d.host
    assert host is not None
    report = None
    sources = [p for p in d.live_replicas(stage) if p != d.peer_id]
    if not sources and d.stage_info(stage, "rebuild"):
        report = await rebuild(d)
    elif not (sources and await download_state(d, mode, sources)):
        if sources and d.stage_info(stage, "step"):
            # The view listed replicas that did not answer: likely dead, lease not yet
            # expired. Wait for the coordinator to expire them, then rebuild or copy.
            report = await await_sources_or_rebuild(d, mode, stage)
        elif sources:
            log.warning("stage %d: no replica could give its state", stage)
        if report is None and not sources and init_model:
            await host.run(host.load_exported, init_model)
            log.info("stage %d: starting from the exported model in %s", stage, init_model)
    return report


async def rebuild(d: PeerContext) -> RecoveryReport:
    """The daemon's `_take_stage`: the view marks the stage for a rebuild and no replica is
    live. Returns what was done, for the heartbeats' report."""
    host = d.host
    assert host is not None
    log.warning("stage %d has no live replica and the coordinator asks for a %s rebuild",
                host.stage, d.stage_info(host.stage, "rebuild"))
    return await rebuild_stage(d)


async def await_sources_or_rebuild(d: PeerContext, mode: SyncMode, stage: int
                                   ) -> RecoveryReport | None:
    """Replicas listed in the view did not answer (dead, lease not yet expired): refresh the
    view until one answers (download) or the stage is marked for a rebuild (rebuild). Returns
    the rebuild's report, or None when it downloaded or gave up."""
    wait = 3 * d.spec.membership.lease_s
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(d.spec.membership.heartbeat_s)
        with contextlib.suppress(Exception):
            await d.refresh_view()
        sources = [p for p in d.live_replicas(stage) if p != d.peer_id]
        if not sources and d.stage_info(stage, "rebuild"):
            return await rebuild(d)
        if sources and await download_state(d, mode, sources):
            return None
    log.error("stage %d: no replica answered and no rebuild was asked for within %.0f s; "
              "starting from the initial weights", stage, wait)
    return None


def catch_up(d: PeerContext, step: int, *, holding_lock: bool = False) -> bool:
    """A later step reached a replica whose whole stage missed the steps in between (it was
    just rebuilt while paths bypassed it, or every replica missed the same EndSteps): no replica
    applied those steps, so adopting the step counter is exact. That holds when no other holder
    of the stage is ahead of this one or differs from it (peer/consistency.py's
    `may_fast_forward`). Returns False (and changes nothing) otherwise (the state must then be
    downloaded) or while a step is in progress (`holding_lock`: the caller holds the step lock,
    so none is). A view that lags is caught by the state-hash check of heartbeats."""
    host = d.host
    if (host is None or step <= host.step or (d.step_lock.locked() and not holding_lock)
            or d.view is None):
        return False
    if not may_fast_forward(d.view, d.peer_id, host.stage, host.step, d.state_hash):
        return False
    others = [p for p in d.view.replicas(host.stage)
              if p.peer_id != d.peer_id and p.state not in ("lost", "left")]
    log.info("stage %d: fast-forwards from step %d to %d (no replica of the stage stepped in "
             "between; %d other holders at the same state)", host.stage, host.step, step,
             len(others))
    forget_pending(host)
    host.optimizer.zero_grad(set_to_none=True)
    host.samples = host.microbatches = 0
    unchanged = d.state_hash  # the weights do not change, only the step they are at
    host.step = step
    d.state_hash = unchanged
    return True


async def snapshot_if_due(d: PeerContext, last_step: int) -> int:
    """Every SNAPSHOT_EVERY_STEPS steps after `last_step`, save the stage to the snapshot folder
    (heartbeat loop). Returns the step of the newest snapshot (`last_step` when none was due)."""
    directory = d.snapshot_dir
    host = d.host
    if (not directory or host is None or d.state not in READY_STATES
            or host.step < last_step + snapshots.SNAPSHOT_EVERY_STEPS):
        return last_step
    async with d.step_lock:
        state = await host.run(host.module.state_dict)
        step = host.step
        path = await host.run(snapshots.save_snapshot, directory, host.stage, step, d.peer_id,
                              state)
    log.info("stage %d: snapshot at step %d in %s", host.stage, step, path)
    return step
