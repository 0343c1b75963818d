"""The stage-0 driver: pushes microbatches through the block stages and closes each step.

One optimizer step on this replica:
1. refresh the swarm view; shard the corpus by this replica's rank among the stage-0 replicas;
2. plan the iteration's paths (SkipPipe, peer/pipeline/paths.py; ALGORITHMS.md §2): which block
   stages each microbatch visits and in which order. The planner runs *here, on each stage-0 peer*,
   once per iteration, for this peer's own microbatches only: stage 0 owns the microbatches,
   starts and ends every path, and is where the times a plan needs are measured (each replica's
   compute, link latency and bandwidth and queue, peer/pipeline/links.py; the router's
   outstanding work; this peer's own head/loss time; the activation size from the spec). Nothing
   is planned centrally; two stage-0 peers plan independently. `pipeline.skip_ratio` = 0 gives
   every stage in order on every microbatch (the plain SWARM pipeline); every
   `pipeline.full_depth_every`-th iteration is full depth; with `pipeline.checkfree_plus` odd
   microbatches swap stages 1<->2 and S-1<->S. A stage that has been trained and now has no
   usable replica (none live, or all banned) is left out of every path (bypassed), so training
   never stops while a stage is being rebuilt; a stage that dies mid-iteration is bypassed by
   the forward hops that find it empty. A stage that never had a replica (start of the run) is
   waited for instead;
3. run the microbatches, several in flight: embed → for each block stage of the planned path,
   with SkipPipe (skip_ratio > 0) the planned replica, which the plan chose to avoid collisions,
   and in the plain SWARM pipeline the replica with the smallest expected finish time now
   (peer/pipeline/router.py) → head and loss → backward along the *same* hops in reverse →
   embedding; a hop that fails or times out in the forward pass is resent to the next-best
   replica (the failing one is banned until its lease would expire); a microbatch whose backward
   cannot finish (the replica holding its graph is gone) is dropped and counted;
4. send `EndStep` to every live replica of every block stage, visited or not, and sync stage 0
   with the other stage-0 replicas; the step is over when all of them answered (or timed out).

The barrier in step 4 keeps training synchronous: no replica steps while it holds graphs of the
step, and every replica steps exactly once per step. A replica that no path visited this step
contributes zero samples to its stage's round; a stage no microbatch visited aggregates to
"skip" and every replica advances its step without an optimizer step (peer/sync/rounds.py), so
replicas of a skipped stage stay bit-identical and in lockstep.

One hop's call and its retries are peer/pipeline/hops.py (`HopCalls`); step 4's EndSteps and
their deadline are peer/pipeline/step_end.py (`StepClosing`); with `pipeline.hops = "p2p"` the
block replicas pass a microbatch on themselves and the driver only starts and ends its route
(peer/pipeline/p2p.py, `P2PRoutes`); all three are mixins of `Driver`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter

import numpy as np
import torch

from peer.pipeline import stalls, wire
from peer.pipeline.context import DriverContext
from peer.pipeline.data import inputs_targets, load_corpus_for, shard
from peer.pipeline.deadline import MeasuredDeadline
from peer.pipeline.hops import HopCalls, MicrobatchDropped, StageEmpty
from peer.pipeline.links import LinkEstimates
from peer.pipeline.p2p import Inbox, P2PRoutes
from peer.pipeline.paths import ReplicaTiming
from peer.pipeline.planner import plan_iteration
from peer.pipeline.router import NoReplicaAvailable, RoundRobinRouter, Router
from peer.pipeline.step_end import StepClosing
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import READY_STATES
from protocols.reach import UNREACHABLE

log = logging.getLogger("shoal.driver")
START_GRACE_S = 10.0  # the first step waits at most this long for peers still starting
#: a step asks the coordinator for the view for at most this long; after a failure the next
#: ask is this much later (see `Driver._refresh`)
VIEW_RETRY_S = 2.0
VIEW_BACKOFF_S = 5.0


class Driver(HopCalls, P2PRoutes, StepClosing):
    """The stage-0 step loop (see the module docstring). It sees the peer as a `DriverContext`;
    `data` is the peer's --data (None: the spec's data.path, else the stdlib), `router_kind`
    "swarm" or "round_robin"."""

    def __init__(self, ctx: DriverContext, data: str | None = None, router_kind: str = "swarm",
                 router: Router | None = None) -> None:
        self.d = ctx
        rng = random.Random(int(ctx.peer_id, 16))
        self.router = router or (RoundRobinRouter(rng=rng) if router_kind == "round_robin"
                                 else Router(rng=rng))
        self.corpus = load_corpus_for(ctx.spec, data)  # --data, else the spec's data.path
        self._shard_key: tuple[int, int] | None = None
        self._shard = None
        self._stop = False
        self._inflight = 0
        self.last_loss = math.nan
        self.tokens_per_s = 0.0
        self.dropped = 0
        self.done = 0
        self._metrics: list[dict] = []
        self._stage0_s = 0.0  # EMA of this peer's own compute per microbatch (embed, head, loss)
        self.bypassed_hops = 0  # forward hops skipped because their stage had no usable replica
        self._visits: Counter[int] = Counter()  # block stage -> microbatches through it, this step
        self._bypassed: set[int] = set()  # block stages this step went around (no replica)
        self._start_wait: float | None = None  # when the first step began to wait for peers
        self._view_retry_at = 0.0  # no view asked for before this (the coordinator was away)
        self._answers = MeasuredDeadline()  # the wait for the block replicas' EndStep answers
        self.links = LinkEstimates()  # per replica: compute, latency, bandwidth (the plan's)
        self._late: set[asyncio.Future] = set()  # EndSteps answered after the step went on
        self.stalls = stalls.WATCH  # spans this process was stopped (a timeout then is ours)
        # peer-to-peer hops: the deliveries this driver waits for (Stage.Deliver resolves them)
        inbox = getattr(ctx, "inbox", None)
        self.inbox: Inbox = inbox if inbox is not None else Inbox()
        self._acks: set[asyncio.Task] = set()  # p2p route calls whose acks are still out
        self._nonces: dict[str, str] = {}  # p2p: a microbatch's nonce, forward to backward

    def stop(self) -> None:
        self._stop = True

    def busy(self) -> bool:
        return self._inflight > 0

    def take_metrics(self) -> list[dict]:
        rows, self._metrics = self._metrics, []
        return rows

    def append_metrics(self, path: str) -> None:
        """Append the steps' metrics rows taken since the last call to `path` (JSON lines)."""
        rows = self.take_metrics()
        if rows:
            with open(path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        self.stalls.start()
        d = self.d
        spec = d.spec
        while not self._stop:
            if spec.run.steps and d.host.step >= spec.run.steps:
                await asyncio.sleep(0.5)
                continue
            if d.state not in READY_STATES:
                await asyncio.sleep(0.2)
                continue
            try:
                await self._one_step()
            except NoReplicaAvailable as exc:
                log.warning("step %d waits: %s", d.host.step + 1, exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("step %d failed; retrying", d.host.step + 1)
                await asyncio.sleep(1.0)

    async def _refresh(self) -> None:
        """A fresh view for the step, when the coordinator answers at once. While it does not
        (restarting, partitioned away) the driver steps on its last view and asks again only
        VIEW_BACKOFF_S later: the heartbeats bring the view back once it answers, and no step
        waits for it."""
        d = self.d
        now = time.monotonic()
        if now >= self._view_retry_at:
            try:
                await d.refresh_view(retry_s=VIEW_RETRY_S)
            except Exception as exc:
                self._view_retry_at = now + VIEW_BACKOFF_S
                log.warning("swarm view refresh failed (%s); stepping on the last one, asking "
                            "again in %.0f s", exc, VIEW_BACKOFF_S)
        self.read_replicas()
        self.links.keep_only({p for s in range(1, d.spec.pipeline.stages + 1)
                              for p in self.router.replicas(s)})

    def _my_shard(self):
        stage0 = sorted(set(self.d.live_replicas(0)) | {self.d.peer_id})
        key = (stage0.index(self.d.peer_id), len(stage0))
        if key != self._shard_key:
            self._shard = shard(self.corpus, key[0], key[1], self.d.spec.model.seq_len)
            self._shard_key = key
        return self._shard, stage0

    def has_trained(self, stage: int) -> bool:
        """Whether `stage` ever took part in a step. A step needs every stage until each has
        trained (see plan), so any step of this driver's own says yes; the view's step says so
        for a driver that has none yet."""
        return self.d.host.step > 0 or bool(self.d.stage_info(stage, "step"))

    def _still_starting(self, now: float) -> str | None:
        """Before the run's first step: a member of the view that is still starting (joining or
        syncing), for at most START_GRACE_S. Peers that start together then all take part in
        step 1; without the wait, drivers whose views differ by a second listed different
        replicas for it, and a replica left out sat out a sync timeout or fell a step behind."""
        view = self.d.view
        if self.d.host.step > 0 or view is None:
            return None
        if self._start_wait is None:
            self._start_wait = now
        if now - self._start_wait > START_GRACE_S:
            return None
        late = [(p, p.state) for p in view.peers if p.state in ("joining", "syncing")
                and p.peer_id not in view.revoked]
        # a block replica the coordinator has not dialled back yet, or could not and that waits
        # for a relay: calls into it fail until it is reached, and a stage whose step-1 calls
        # all failed counts as trained and is bypassed from then on (a NAT'd stage in the lab)
        late += [(p, "not reached yet" if not p.reach else "waiting for a relay")
                 for p in view.peers if p.stage > 0 and p.reach in ("", UNREACHABLE)
                 and p.peer_id not in view.revoked]
        return f"stage {late[0][0].stage} replica {late[0][0].peer_id[:8]} is {late[0][1]}" \
            if late else None

    async def plan(self, step: int, n_mb: int) -> list[tuple[tuple[int, str], ...]]:
        """Each microbatch's (block stage, replica) hops, in visiting order (see the module
        docstring)."""
        d = self.d
        p = d.spec.pipeline
        now = time.monotonic()
        starting = self._still_starting(now)
        if starting:
            raise NoReplicaAvailable(f"the first step waits for the starting peers: {starting}")
        mb = p.microbatch
        stages: dict[int, list[ReplicaTiming]] = {}
        for s in range(1, p.stages + 1):
            stages[s] = []
            for pid in self.router.usable(s, now):
                whole_call_s, busy = self.router.planning_timing(pid, mb, now)
                t = self.links.timing(pid, mb)
                forward_s = whole_call_s if t.forward_s is None else t.forward_s
                stages[s].append(ReplicaTiming(pid, forward_s, t.latency_s, t.bandwidth_Bps,
                                               ready_at=busy + t.queued * forward_s))
            if not stages[s] and not self.has_trained(s):
                # Never trained (the swarm is starting): wait for its first replica rather than
                # train without it. Only a stage that lost its replicas is bypassed.
                raise NoReplicaAvailable(f"stage {s} has no replica yet")
        origin = ReplicaTiming(d.peer_id, self._stage0_s / 2.5)
        rng = random.Random(f"{d.peer_id}:{step}")
        paths = await asyncio.to_thread(
            plan_iteration, step, n_mb, stages, p.skip_ratio, rng, p.full_depth_every or None,
            2, 3, p.checkfree_plus, origin=origin, activation_bytes=wire.activation_bytes(d.spec))
        return [path.route for path in paths]

    async def _one_step(self) -> None:
        d = self.d
        spec = d.spec
        await self._refresh()
        data, stage0 = self._my_shard()
        step = d.host.step + 1
        mb = spec.pipeline.microbatch
        n_mb = max(1, math.ceil(spec.pipeline.target_batch / (len(stage0) * mb)))
        paths = await self.plan(step, n_mb)
        bytes0 = d.counter.total_sent() + d.counter.total_received()
        bypassed0 = self.bypassed_hops
        self._visits: Counter[int] = Counter()
        self._bypassed: set[int] = set()  # stages a microbatch of this step found no replica of
        t0 = time.monotonic()
        window = max(2, 2 * (spec.pipeline.stages + 1))
        sem = asyncio.Semaphore(window)

        async def one(i: int) -> float | None:
            async with sem:
                if self._stop:
                    return None
                batch = data.batch(mb, spec.run.seed, step * 10007 + i)
                return await self._microbatch(step, i, batch, list(paths[i]))

        losses = [x for x in await asyncio.gather(*(one(i) for i in range(n_mb))) if x is not None]
        if self._stop and not losses:
            return
        t_end = time.monotonic()
        await self._end_step(step, stage0, n_mb, len(losses) * mb)
        dt = time.monotonic() - t0
        tokens = len(losses) * mb * spec.model.seq_len
        self.tokens_per_s = tokens / max(dt, 1e-6)
        if losses:
            self.last_loss = float(np.mean(losses))
        wire_bytes = d.counter.total_sent() + d.counter.total_received() - bytes0
        visits = {s: self._visits[s] for s in range(1, spec.pipeline.stages + 1)}
        self._metrics.append({
            "t": time.time(), "step": step, "loss": self.last_loss if losses else None,
            "microbatches": n_mb, "completed": len(losses), "tokens": tokens, "seconds": dt,
            "end_seconds": time.monotonic() - t_end,  # of `seconds`: EndStep and the sync
            "tokens_per_s": self.tokens_per_s, "bytes": wire_bytes, "dropped": self.dropped,
            "skip_ratio": spec.pipeline.skip_ratio,
            "full_depth": all(len(p) == spec.pipeline.stages for p in paths),
            "visits": {str(s): n for s, n in visits.items()},  # completed microbatches
            "skipped_stages": [s for s, n in visits.items() if n == 0],
            "bypassed_hops": self.bypassed_hops - bypassed0,
        })

    # ------------------------------------------------------------------ one microbatch

    async def _microbatch(self, step: int, i: int, batch: torch.Tensor,
                          planned: list[tuple[int, str]]) -> float | None:
        d = self.d
        host = d.host
        mb_id = f"{d.peer_id[:12]}-{step}-{i}"
        tokens, targets = inputs_targets(batch)
        self._inflight += 1
        hops: list[tuple[int, str]] = []
        try:
            t0 = time.monotonic()
            h = await host.run(host.embed, mb_id, tokens, step)
            compute = time.monotonic() - t0
            path = [s for s, _ in planned]
            keep = d.spec.pipeline.skip_ratio > 0  # SkipPipe: the planned replica first
            p2p = d.spec.peer_to_peer
            if p2p:  # the block replicas pass it on (peer/pipeline/p2p.py)
                h, path, hops = await self.route_forward(step, mb_id, planned, h,
                                                         self.has_trained)
            for s, planned_peer in planned if not p2p else ():
                try:
                    h, peer = await self._hop("forward", s, step, mb_id, path, len(hops), h,
                                              prefer=planned_peer if keep else None)
                except StageEmpty:
                    if not self.has_trained(s):
                        raise  # never trained: no bypass at the start of a run (see plan)
                    # No usable replica now: bypass it for this microbatch (the planner does
                    # the same from the next iteration on, once the view or the bans show it).
                    path.remove(s)
                    self.bypassed_hops += 1
                    self._bypassed.add(s)
                    continue
                hops.append((s, peer))
            t0 = time.monotonic()
            loss, g = await host.run(host.head, mb_id, h, targets)
            compute += time.monotonic() - t0
            if p2p:
                g = await self.route_backward(step, mb_id, path, hops, g)
            for hop in range(len(hops) - 1, -1, -1) if not p2p else ():
                s, peer = hops[hop]
                g, _ = await self._hop("backward", s, step, mb_id, path, hop, g, peer=peer)
            t0 = time.monotonic()
            await host.run(host.embed_backward, mb_id, g)
            compute += time.monotonic() - t0
            d.note_compute(int(tokens.shape[0]), compute)
            self._stage0_s = (compute if self._stage0_s == 0
                              else 0.9 * self._stage0_s + 0.1 * compute)
            self.done += 1
            self._visits.update(s for s, _ in hops)
            return loss
        except MicrobatchDropped as exc:
            self.dropped += 1
            host.forget(mb_id)
            log.info("microbatch %s dropped: %s", mb_id, exc)
            return None
        finally:
            self._nonces.pop(mb_id, None)  # whatever ended it; the backward took it if it ran
            self._inflight -= 1

    async def _end_step(self, step: int, stage0: list[str], n_mb: int, samples: int) -> None:
        d = self.d
        replicas = self.block_replicas()
        await self.close_step(
            step, replicas,
            lambda pid, stage: pb.StepEnd(step=step, sender=d.peer_id, microbatches=n_mb,
                                          samples=samples, stage0_replicas=stage0,
                                          stage_replicas=replicas[stage]),
            d.sync_step(step, stage0), bypassed=self._bypassed)
