"""Membership: who is in the swarm, which stage each member holds, and until when.

This is the coordinator's state machine, with no I/O and no clock of its own (every method takes
`now`), so it is tested without sockets. coordinator/service.py drives it from gRPC calls and a
once-a-second tick; coordinator/store.py persists what it reports as changed.

Invariants:
- `epoch` only grows. It moves on every change peers must route around: join, leave, expiry,
  a stage change (assignment, rebalance) and a reported state change. Views carry their epoch.
- A member is *live* while its lease holds. Heartbeats renew it (O(1) each); `sweep` expires the
  silent ones (O(n), once a second). A member that leaves or expires stays listed (state "left" or
  "lost") for the dashboard, at most `max_departed` of them, and its peer id is *revoked* until its
  last certificate expires, so peers refuse its calls.
- Each live member is in exactly one stage's replica set; stages are 0..pipeline.stages.
- A stage that empties after training (step > 0) gets a `rebuild` method (CheckFree for inner
  block stages with both neighbours live, CheckFree+ for edge stages when the run uses it,
  otherwise a snapshot) that the next holder reads from the view, and a "skip" event (stage-0
  drivers bypass it meanwhile); it clears when a replica reports "rebuilt" or "training", with a
  "rebuild" event whose detail says what the peer actually did (its `recovery:` report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from coordinator.assignment import (
    Move,
    StageLoad,
    assign_stage,
    plan_rebalance,
    rebuild_method,
)
from coordinator.events import Event, EventLog, History, HistoryPoint
from protocols.coordinator_client import READY_STATES, Benchmark, PeerStats
from protocols.recovery_report import describe, is_report_key
from protocols.runspec import RunSpec

HEALTHY_STATES = frozenset(READY_STATES)
RESTART_EPOCH_GAP = 1000


@dataclass(slots=True)
class Member:
    """One peer as the coordinator knows it."""

    peer_id: str
    public_key: bytes
    address: str
    stage: int
    state: str
    benchmark: Benchmark
    joined_at: float
    last_seen: float
    lease_expires: float
    cert_expires: float = 0.0
    stats: PeerStats = field(default_factory=PeerStats)
    live: bool = True
    pending_action: str = ""  # "" | "move": delivered with the next heartbeat reply

    @property
    def throughput(self) -> float:
        """Measured samples/s once the peer reports it, its join benchmark until then."""
        measured = self.stats.samples_per_s
        return measured if measured > 0 else self.benchmark.samples_per_s


@dataclass(frozen=True, slots=True)
class StageSummary:
    """One stage for views, the dashboard and /metrics."""

    stage: int
    replicas: tuple[str, ...]
    throughput: float
    grad_norm: float
    step: int
    rebuild: str
    state: str  # "ok" | "empty" | "degraded" (replicas, but none training)


@dataclass(slots=True)
class _Stage:
    replicas: set[str] = field(default_factory=set)
    grad_norm: float = 0.0
    step: int = 0
    rebuild: str = ""


class Membership:
    """The swarm's members, stages, epoch, revocations, events and training curve."""

    def __init__(self, spec: RunSpec, swarm_id: str, *, epoch: int = 0,
                 events: EventLog | None = None, history: History | None = None,
                 max_departed: int = 256) -> None:
        self.spec = spec
        self.swarm_id = swarm_id
        self.epoch = epoch
        self.events = events if events is not None else EventLog()
        self.history = history if history is not None else History()
        self.max_departed = max_departed
        self.lease_s = spec.membership.lease_s
        self.n_stages = spec.pipeline.stages + 1  # block stages 1..S plus stage 0
        self._members: dict[str, Member] = {}
        self._stages = [_Stage() for _ in range(self.n_stages)]
        self._revoked: dict[str, float] = {}  # peer id -> when its last certificate expires
        self._changed: set[str] = set()  # structural changes, persisted at once
        self._deleted: set[str] = set()
        self._progressed: set[str] = set()  # heartbeated since the last periodic flush
        self.counters = {k: 0 for k in ("joins", "rejoins", "heartbeats", "leaves", "expired",
                                        "moves", "rebuilds")}
        # swarm-wide totals over the whole run, robust to peers restarting their counters
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self.dropped_total = 0
        self.bytes_by_kind_total: dict[str, int] = {}
        self._curve_mark: tuple[int, int] | None = None  # (step, bytes) of the last point

    # ------------------------------------------------------------------ queries

    def is_member(self, peer_id: str) -> bool:
        m = self._members.get(peer_id)
        return m is not None and m.live

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def members(self) -> list[Member]:
        """Every listed member, live and recently departed."""
        return list(self._members.values())

    def live_members(self) -> list[Member]:
        return [m for m in self._members.values() if m.live]

    def revoked(self) -> list[str]:
        return sorted(self._revoked)

    def is_revoked(self, peer_id: str) -> bool:
        return peer_id in self._revoked

    def stage_summaries(self) -> list[StageSummary]:
        out = []
        for i, st in enumerate(self._stages):
            members = [self._members[p] for p in sorted(st.replicas)]
            if not members:
                state = "empty"
            elif any(m.state in HEALTHY_STATES for m in members):
                state = "ok"
            else:
                state = "degraded"
            out.append(StageSummary(i, tuple(m.peer_id for m in members),
                                    sum(m.throughput for m in members), st.grad_norm, st.step,
                                    st.rebuild, state))
        return out

    def step(self) -> int:
        """The swarm's optimizer step: the furthest stage 0 has got (any stage if none)."""
        return self._stages[0].step or max(st.step for st in self._stages)

    # ------------------------------------------------------------------ changes

    def join(self, peer_id: str, public_key: bytes, address: str, benchmark: Benchmark,
             stage_hint: int, step_hint: int, now: float) -> Member:
        """Admit (or re-admit) a peer and give it a stage; the caller checked admission.

        A peer re-attaching with `stage_hint >= 0` keeps that stage (it already holds its
        weights); a live member joining again without a hint keeps its current stage.
        """
        if not 0 <= stage_hint < self.n_stages and stage_hint != -1:
            raise ValueError(f"stage_hint {stage_hint} is not a stage of this run "
                             f"(0..{self.n_stages - 1}, or -1 for none)")
        old = self._members.get(peer_id)
        if old is not None and old.live:
            self._stages[old.stage].replicas.discard(peer_id)
        if stage_hint >= 0:
            stage = stage_hint
        elif old is not None and old.live:
            stage = old.stage
        else:
            stage = assign_stage(self._loads(), benchmark.samples_per_s)
        kind = "join" if old is None else "rejoin"
        m = Member(peer_id=peer_id, public_key=bytes(public_key), address=address, stage=stage,
                   state="joining", benchmark=benchmark, joined_at=now, last_seen=now,
                   lease_expires=now + self.lease_s,
                   cert_expires=old.cert_expires if old is not None else 0.0)
        m.stats.step = step_hint
        self._members[peer_id] = m
        self._stages[stage].replicas.add(peer_id)
        self._revoked.pop(peer_id, None)
        self._deleted.discard(peer_id)
        self.counters["joins" if kind == "join" else "rejoins"] += 1
        detail = f"{address}, {benchmark.samples_per_s:.3g} samples/s"
        if stage_hint >= 0:
            detail += f", re-attached at step {step_hint}"
        self._changed_member(m, Event(now, kind, peer_id, stage, detail))
        return m

    def heartbeat(self, peer_id: str, stats: PeerStats, now: float) -> Member:
        """Renew a live member's lease and record its stats; O(1). KeyError if not live."""
        m = self._members[peer_id]
        if not m.live:
            raise KeyError(peer_id)
        self.counters["heartbeats"] += 1
        m.last_seen = now
        m.lease_expires = now + self.lease_s
        report = _take_recovery_report(stats)
        self._count_bytes(m.stats, stats)
        st = self._stages[m.stage]
        if stats.step >= st.step:
            st.step = stats.step
            if stats.grad_norm > 0:
                st.grad_norm = stats.grad_norm
        if stats.state != m.state:
            self._state_changed(m, stats.state, now, report)
        m.stats = stats
        self._progressed.add(peer_id)
        return m

    def leave(self, peer_id: str, reason: str, now: float) -> None:
        """A member says it is going (drain finished, or told to): revoke it at once."""
        m = self._members.get(peer_id)
        if m is None or not m.live:
            return
        self.counters["leaves"] += 1
        self._depart(m, "left", Event(now, "leave", peer_id, m.stage, reason), now)

    def sweep(self, now: float) -> list[str]:
        """Expire members whose lease lapsed; forget old revocations. Returns the expired ids."""
        expired = [m for m in self._members.values() if m.live and m.lease_expires < now]
        for m in expired:
            self.counters["expired"] += 1
            silent = now - m.last_seen
            self._depart(m, "lost", Event(now, "expire", m.peer_id, m.stage,
                                          f"silent for {silent:.1f} s"), now)
        for peer_id in [p for p, until in self._revoked.items() if until < now]:
            del self._revoked[peer_id]
        return [m.peer_id for m in expired]

    def rebalance(self, now: float, min_gain: float = 0.1) -> Move | None:
        """Plan and apply at most one SWARM rebalancing move; the peer learns it by heartbeat."""
        move = plan_rebalance(self._loads(), min_gain)
        if move is None:
            return None
        m = self._members[move.peer_id]
        self._stages[m.stage].replicas.discard(m.peer_id)
        self._stages[move.to_stage].replicas.add(m.peer_id)
        m.stage = move.to_stage
        m.pending_action = "move"
        self.counters["moves"] += 1
        self._changed_member(m, Event(
            now, "move", m.peer_id, move.to_stage,
            f"stage {move.from_stage} -> {move.to_stage}; bottleneck "
            f"{move.bottleneck_before:.3g} -> {move.bottleneck_after:.3g} samples/s"))
        return move

    def restore(self, members: list[Member], now: float, grace_s: float, detail: str) -> None:
        """Load members persisted by a previous coordinator process.

        Live ones get a grace lease (`now + grace_s`) so they can heartbeat again without
        re-joining; their certificates stay valid because the coordinator key is the same.
        The epoch jumps by RESTART_EPOCH_GAP: a crash can lose the last few epoch bumps that
        peers already saw, and an epoch number must never name two different memberships.
        """
        self.epoch += RESTART_EPOCH_GAP - 1
        for m in members:
            self._members[m.peer_id] = m
            if m.live:
                m.lease_expires = now + grace_s
                m.pending_action = ""
                self._stages[m.stage].replicas.add(m.peer_id)
                st = self._stages[m.stage]
                if m.stats.step >= st.step:
                    st.step, st.grad_norm = m.stats.step, m.stats.grad_norm
            elif m.cert_expires > now:
                self._revoked[m.peer_id] = m.cert_expires
        self._bump()
        self.events.append(Event(now, "restart", "", -1, detail))

    def sample_history(self, now: float) -> HistoryPoint | None:
        """Offer the current training progress to the curve (stage-0 peers' loss and speed)."""
        drivers = [self._members[p] for p in self._stages[0].replicas]
        if not drivers:
            return None
        step = max(m.stats.step for m in drivers)
        losses = [m.stats.loss for m in drivers if math.isfinite(m.stats.loss)]
        loss = sum(losses) / len(losses) if losses else math.nan
        tokens_per_s = sum(m.stats.tokens_per_s for m in drivers)
        bytes_per_step = math.nan
        if self._curve_mark is not None and step > self._curve_mark[0]:
            bytes_per_step = (self.bytes_sent_total - self._curve_mark[1]) / (
                step - self._curve_mark[0])
        point = HistoryPoint(now, step, loss, tokens_per_s, bytes_per_step)
        if not self.history.offer(point):
            return None
        self._curve_mark = (step, self.bytes_sent_total)
        return point

    def note_certificate(self, peer_id: str, not_after: float) -> None:
        """Record that `peer_id` now holds a certificate valid until `not_after`."""
        m = self._members[peer_id]
        m.cert_expires = max(m.cert_expires, not_after)
        self._progressed.add(peer_id)

    # ------------------------------------------------------------------ persistence hooks

    def take_changes(self) -> tuple[list[Member], list[str], list[Event]]:
        """Members changed structurally and ids to delete since the last call, with events."""
        changed = [self._members[p] for p in self._changed if p in self._members]
        deleted = list(self._deleted)
        self._changed.clear()
        self._deleted.clear()
        self._progressed.difference_update(m.peer_id for m in changed)
        return changed, deleted, self.events.take_unsaved()

    def take_progress(self) -> list[Member]:
        """Members whose lease or stats moved since the last call (saved every few seconds)."""
        out = [self._members[p] for p in self._progressed if p in self._members]
        self._progressed.clear()
        return out

    # ------------------------------------------------------------------ internals

    def _bump(self) -> None:
        self.epoch += 1

    def _changed_member(self, m: Member, event: Event) -> None:
        self._bump()
        self._changed.add(m.peer_id)
        self.events.append(event)

    def _loads(self) -> dict[int, StageLoad]:
        block_share = 1.0 - self.spec.pipeline.skip_ratio
        return {i: StageLoad({p: self._members[p].throughput for p in st.replicas},
                             1.0 if i == 0 else block_share)
                for i, st in enumerate(self._stages)}

    def _state_changed(self, m: Member, state: str, now: float, report: str = "") -> None:
        st = self._stages[m.stage]
        kind, detail = "state", f"{m.state} -> {state}"
        if state == "draining":
            kind = "drain"
        elif state in READY_STATES and st.rebuild:
            kind = "rebuild"
            detail = (f"stage rebuilt ({st.rebuild}): {report}" if report
                      else f"stage rebuilt ({st.rebuild})")
            st.rebuild = ""
            self.counters["rebuilds"] += 1
        m.state = state
        self._changed_member(m, Event(now, kind, m.peer_id, m.stage, detail))

    def _depart(self, m: Member, state: str, event: Event, now: float) -> None:
        m.live = False
        m.state = state
        m.pending_action = ""
        st = self._stages[m.stage]
        st.replicas.discard(m.peer_id)
        emptied = not st.replicas and st.step > 0
        if emptied:
            live = {i for i, x in enumerate(self._stages) if x.replicas}
            st.rebuild = rebuild_method(m.stage, live, self.n_stages,
                                        self.spec.pipeline.checkfree_plus)
        if m.cert_expires > now:
            self._revoked[m.peer_id] = m.cert_expires
        self._changed_member(m, event)
        if emptied and m.stage > 0:
            self.events.append(Event(
                now, "skip", "", m.stage,
                f"no live replica: paths bypass stage {m.stage} until a new holder rebuilds it "
                f"({st.rebuild})"))
        departed = [p for p, x in self._members.items() if not x.live]
        for peer_id in departed[: max(0, len(departed) - self.max_departed)]:
            del self._members[peer_id]  # dicts keep insertion order: the oldest go first
            self._deleted.add(peer_id)
            self._changed.discard(peer_id)
            self._progressed.discard(peer_id)

    def _count_bytes(self, old: PeerStats, new: PeerStats) -> None:
        self.bytes_sent_total += _delta(old.bytes_sent, new.bytes_sent)
        self.bytes_received_total += _delta(old.bytes_received, new.bytes_received)
        self.dropped_total += _delta(old.dropped_microbatches, new.dropped_microbatches)
        totals = self.bytes_by_kind_total
        for kind, value in new.bytes_by_kind.items():
            totals[kind] = totals.get(kind, 0) + _delta(old.bytes_by_kind.get(kind, 0), value)


def _take_recovery_report(stats: PeerStats) -> str:
    """Remove the `recovery:<method>:<sources>` keys a rebuilt peer puts in bytes_by_kind (the
    one free-form map of a heartbeat; peer/recovery/rebuild.py) and describe them; they are not
    bytes."""
    keys = [k for k in stats.bytes_by_kind if is_report_key(k)]
    return "; ".join(describe(k, stats.bytes_by_kind.pop(k)) for k in keys)


def _delta(old: int, new: int) -> int:
    """Growth of a peer's counter; a smaller value means the peer restarted it from zero."""
    return new - old if new >= old else new
