"""The coordinator's own upkeep: its state beside the membership, the once-a-second tick, views,
persistence and certificates.

CoordinatorService (coordinator/service.py) is this plus the gRPC calls: the calls answer peers,
and everything here runs whatever the peers do, so the two are read apart. `tick` expires silent
members (with a grace for the coordinator's own lag: `_silence_grace`), samples the training
curve, re-checks reachability, closes due SPSA steps, rebalances when due and moves relayed
peers, and feeds the pacer this process's measured CPU per heartbeat (`_pace`,
coordinator/pacing.py). `collect` is the journal's batch (coordinator/store.py); `_commit` waits
for it to be on disk and refuses the call when it cannot be. Attributes marked "set by main" are
coordinator/main.py's to fill in after construction.

Runs on the event loop only, like everything that touches Membership.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc

from coordinator.assignment import rebalance_due
from coordinator.ca import CoordinatorCA
from coordinator.gcpolicy import GcPolicy
from coordinator.ledger import SpsaLedger
from coordinator.membership import Member, Membership
from coordinator.messages import heartbeat_kinds
from coordinator.metrics import Histogram
from coordinator.pacing import BeatLimit, JoinGate, Pacer, ViewBudget
from coordinator.reach import Reachability
from coordinator.spsa_calls import SpsaCalls
from coordinator.store import Batch, Journal, StoreError
from coordinator.view_replies import VIEW_MIN_INTERVAL_S, ViewReplies
from coordinator.views import ViewSnapshot
from protocols import shoal_pb2 as pb
from protocols.auth import Admission, issue_certificate
from protocols.coordinator_client import VERSION
from protocols.identity import Identity
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.coordinator")


class CoordinatorUpkeep:
    """The coordinator's state, its periodic tick, views and persistence; subclassed by
    CoordinatorService, which adds the gRPC calls."""

    def __init__(self, *, spec: RunSpec, swarm_id: str, identity: Identity,
                 admission: Admission, membership: Membership, serial: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.spec_toml = spec.to_toml()
        self.swarm_id = swarm_id
        self.identity = identity
        self.admission = admission
        self.membership = membership
        self.serial = serial
        self.observers: dict[str, float] = {}  # peer id -> certificate expiry
        self.clock = clock
        self.cert_ttl_s = spec.membership.certificate_s
        self.started_at = clock()
        self.restarts = 0
        self.grpc_address = ""
        self.version = VERSION
        self.loop_lag_s = 0.0  # worst event-loop lag of the last seconds (set by main)
        self.loop_lag_now_s = 0.0  # the event loop's lag at its last sample (set by main)
        self.journal: Journal | None = None
        self.ca: CoordinatorCA | None = None  # the swarm's TLS CA (set by coordinator.main)
        self.tls = False  # whether the gRPC port serves TLS (set by coordinator.main)
        self.join_token_file = ""  # the join token's path, for the dashboard (set by main)
        self.last_rebalance = clock()
        self.rejected: dict[str, int] = {}  # INVALID_ARGUMENT / PERMISSION_DENIED by method
        self.heartbeat_seconds = Histogram((0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05))
        self.views = ViewReplies(membership, swarm_id)  # coordinator/view_replies.py
        self._saved_meta: dict[str, str] = {}
        #: the first peer's data fingerprint, when the spec has none (kept in the store's meta)
        self.data_fingerprint = ""
        self.spsa_ledger = (SpsaLedger(spec.sync.spsa.samples_per_step, spec.sync.timeout_s,
                                       verify=spec.sync.spsa.verify,
                                       tolerance=spec.sync.spsa.verify_tolerance,
                                       repair=spec.sync.spsa.verify_repair)
                            if spec.sync.keeps_ledger else None)
        self.spsa_calls = SpsaCalls(self.spsa_ledger, membership, self._refuse)
        self.beat_kinds = heartbeat_kinds(spec.sync.mode)
        ms = spec.membership
        self.beat_limit = BeatLimit(ms.heartbeat_s, ms.lease_s)
        # the period and lease told to peers (coordinator/pacing.py), and Join back-pressure
        self.pacer = Pacer(ms.heartbeat_s, ms.lease_s)
        self.join_gate = JoinGate()
        self._cpu_mark = (time.process_time(), 0, 0)  # cpu, heartbeats, joins
        self.gc_policy: GcPolicy | None = None  # set by coordinator.main in its own process
        # reachability (coordinator/reach.py): the dial-back, and the relays on offer
        self.reach = Reachability(identity, membership, ca=lambda: self.ca,
                                  tls=lambda: self.tls, clock=clock,
                                  on_change=self._journal_soon)

    def is_member(self, peer_id: str) -> bool:
        """Members with a live lease, and observers until their certificate expires."""
        if self.membership.is_member(peer_id):
            return True
        until = self.observers.get(peer_id)
        return until is not None and until >= self.clock()

    @property
    def relay_address(self) -> str:
        """host:port of this coordinator's own Relay service, named to unreachable members; ""
        while it runs none (coordinator.main sets it when it serves one)."""
        return self.reach.relay_address

    @relay_address.setter
    def relay_address(self, value: str) -> None:
        self.reach.relay_address = value

    def _journal_soon(self) -> None:
        if self.journal is not None:
            self.journal.request()

    def _silence_grace(self) -> float:
        """Seconds of a member's silence that are the coordinator's own lag (and a join
        storm's, when its gate is busy), not the member's."""
        return self.loop_lag_s + (self.pacer.pace.lease_s
                                  if self.join_gate.busy(time.monotonic()) else 0.0)

    # ------------------------------------------------------------------ periodic work

    async def tick(self, now: float) -> None:
        """Once a second: expire silent peers, sample the curve, rebalance when due, persist."""
        m = self.membership
        self._pace()
        if self.gc_policy is not None:
            self.gc_policy.tick()
        expired = m.sweep(now, self._silence_grace())
        for peer_id in expired:
            log.info("peer %s expired (lease lapsed)", peer_id)
        # each step below is O(members): let the calls that queued meanwhile run between them,
        # so that a large swarm's tick is several short stalls, not one long one
        await asyncio.sleep(0)
        m.sample_history(now)
        self.reach.tick(now)
        await asyncio.sleep(0)
        if self.spsa_ledger is not None:
            self.spsa_ledger.close_due(time.monotonic())
        move = None
        if rebalance_due(self.last_rebalance, now, self.spec.membership.rebalance_s):
            self.last_rebalance = now
            move = m.rebalance(now)
            if move is not None:
                log.info("rebalance: peer %s stage %d -> %d", move.peer_id, move.from_stage,
                         move.to_stage)
            await asyncio.sleep(0)
        placed = m.place_relayed(now) if move is None else None
        if placed is not None:
            move = placed
            log.info("placement: peer %s stage %d -> %d (%s)", placed.peer_id, placed.from_stage,
                     placed.to_stage, "relayed: to a driver's stage" if placed.to_stage == 0
                     else "reachable: partners a relayed replica")
        if expired or move is not None:
            await self._commit()

    def _pace(self) -> None:
        """Feed the pacer this process's CPU per heartbeat since the last tick (a second
        without Joins only: a join storm's CPU is not the cost of a beat), or the Join gate
        what the Joins cost; recompute the pace for the live swarm."""
        c = self.membership.counters
        cpu, beats, joins = time.process_time(), c["heartbeats"], c["joins"] + c["rejoins"]
        cpu0, beats0, joins0 = self._cpu_mark
        self._cpu_mark = (cpu, beats, joins)
        if joins == joins0:
            self.pacer.observe(cpu - cpu0, beats - beats0)
        else:  # what the beats did not take went to the Joins (and the turned-away ones)
            self.join_gate.observe(max(0.0, cpu - cpu0 - (beats - beats0) * self.pacer.cost_s),
                                   joins - joins0)
        live = self.membership.live_count()
        self.pacer.update(live)

    # ------------------------------------------------------------------ views

    def view(self, now: float, max_age_s: float = VIEW_MIN_INTERVAL_S,
             stats_max_age_s: float = math.inf) -> ViewSnapshot:
        """The swarm view, rebuilt when the epoch moved (at most every `max_age_s`) or when its
        stats are older than `stats_max_age_s` (coordinator/view_replies.py)."""
        return self.views.view(now, max_age_s, stats_max_age_s)

    def build_view(self) -> pb.SwarmView:
        """The current membership as a SwarmView message (live members only)."""
        return self.views.build()

    @property
    def views_sent(self) -> dict[str, int]:
        """Views (bytes, whole, deltas) sent in replies since the start (/metrics)."""
        return self.views.sent

    @property
    def view_budget(self) -> ViewBudget:
        """View bytes per second sent in large swarms (coordinator/pacing.py)."""
        return self.views.budget

    @view_budget.setter
    def view_budget(self, budget: ViewBudget) -> None:
        self.views.budget = budget

    # ------------------------------------------------------------------ persistence

    def collect(self, progress: bool) -> Batch:
        """The journal's batch: structural changes always, leases/stats/history when periodic."""
        changed, deleted, events = self.membership.take_changes()
        batch = Batch(members=changed, deleted=deleted, events=events,
                      bans=self.membership.take_bans())
        if progress:
            batch.progress = self.membership.take_progress()
            batch.history = self.membership.history.take_unsaved()
        meta = {"epoch": str(self.membership.epoch), "serial": str(self.serial)}
        if self.data_fingerprint:
            meta["data_fingerprint"] = self.data_fingerprint
        batch.meta = {k: v for k, v in meta.items() if self._saved_meta.get(k) != v}
        self._saved_meta.update(meta)
        return batch

    async def _commit(self, context: grpc.aio.ServicerContext | None = None) -> None:
        """Wait until the changes so far are on disk; a failed write refuses the call."""
        if self.journal is None:
            return
        try:
            await self.journal.commit()
        except StoreError as exc:
            if context is None:
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{exc}; the coordinator cannot save state (disk full or "
                                f"read-only?); retry later")

    # ------------------------------------------------------------------ helpers

    def _issue(self, member: Member, now: float) -> pb.SignedCertificate:
        self.serial += 1
        cert = issue_certificate(self.identity, member.public_key, self.swarm_id,
                                 self.cert_ttl_s, now, self.serial)
        self.membership.note_certificate(member.peer_id, now + self.cert_ttl_s)
        return cert

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str,
                      code: grpc.StatusCode, message: str) -> None:
        self.rejected[method] = self.rejected.get(method, 0) + 1
        log.debug("%s refused (%s): %s", method, code.name, message)
        await context.abort(code, message)
