"""Keeping a replica current while it serves: the heartbeat loop (the view, the leaf, the
coordinator's moves, snapshots, CheckFree+'s edge copies), the hash and stall checks against
the view, falling behind (replay the rounds it missed, else re-download the stage), and the
drain on SIGTERM or a spot notice (stop taking work, finish in-flight microbatches, leave).

A mixin of `PeerDaemon` (peer/daemon.py), split out of it by responsibility; the rules it
applies are peer/consistency.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from peer import consistency
from peer.authz import attested_swarm_step
from peer.consistency import READY_STATES
from peer.progress import progress_text
from peer.recovery.rebuild import catch_up, snapshot_if_due
from peer.recovery.transfer import download_state
from peer.sync.replay import replay_rounds

log = logging.getLogger("shoal.peer")


class Upkeep:
    """`fall_behind`, `heartbeat_loop`, the checks each beat runs, and `drain` (see the module
    docstring). Uses the daemon's state, client, view, host, mode, rounds and step lock."""

    def fall_behind(self, why: str, behind_of: int = 0) -> None:
        """This replica missed steps (`behind_of`: up to that one) or drifted: stop serving,
        catch up by replay where it can, else re-download the stage (PeerContext.fall_behind)."""
        if self._resync_task and not self._resync_task.done():
            return
        stage = self.host.stage
        log.warning("stage %d replica is behind (%s): %s", stage, why,
                    "replaying the rounds it missed" if behind_of else "re-downloading")
        self.state = "syncing"

        async def resync() -> None:
            async with self.step_lock:
                if behind_of:
                    got = await replay_rounds(self, self.mode, self.rounds)
                    if not got.download and self.host.step >= behind_of:
                        log.info("stage %d: caught up by replaying %d rounds, after step %d",
                                 stage, got.rounds, self.host.step)
                        self.state = "training"
                        return
                    log.warning("stage %d: replayed %d rounds, after step %d: %s; "
                                "re-downloading", stage, got.rounds, self.host.step,
                                got.download or f"the swarm is after step {behind_of}")
                sources = [p for p in self.live_replicas(stage) if p != self.peer_id]
                if (not sources and behind_of and self.mode.fast_forwards
                        and catch_up(self, min(behind_of, attested_swarm_step(self.view)),
                                     holding_lock=True)):
                    # the stage's only holder: nobody applied the steps it missed (the drivers
                    # bypassed the stage), so the step counter is all it lacks; without this it
                    # waited for the heartbeats' stall check (~12 s) while the swarm ran on
                    self.state = "training"
                    return
                if await download_state(self, self.mode, sources):
                    self.state_hash = await self.host.run(self.host.state_hash)
                    got = await replay_rounds(self, self.mode, self.rounds)
                    if got.rounds:  # the rounds that passed during the download
                        log.info("stage %d: downloaded, then replayed %d rounds, after step %d",
                                 stage, got.rounds, self.host.step)
                self.state = "training"

        self._resync_task = asyncio.ensure_future(resync())

    def _heartbeat_s(self) -> float:
        """The period the coordinator told this peer (coordinator/pacing.py: the spec's in small
        swarms, slower in large ones); the spec's before the first Join."""
        told = getattr(self.client, "heartbeat_s", 0.0)
        return told if isinstance(told, (int, float)) and told > 0 else \
            self.spec.membership.heartbeat_s

    async def heartbeat_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                res = await self.client.heartbeat(self.stats(),
                                                  unreachable=self.unreachable.take())
                if self.server_tls is not None and self.client.tls() is not None:
                    self.server_tls.update(self.client.tls())  # a re-join renews the leaf
                    self._renew_dataplane_leaf(self.client.tls())
                self.address = self.client.registered_address or self.address
                self.reach_notice.update(res.reach, res.relay, self.address)
                view = res.view
                if view is not None:
                    self.view = view
                if self.relay_link is not None:  # after the view: it may name a relay peer
                    await self.relay_link.update(res.reach, res.relay)
                if (res.action == "move" and self.host and res.stage != self.host.stage
                        and self._moving is None):
                    log.info("coordinator moves this peer to stage %d", res.stage)
                    # beside the heartbeats, which must go on while it downloads the stage (a
                    # lapsed lease would make it a newcomer again)
                    self._moving = asyncio.ensure_future(self._move(res.stage))
                self._check_hash()
                self._snapshot_step = await snapshot_if_due(self, self._snapshot_step)
                self.edge_copies.poll(self)
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("heartbeat failed: %s", exc)
            self._report_progress()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), self._heartbeat_s())
            self._write_metrics()

    async def _move(self, stage: int) -> None:
        try:
            async with self.step_lock:
                await self._take_stage(stage)
        except Exception:
            log.exception("moving to stage %d failed; the coordinator will say what next",
                          stage)
        finally:
            self._moving = None

    def _report_progress(self) -> None:
        if self.host is None:
            return
        stats, now = self.stats(), time.monotonic()
        if self.progress.due(stats, now):
            fields = self.progress.take(self.host.stage, stats, now)
            log.info("%s", progress_text(fields), extra={"fields": fields})

    def _check_hash(self) -> None:
        """Compare this replica with the view (peer/consistency.py's rules): re-download, or
        adopt the swarm's step, when they say so."""
        if (self.view is None or self.host is None or self.state not in READY_STATES
                or not self.state_hash):
            return
        me, stage, step = self.peer_id, self.host.stage, self.host.step
        verdict = consistency.differing_hash(self.view, me, stage, step, self.state_hash)
        wait = max(3 * self.spec.membership.heartbeat_s, self.spec.sync.timeout_s)
        if verdict is None and self._stall.stalled(step, time.monotonic(),
                                                   2 * self.spec.membership.heartbeat_s):
            verdict = consistency.behind_the_attestation(self.view, stage, step)
        if verdict is None and self._stall.stalled(step, time.monotonic(), wait):
            verdict = consistency.behind_the_swarm(self.view, me, stage, step,
                                                   fast_forwards=self.mode.fast_forwards)
        if verdict is None:
            return
        if verdict.action == "download":
            self.fall_behind(verdict.why, behind_of=verdict.step)
            return
        log.warning("stage %d: every replica is behind the swarm (after step %d, the others "
                    "after %d)", stage, step, verdict.step)
        catch_up(self, verdict.step)  # recovery.catch_up: under the same conditions

    def _write_metrics(self) -> None:
        if self.metrics_file and self.driver:
            self.driver.append_metrics(self.metrics_file)

    async def drain(self, reason: str) -> None:
        """Stop taking work, let in-flight microbatches finish, leave; all within the grace.

        The grace is split so that the coordinator hears of the drain at once (its routers stop
        sending here), in-flight work gets all but a reserve, and the reserve covers the leave
        call and the shutdown; every network wait is bounded by what is left of the grace.
        """
        if self.draining:
            return
        self.draining = True
        self.state = "draining"
        grace = self.args.grace
        log.info("draining (%s): %.0f s grace", reason, grace)
        t0 = time.monotonic()
        deadline = t0 + grace
        reserve = min(2.0, 0.25 * grace)

        def left(cap: float) -> float:
            return max(0.05, min(cap, deadline - reserve / 2 - time.monotonic()))

        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.heartbeat(self.stats()), left(2.0))
        self.edge_copies.stop()
        if self.driver:
            self.driver.stop()
        while time.monotonic() < deadline - reserve:
            busy = (self.host and self.host.pending) or (self.driver and self.driver.busy())
            if not busy:
                break
            await asyncio.sleep(0.1)
        unfinished = len(self.host.pending) if self.host else 0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.leave(reason), left(2.0))
        self._write_metrics()
        log.info("drained in %.1f s of %.0f s grace; %d in-flight microbatches handed back",
                 time.monotonic() - t0, grace, unfinished)
        self.stopped.set()
