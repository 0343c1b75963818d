"""Roster: the membership's record, and every question asked of it.

What coordinator/membership.py's transitions (join, heartbeat, moves, departures) change, kept
apart from them: the members (live and recently departed) by peer id, the stage table
(coordinator/stages.py), the exclusions (coordinator/departure.py), the traffic totals
(coordinator/traffic.py), counters, events and the training curve; the epoch and the log of
member changes views are cut from (coordinator/views.py); and what the store must save next
(`take_changes`, `take_progress`, `take_bans`) or loads back after a restart (`restore`).

Invariants kept here: `epoch` only grows, and every member change moves it and enters the change
log (`_changed_member`); a delta from epoch E is complete while E >= `changes_from`; after a
restart the epoch jumps by RESTART_EPOCH_GAP. No I/O and no clock of its own.
"""

from __future__ import annotations

from collections import deque

from coordinator.departure import DEFAULT_REJOIN_COOLDOWN_S, Ban, Exclusions
from coordinator.events import Event, EventLog, History
from coordinator.member import Member
from coordinator.planner import StagePlanner
from coordinator.stages import StageSummary, StageTable
from coordinator.traffic import Traffic
from protocols.memory import stage_bytes
from protocols.runspec import RunSpec

RESTART_EPOCH_GAP = 1000
CHANGE_LOG = 65_536  # member changes remembered for view deltas


class Roster:
    """The swarm's members, stages, epoch, revocations, events and training curve; changed
    only by Membership (its subclass), read by everyone."""

    def __init__(self, spec: RunSpec, swarm_id: str, *, epoch: int = 0,
                 events: EventLog | None = None, history: History | None = None,
                 max_departed: int = 256, trust_stage_hints: bool = False,
                 rejoin_cooldown_s: float = DEFAULT_REJOIN_COOLDOWN_S) -> None:
        self.spec = spec
        self.swarm_id = swarm_id
        self.epoch = epoch
        self.events = events if events is not None else EventLog()
        self.history = history if history is not None else History()
        self.max_departed = max_departed
        self.trust_stage_hints = trust_stage_hints
        self.exclusions = Exclusions(swarm_id, rejoin_cooldown_s)
        self.lease_s = spec.membership.lease_s
        self.n_stages = spec.pipeline.stages + 1  # block stages 1..S plus stage 0
        self._members: dict[str, Member] = {}
        self._stages = StageTable(self.n_stages, self._members)
        self.stage_needs = stage_bytes(spec)  # estimated bytes per stage (protocols/memory.py)
        self.planner = StagePlanner(spec, self.stage_needs, self._members, self._stages)
        self._changed: set[str] = set()  # structural changes, persisted at once
        self._deleted: set[str] = set()
        self._progressed: set[str] = set()  # heartbeated since the last periodic flush
        self.counters = {k: 0 for k in ("joins", "rejoins", "heartbeats", "leaves", "expired",
                                        "reported_lost", "moves", "rebuilds")}
        self.traffic = Traffic()  # swarm-wide byte and drop totals (coordinator/traffic.py)
        # (epoch, peer id) of every member change, for view deltas (coordinator/views.py): a
        # delta from epoch E is complete while E >= changes_from
        self.changes: deque[tuple[int, str]] = deque(maxlen=CHANGE_LOG)
        self.changes_from = epoch

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

    def live_count(self) -> int:
        """How many members are live; O(stages)."""
        return self._stages.live_count()

    @property
    def rejoin_cooldown_s(self) -> float:
        return self.exclusions.rejoin_cooldown_s

    def revoked(self) -> list[str]:
        return self.exclusions.revoked()

    def is_revoked(self, peer_id: str) -> bool:
        return self.exclusions.is_revoked(peer_id)

    def is_banned(self, peer_id: str) -> bool:
        return self.exclusions.is_banned(peer_id)

    def bans(self) -> list[Ban]:
        return self.exclusions.bans()

    def check_may_join(self, peer_id: str, now: float) -> None:
        """Raise Banned or CoolingDown when `peer_id` may not join now."""
        self.exclusions.check_may_join(peer_id, now)

    def stage_summaries(self) -> list[StageSummary]:
        return self._stages.summaries()

    def attested(self, stage: int) -> tuple[int, str]:
        """(step, state hash) the coordinator attests for `stage` ((0, "") while none)."""
        return self._stages.attested(stage)

    def step(self) -> int:
        """The swarm's optimizer step: stage 0's attested step (any stage's if stage 0 never
        attested one). Attested, not the furthest any member reports: one liar cannot move it."""
        return self._stages.step()

    # the swarm's traffic totals (coordinator/traffic.py), as /status and /metrics read them
    @property
    def bytes_sent_total(self) -> int:
        return self.traffic.bytes_sent_total

    @property
    def bytes_received_total(self) -> int:
        return self.traffic.bytes_received_total

    @property
    def dropped_total(self) -> int:
        return self.traffic.dropped_total

    @property
    def bytes_by_kind_total(self) -> dict[str, int]:
        return self.traffic.bytes_by_kind_total

    # ------------------------------------------------------------------ persistence hooks

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
                st = self._stages[m.stage]
                st.add(m)
                st.trained = st.trained or m.stats.step > 0
            else:
                self.exclusions.revoke(m.peer_id, m.cert_expires, now)
        self._bump()
        self.changes.clear()
        self.changes_from = self.epoch
        self.events.append(Event(now, "restart", "", -1, detail))

    def take_changes(self) -> tuple[list[Member], list[str], list[Event]]:
        """Members changed structurally and ids to delete since the last call, with events."""
        changed = [self._members[p] for p in self._changed if p in self._members]
        deleted = list(self._deleted)
        self._changed.clear()
        self._deleted.clear()
        self._progressed.difference_update(m.peer_id for m in changed)
        return changed, deleted, self.events.take_unsaved()

    def restore_bans(self, bans: list[Ban]) -> None:
        """Bans read back from the store (already saved)."""
        self.exclusions.restore_bans(bans)

    def take_bans(self) -> list[Ban]:
        """Bans not yet persisted."""
        return self.exclusions.take_bans()

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
        if len(self.changes) == CHANGE_LOG:
            self.changes_from = self.changes[0][0]
        self.changes.append((self.epoch, m.peer_id))
        self._changed.add(m.peer_id)
        self.events.append(event)
