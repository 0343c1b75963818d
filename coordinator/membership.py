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
- A stage's state is *attested* (`attest`): the (step, state hash) most of its live ready
  replicas report, ties to the most senior member. The stage's step and `step()` (the swarm's)
  are attested steps, never the max of what one member claims; a stage keeps its last attested
  step while no replica attests one. Attestation runs lazily (views, status), not per heartbeat.
- A member's `reach` is "" until the coordinator's dial-back ends (coordinator/reach.py), and
  again after a (re-)join or an announced address (`change_address`); `set_reach` records a
  result only for the address it was dialled at. A reach or address change moves the epoch.
- A stage hint is honoured only to re-attach, or for an empty / rebuilding stage
  (`assignment.stage_for_hint`; `trust_stage_hints` for an operator's lab). A member that left
  may join again only after `rejoin_cooldown_s`; a banned peer id (`ban`, persisted by the
  store) never.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from coordinator.assignment import (
    Move,
    StageLoad,
    assign_stage,
    plan_rebalance,
    rebuild_method,
    stage_for_hint,
)
from coordinator.events import Event, EventLog, History, HistoryPoint
from coordinator.placement import TooSmall, check_fits_some, fits, only_fits, plan_relay_move
from protocols.coordinator_client import READY_STATES, Benchmark, PeerStats
from protocols.memory import stage_bytes
from protocols.recovery_report import describe, is_report_key
from protocols.runspec import RunSpec

HEALTHY_STATES = frozenset(READY_STATES)
RESTART_EPOCH_GAP = 1000
DEFAULT_REJOIN_COOLDOWN_S = 5.0
CHANGE_LOG = 65_536  # member changes remembered for view deltas


class Banned(Exception):
    """The peer's key was banned by the operator (`shoal ban`); it may not join."""


class CoolingDown(Exception):
    """The peer left moments ago; it may join again in `retry_in_s` seconds."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


@dataclass(frozen=True, slots=True)
class Ban:
    """An operator's ban of one peer id (so of one key: the id is a digest of the key)."""

    peer_id: str
    t: float
    reason: str


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
    beat_tokens: float = -1.0  # heartbeat rate limit (service.py); < 0 until the first beat
    beat_at: float = 0.0
    # reachability (coordinator/reach.py; not persisted: a restarted coordinator checks again)
    reach: str = ""  # "" not checked yet | "direct" | "relayed" | "unreachable"
    relay: bool = False  # offers to relay for unreachable peers (shoal peer --relay)
    relayed_by: str = ""  # the relay `address` is a port of (HeartbeatRequest.relayed_by)
    has_leaf: bool = False  # holds a swarm TLS leaf (sent a CSR at join): serves mTLS off-host
    relay_told: str = ""  # the relay this member was last told to attach to
    # placed by an operator (a stage hint honoured under trust_stage_hints, the lab's --place):
    # relay-aware placement never moves it (not persisted)
    placed: bool = False

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
    attested_hash: str = ""  # the stage state most live replicas report ("" while none does)
    attested_step: int = 0


@dataclass(slots=True)
class _Stage:
    replicas: set[str] = field(default_factory=set)
    grad_norm: float = 0.0
    step: int = 0  # the last attested step; kept while no live replica attests one
    rebuild: str = ""
    attested_hash: str = ""  # "" while no live ready replica reports a hash
    attested_step: int = 0
    dirty: bool = True  # a replica's stats or the replica set changed since the last attest
    trained: bool = False  # a replica reported a step > 0 here (whether an emptied stage needs
    # a rebuild; a liar can only make the next holder rebuild rather than start afresh)
    # the replicas' throughput summed in micro-samples/s (an integer: adding and removing
    # members never drifts), kept up to date so that a Join need not sum the swarm (O(N))
    throughput_u: int = 0

    def add(self, m: Member) -> None:
        self.replicas.add(m.peer_id)
        self.throughput_u += _micro(m.throughput)
        self.dirty = True

    def discard(self, m: Member) -> None:
        if m.peer_id in self.replicas:
            self.replicas.discard(m.peer_id)
            self.throughput_u -= _micro(m.throughput)
        self.dirty = True


def _micro(samples_per_s: float) -> int:
    return round(samples_per_s * 1e6) if math.isfinite(samples_per_s) else 0


@dataclass(frozen=True, slots=True)
class _Totals:
    """A stage as a Join's assignment sees it (what `assign_stage` and `stage_for_hint` read
    of a StageLoad: its replicas and its capacity), from the running totals: O(1) a stage."""

    replicas: set[str]
    capacity: float


@dataclass(frozen=True, slots=True)
class Attested:
    """A stage's state as the coordinator attests it (contract 1 of issue #12)."""

    step: int
    state_hash: str
    votes: int  # live ready replicas that reported exactly this (step, hash)
    grad_norm: float


def attest(members: list[Member]) -> Attested | None:
    """The (step, state hash) most of `members` report; None when none reports one.

    Only live members in READY_STATES with a non-empty hash vote. The largest group wins
    (majority first); a tie goes to the group holding the most senior member (earliest
    joined_at, then lowest peer id): grinding a key that sorts first buys nothing, since a newer
    member never outranks an older one and votes are counted before seniority.
    """
    groups: dict[tuple[int, str], list[Member]] = {}
    for m in members:
        if m.live and m.stats.state in HEALTHY_STATES and m.stats.state_hash:
            groups.setdefault((m.stats.step, m.stats.state_hash), []).append(m)
    if not groups:
        return None

    def rank(item: tuple[tuple[int, str], list[Member]]) -> tuple:
        senior = min((m.joined_at, m.peer_id) for m in item[1])
        return (-len(item[1]), senior)

    (step, digest), voters = min(groups.items(), key=rank)
    senior = min(voters, key=lambda m: (m.joined_at, m.peer_id))
    return Attested(step, digest, len(voters), senior.stats.grad_norm)


class Membership:
    """The swarm's members, stages, epoch, revocations, events and training curve."""

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
        self.rejoin_cooldown_s = rejoin_cooldown_s
        self._banned: dict[str, Ban] = {}
        self._unsaved_bans: list[Ban] = []
        self._cooldown: dict[str, float] = {}  # peer id -> when it may join again (after Leave)
        self.lease_s = spec.membership.lease_s
        self.n_stages = spec.pipeline.stages + 1  # block stages 1..S plus stage 0
        self._members: dict[str, Member] = {}
        self._stages = [_Stage() for _ in range(self.n_stages)]
        self.stage_needs = stage_bytes(spec)  # estimated bytes per stage (protocols/memory.py)
        self._revoked: dict[str, float] = {}  # peer id -> when its last certificate expires
        self._changed: set[str] = set()  # structural changes, persisted at once
        self._placing: set[str] = set()  # moved by place_relayed, not serving the new stage yet
        self._placement_turn = 0  # where place_relayed begins among the relayed candidates
        self._deleted: set[str] = set()
        self._progressed: set[str] = set()  # heartbeated since the last periodic flush
        self.counters = {k: 0 for k in ("joins", "rejoins", "heartbeats", "leaves", "expired",
                                        "reported_lost", "moves", "rebuilds")}
        # swarm-wide totals over the whole run, robust to peers restarting their counters
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self.dropped_total = 0
        self.bytes_by_kind_total: dict[str, int] = {}
        self._curve_mark: tuple[int, int] | None = None  # (step, bytes) of the last point
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
        return sum(len(st.replicas) for st in self._stages)

    def revoked(self) -> list[str]:
        return sorted(self._revoked)

    def is_revoked(self, peer_id: str) -> bool:
        return peer_id in self._revoked or peer_id in self._banned

    def is_banned(self, peer_id: str) -> bool:
        return peer_id in self._banned

    def bans(self) -> list[Ban]:
        return sorted(self._banned.values(), key=lambda b: (b.t, b.peer_id))

    def check_may_join(self, peer_id: str, now: float) -> None:
        """Raise Banned or CoolingDown when `peer_id` may not join now."""
        ban = self._banned.get(peer_id)
        if ban is not None:
            raise Banned(f"peer {peer_id} is banned from swarm {self.swarm_id!r} by its operator"
                         + (f" ({ban.reason})" if ban.reason else "")
                         + "; its key cannot join again")
        until = self._cooldown.get(peer_id)
        if until is not None and until > now:
            raise CoolingDown(f"peer {peer_id} left {self.rejoin_cooldown_s - (until - now):.1f} s "
                              f"ago; it may join again in {until - now:.1f} s", until - now)

    def stage_summaries(self) -> list[StageSummary]:
        out = []
        for i, st in enumerate(self._stages):
            self._attest(i)
            members = [self._members[p] for p in sorted(st.replicas)]
            if not members:
                state = "empty"
            elif any(m.state in HEALTHY_STATES for m in members):
                state = "ok"
            else:
                state = "degraded"
            out.append(StageSummary(i, tuple(m.peer_id for m in members),
                                    sum(m.throughput for m in members), st.grad_norm, st.step,
                                    st.rebuild, state, st.attested_hash, st.attested_step))
        return out

    def attested(self, stage: int) -> tuple[int, str]:
        """(step, state hash) the coordinator attests for `stage` ((0, "") while none)."""
        self._attest(stage)
        st = self._stages[stage]
        return st.attested_step, st.attested_hash

    def step(self) -> int:
        """The swarm's optimizer step: stage 0's attested step (any stage's if stage 0 never
        attested one). Attested, not the furthest any member reports: one liar cannot move it."""
        for i in range(self.n_stages):
            self._attest(i)
        return self._stages[0].step or max(st.step for st in self._stages)

    # ------------------------------------------------------------------ changes

    def join(self, peer_id: str, public_key: bytes, address: str, benchmark: Benchmark,
             stage_hint: int, step_hint: int, now: float, *, relay: bool = False,
             has_leaf: bool = False, lease_s: float | None = None) -> Member:
        """Admit (or re-admit) a peer and give it a stage; the caller checked admission.

        A stage hint is honoured where it takes nothing from anyone (`stage_for_hint`): a peer
        re-attaching the stage this coordinator knows it held (it already holds the weights), an
        empty stage, a stage waiting for a rebuild; every valid hint with `trust_stage_hints`.
        Otherwise a live member joining again keeps its current stage and a newcomer gets the
        normal assignment. `step_hint` is clamped to the furthest attested stage step (it only
        seeds the member's reported step; attestation never counts it). Raises Banned /
        CoolingDown (`check_may_join`), TooSmall (its device has room for no stage; a "refuse"
        event says so) before changing anything. Only stages the device fits are assigned or
        hinted to, unless `trust_stage_hints`. `lease_s`: the lease the coordinator tells this
        peer (coordinator/pacing.py); the spec's by default.
        """
        if not 0 <= stage_hint < self.n_stages and stage_hint != -1:
            raise ValueError(f"stage_hint {stage_hint} is not a stage of this run "
                             f"(0..{self.n_stages - 1}, or -1 for none)")
        self.check_may_join(peer_id, now)
        try:
            allowed = check_fits_some(self.stage_needs, benchmark.memory_available_bytes,
                                      benchmark.device)
        except TooSmall as exc:
            self.events.append(Event(now, "refuse", peer_id, -1, str(exc)))
            raise
        self._cooldown.pop(peer_id, None)
        old = self._members.get(peer_id)
        if old is not None and old.live:
            self._stages[old.stage].discard(old)
        loads = self._join_loads()
        hinted = stage_for_hint(stage_hint, loads,
                                held=old.stage if old is not None else None,
                                rebuilding={i for i, st in enumerate(self._stages) if st.rebuild},
                                trusted=self.trust_stage_hints)
        if hinted is not None and hinted not in allowed and not self.trust_stage_hints:
            hinted = None  # its device has no room for the stage it asks for
        if hinted is not None:
            stage = hinted
        elif old is not None and old.live:
            stage = old.stage
        else:
            stage = assign_stage(loads, benchmark.samples_per_s, allowed,
                                 self._only_fits(peer_id, benchmark, allowed))
        # the stages' last attested steps (sweep attests every tick; not recomputed here, so a
        # join storm stays O(1) per join); the hint only seeds the member's reported step
        clamped = min(step_hint, max(st.step for st in self._stages))
        kind = "join" if old is None else "rejoin"
        m = Member(peer_id=peer_id, public_key=bytes(public_key), address=address, stage=stage,
                   state="joining", benchmark=benchmark, joined_at=now, last_seen=now,
                   lease_expires=now + (self.lease_s if lease_s is None else lease_s),
                   cert_expires=old.cert_expires if old is not None else 0.0,
                   relay=relay, has_leaf=has_leaf,
                   placed=self.trust_stage_hints and 0 <= stage_hint == stage)
        if old is not None:  # a re-join does not refill the heartbeat rate limit
            m.beat_tokens, m.beat_at = old.beat_tokens, old.beat_at
            _keep_counters(old.stats, m.stats)
        m.stats.step = clamped
        self._members[peer_id] = m
        self._stages[stage].add(m)
        self._revoked.pop(peer_id, None)
        self._deleted.discard(peer_id)
        self.counters["joins" if kind == "join" else "rejoins"] += 1
        detail = f"{address}, {benchmark.samples_per_s:.3g} samples/s"
        if stage_hint >= 0 and hinted is not None:
            detail += f", re-attached at step {clamped}"
        elif stage_hint >= 0:
            detail += f", stage {stage_hint} asked for, stage {stage} assigned"
        if clamped != step_hint:
            detail += f" (step_hint {step_hint} clamped to the swarm's step {clamped})"
        self._changed_member(m, Event(now, kind, peer_id, stage, detail))
        return m

    def heartbeat(self, peer_id: str, stats: PeerStats, now: float,
                  lease_s: float | None = None) -> Member:
        """Renew a live member's lease (for `lease_s`, the lease the coordinator tells it; the
        spec's by default) and record its stats; O(1). KeyError if not live."""
        m = self._members[peer_id]
        if not m.live:
            raise KeyError(peer_id)
        self.counters["heartbeats"] += 1
        m.last_seen = now
        m.lease_expires = now + (self.lease_s if lease_s is None else lease_s)
        report = _take_recovery_report(stats)
        self._count_bytes(m.stats, stats)
        if stats.state != m.state:
            self._state_changed(m, stats.state, now, report)
        before = _micro(m.throughput)
        m.stats = stats
        st = self._stages[m.stage]
        st.throughput_u += _micro(m.throughput) - before
        st.dirty = True  # attested again when next asked for (O(1) here)
        st.trained = st.trained or (stats.step > 0 and stats.state in HEALTHY_STATES)
        self._progressed.add(peer_id)
        return m

    def change_address(self, peer_id: str, address: str, relayed_by: str, now: float) -> bool:
        """A live member is now reached at `address` (through the relay `relayed_by`, or
        directly when it is empty): its reach is unknown again until checked. Returns whether
        anything changed (a repeated announcement changes nothing). KeyError if not live."""
        m = self._members[peer_id]
        if not m.live:
            raise KeyError(peer_id)
        if (m.address, m.relayed_by) == (address, relayed_by):
            return False
        detail = f"{m.address} -> {address}" + (f" (relayed by {relayed_by})" if relayed_by
                                                 else " (direct)")
        m.address, m.relayed_by, m.reach = address, relayed_by, ""
        self._changed_member(m, Event(now, "address", peer_id, m.stage, detail))
        return True

    def set_reach(self, peer_id: str, address: str, reach: str, detail: str, now: float
                  ) -> bool:
        """Record a dial-back of a live member at `address`; ignored when the member left or
        moved to another address since the check began. Returns whether its reach changed (the
        epoch then moves, so views carry it)."""
        m = self._members.get(peer_id)
        if m is None or not m.live or m.address != address or m.reach == reach:
            return False
        m.reach = reach
        self._changed_member(m, Event(now, "reach", peer_id, m.stage, f"{reach}: {detail}"))
        return True

    def leave(self, peer_id: str, reason: str, now: float) -> None:
        """A member says it is going (drain finished, or told to): revoke it at once."""
        m = self._members.get(peer_id)
        if m is None or not m.live:
            return
        self.counters["leaves"] += 1
        self._depart(m, "left", Event(now, "leave", peer_id, m.stage, reason), now)
        if self.rejoin_cooldown_s > 0:
            self._cooldown[peer_id] = now + self.rejoin_cooldown_s

    def ban(self, peer_id: str, reason: str, now: float) -> bool:
        """The operator's ban: revoke `peer_id` at once (if live) and refuse its key from now on
        (persisted: `take_bans`). Returns whether it was a live member."""
        m = self._members.get(peer_id)
        was_live = m is not None and m.live
        if peer_id not in self._banned:
            ban = Ban(peer_id, now, reason)
            self._banned[peer_id] = ban
            self._unsaved_bans.append(ban)
        if was_live:
            assert m is not None
            self._depart(m, "left", Event(now, "ban", peer_id, m.stage, reason or "banned"),
                         now)
        else:
            self._bump()  # the view's revoked list changed
            self.events.append(Event(now, "ban", peer_id, m.stage if m else -1,
                                     reason or "banned"))
        return was_live

    def restore_bans(self, bans: list[Ban]) -> None:
        """Bans read back from the store (already saved)."""
        for b in bans:
            self._banned[b.peer_id] = b

    def take_bans(self) -> list[Ban]:
        """Bans not yet persisted."""
        out, self._unsaved_bans = self._unsaved_bans, []
        return out

    def sweep(self, now: float, grace_s: float = 0.0) -> list[str]:
        """Expire members whose lease lapsed more than `grace_s` ago (the coordinator's own
        overload: service.py); forget old revocations. Returns the expired ids."""
        expired = [m for m in self._members.values()
                   if m.live and m.lease_expires + grace_s < now]
        for m in expired:
            self.counters["expired"] += 1
            self.expire(m.peer_id, f"silent for {now - m.last_seen:.1f} s", now)
        for peer_id in [p for p, until in self._revoked.items() if until < now]:
            del self._revoked[peer_id]
        for peer_id in [p for p, until in self._cooldown.items() if until <= now]:
            del self._cooldown[peer_id]
        for i in range(self.n_stages):  # keep the attested steps at most a tick old
            self._attest(i)
        return [m.peer_id for m in expired]

    def expire(self, peer_id: str, detail: str, now: float) -> bool:
        """Count a live member lost now, its lease lapsed or not (`sweep`;
        coordinator/suspicion.py: neighbours found it dead). Returns whether it was live."""
        m = self._members.get(peer_id)
        if m is None or not m.live:
            return False
        self._depart(m, "lost", Event(now, "expire", peer_id, m.stage, detail), now)
        return True

    def rebalance(self, now: float, min_gain: float = 0.1) -> Move | None:
        """Plan and apply at most one SWARM rebalancing move; the peer learns it by heartbeat.
        A peer nobody can dial counts at a block stage for what it delivers through its relay."""
        move = plan_rebalance(self._loads(), min_gain, relayed=self._not_direct(),
                              fits=self._fits)
        if move is None:
            return None
        self._move(move, now, f"bottleneck {move.bottleneck_before:.3g} -> "
                              f"{move.bottleneck_after:.3g} samples/s")
        return move

    def place_relayed(self, now: float) -> Move | None:
        """At most one move that puts a relayed peer where it costs least (stage 0) or brings a
        reachable replica to its stage first (coordinator/placement.py); none while a peer an
        earlier such move sent does not serve its new stage yet."""
        live = [m for m in self._members.values() if m.live]
        ready = {m.peer_id for m in live
                 if m.stats.state in READY_STATES and m.stats.held_stage == m.stage
                 and not m.pending_action}
        self._placing &= {m.peer_id for m in live} - ready
        if self._placing:
            return None  # the last such move has not settled: loads and readiness will change
        not_direct = self._not_direct()
        if not any(self._members[p].stage != 0 and p in ready for p in not_direct):
            # no relayed block replica that serves its stage: nothing to weigh (the common
            # case; and weighing is O(members), a stall each tick in a large swarm)
            return None
        self._placement_turn += 1
        move = plan_relay_move(self._loads(), not_direct, ready,
                               {m.peer_id for m in live if m.placed},
                               start=self._placement_turn, fits_stage=self._fits)
        if move is None:
            return None
        why = ("nobody can dial it; a driver only dials out" if move.to_stage == 0 else
               f"it can be dialled; stage {move.to_stage}'s replica cannot")
        self._move(move, now, f"{why}; bottleneck {move.bottleneck_before:.3g} -> "
                              f"{move.bottleneck_after:.3g} samples/s")
        self._placing.add(move.peer_id)
        return move

    def _only_fits(self, peer_id: str, benchmark: Benchmark, allowed: list[int]) -> set[int]:
        """The empty stages a joining peer fits and no other live member does (placement's
        `only_fits`); O(members), so only when the choice is among two or more empty stages."""
        if benchmark.memory_available_bytes <= 0 or \
                sum(1 for i in allowed if not self._stages[i].replicas) < 2:
            return set()
        others = [m.benchmark.memory_available_bytes for m in self._members.values()
                  if m.live and m.peer_id != peer_id]
        return only_fits(self.stage_needs, benchmark.memory_available_bytes, others)

    def _fits(self, peer_id: str, stage: int) -> bool:
        """Whether `stage` fits the memory `peer_id` reported at join."""
        return fits(self.stage_needs[stage], self._members[peer_id].benchmark.
                    memory_available_bytes)

    def _not_direct(self) -> set[str]:
        return {m.peer_id for m in self._members.values()
                if m.live and m.reach in ("relayed", "unreachable")}

    def _move(self, move: Move, now: float, detail: str) -> None:
        m = self._members[move.peer_id]
        self._stages[m.stage].discard(m)
        self._stages[move.to_stage].add(m)
        m.stage = move.to_stage
        m.pending_action = "move"
        self.counters["moves"] += 1
        self._changed_member(m, Event(now, "move", m.peer_id, move.to_stage,
                                      f"stage {move.from_stage} -> {move.to_stage}; {detail}"))

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
            elif m.cert_expires > now:
                self._revoked[m.peer_id] = m.cert_expires
        self._bump()
        self.changes.clear()
        self.changes_from = self.epoch
        self.events.append(Event(now, "restart", "", -1, detail))

    def sample_history(self, now: float) -> HistoryPoint | None:
        """Offer the current training progress to the curve (stage-0 peers' loss and speed)."""
        drivers = [self._members[p] for p in self._stages[0].replicas]
        if not drivers:
            return None
        step = self.step()
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
        if len(self.changes) == CHANGE_LOG:
            self.changes_from = self.changes[0][0]
        self.changes.append((self.epoch, m.peer_id))
        self._changed.add(m.peer_id)
        self.events.append(event)

    def _loads(self) -> dict[int, StageLoad]:
        block_share = 1.0 - self.spec.pipeline.skip_ratio
        return {i: StageLoad({p: self._members[p].throughput for p in st.replicas},
                             1.0 if i == 0 else block_share)
                for i, st in enumerate(self._stages)}

    def _join_loads(self) -> dict[int, _Totals]:
        """`_loads` for a Join's assignment, from the stages' running totals: O(stages)."""
        block_share = 1.0 - self.spec.pipeline.skip_ratio
        return {i: _Totals(st.replicas, st.throughput_u / 1e6 / (1.0 if i == 0 else block_share))
                for i, st in enumerate(self._stages)}

    def _attest(self, i: int) -> None:
        """Recompute stage `i`'s attested state if its replicas or their stats changed."""
        st = self._stages[i]
        if not st.dirty:
            return
        st.dirty = False
        got = attest([self._members[p] for p in st.replicas])
        if got is None:
            st.attested_hash, st.attested_step = "", 0
            return
        st.attested_hash, st.attested_step = got.state_hash, got.step
        st.step = got.step
        if got.grad_norm > 0:
            st.grad_norm = got.grad_norm

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
        self._attest(m.stage)  # the stage's step as its replicas (this one too) last attested it
        m.live = False
        m.state = state
        m.pending_action = ""
        st = self._stages[m.stage]
        st.discard(m)
        # emptied: no replica left that holds the stage's state. A newcomer still fetching it
        # (not ready, never reported a step) does not count: it has no one left to fetch from
        # and waits for this mark to rebuild (peer/recovery/rebuild.py)
        holders = [p for p in st.replicas if self._members[p].state in READY_STATES
                   or self._members[p].stats.step > 0]
        emptied = not holders and (st.step > 0 or st.trained)
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


def _keep_counters(old: PeerStats, new: PeerStats) -> None:
    """A re-joining peer's byte and drop counters as last reported: its process counts on from
    them, so its next heartbeat adds only what is new to the swarm's totals (from zero it would
    add its whole count again), and /metrics shows no drop to 0 meanwhile."""
    new.bytes_sent, new.bytes_received = old.bytes_sent, old.bytes_received
    new.dropped_microbatches = old.dropped_microbatches
    new.bytes_by_kind = dict(old.bytes_by_kind)


def _delta(old: int, new: int) -> int:
    """Growth of a peer's counter; a smaller value means the peer restarted it from zero."""
    return new - old if new >= old else new
