"""Membership: who is in the swarm, which stage each member holds, and until when.

This is the coordinator's state machine, with no I/O and no clock of its own (every method takes
`now`), so it is tested without sockets. coordinator/service.py drives it from gRPC calls and a
once-a-second tick; coordinator/store.py persists what it reports as changed.

This module holds the transitions: join, heartbeat, address and reach, moves, departures. What
they change and what follows from it is kept by the modules Membership is built from, each
tested through it: coordinator/roster.py (the record: members, epoch, change log, persistence
hooks, the queries), coordinator/stages.py (replica sets, throughput totals, attestation),
coordinator/planner.py (which stage a peer takes or moves to), coordinator/departure.py (expiry,
revocation, bans, cooldowns, rebuild marks) and coordinator/traffic.py (the swarm's byte and
drop totals). The names other modules import from here are re-exported (`__all__`).

Invariants:
- `epoch` only grows. It moves on every change peers must route around: join, leave, expiry,
  a stage change (assignment, rebalance) and a reported state change. Views carry their epoch.
- A member is *live* while its lease holds. Heartbeats renew it (O(1) each); `sweep` expires the
  silent ones (O(n), once a second). A departed member stays listed and its id is revoked
  (coordinator/departure.py).
- Each live member is in exactly one stage's replica set (coordinator/stages.py). A stage that
  empties after training gets a `rebuild` method and a "skip" event (departure.py); it clears
  when a replica reports "rebuilt" or "training", with a "rebuild" event whose detail says what
  the peer actually did (its `recovery:` report).
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

from coordinator.assignment import Move
from coordinator.departure import (
    DEFAULT_REJOIN_COOLDOWN_S,
    Ban,
    Banned,
    CoolingDown,
    lapsed,
    overflow,
    rebuild_after,
    skip_event,
)
from coordinator.events import Event, HistoryPoint
from coordinator.member import HEALTHY_STATES, Member
from coordinator.placement import TooSmall
from coordinator.roster import CHANGE_LOG, RESTART_EPOCH_GAP, Roster
from coordinator.stages import Attested, StageSummary, attest, micro
from coordinator.traffic import keep_counters, take_recovery_report
from protocols.coordinator_client import READY_STATES, Benchmark, PeerStats

# the names other modules import from here, now defined in the modules above
__all__ = ["CHANGE_LOG", "DEFAULT_REJOIN_COOLDOWN_S", "HEALTHY_STATES", "RESTART_EPOCH_GAP",
           "Attested", "Ban", "Banned", "CoolingDown", "Member", "Membership", "StageSummary",
           "attest"]


class Membership(Roster):
    """The transitions of the swarm's membership: joins, heartbeats, moves, departures."""

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
            allowed = self.planner.allowed(benchmark)
        except TooSmall as exc:
            self.events.append(Event(now, "refuse", peer_id, -1, str(exc)))
            raise
        self.exclusions.end_cooldown(peer_id)
        old = self._members.get(peer_id)
        if old is not None and old.live:
            self._stages[old.stage].discard(old)
        stage, hinted = self.planner.join_stage(peer_id, benchmark, stage_hint, old, allowed,
                                                self.trust_stage_hints)
        # the stages' last attested steps (sweep attests every tick; not recomputed here, so a
        # join storm stays O(1) per join); the hint only seeds the member's reported step
        clamped = min(step_hint, self._stages.furthest_step())
        kind = "join" if old is None else "rejoin"
        m = Member(peer_id=peer_id, public_key=bytes(public_key), address=address, stage=stage,
                   state="joining", benchmark=benchmark, joined_at=now, last_seen=now,
                   lease_expires=now + (self.lease_s if lease_s is None else lease_s),
                   cert_expires=old.cert_expires if old is not None else 0.0,
                   relay=relay, has_leaf=has_leaf,
                   placed=self.trust_stage_hints and 0 <= stage_hint == stage)
        if old is not None:  # a re-join does not refill the heartbeat rate limit
            m.beat_tokens, m.beat_at = old.beat_tokens, old.beat_at
            keep_counters(old.stats, m.stats)
        m.stats.step = clamped
        self._members[peer_id] = m
        self._stages[stage].add(m)
        self.exclusions.unrevoke(peer_id)
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
        report = take_recovery_report(stats)
        self.traffic.count(m.stats, stats)
        if stats.state != m.state:
            self._state_changed(m, stats.state, now, report)
        before = micro(m.throughput)
        m.stats = stats
        st = self._stages[m.stage]
        st.throughput_u += micro(m.throughput) - before
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
        self.exclusions.cool_down(peer_id, now)

    def ban(self, peer_id: str, reason: str, now: float) -> bool:
        """The operator's ban: revoke `peer_id` at once (if live) and refuse its key from now on
        (persisted: `take_bans`). Returns whether it was a live member."""
        m = self._members.get(peer_id)
        was_live = m is not None and m.live
        self.exclusions.ban(peer_id, reason, now)
        if was_live:
            assert m is not None
            self._depart(m, "left", Event(now, "ban", peer_id, m.stage, reason or "banned"),
                         now)
        else:
            self._bump()  # the view's revoked list changed
            self.events.append(Event(now, "ban", peer_id, m.stage if m else -1,
                                     reason or "banned"))
        return was_live

    def sweep(self, now: float, grace_s: float = 0.0) -> list[str]:
        """Expire members whose lease lapsed more than `grace_s` ago (the coordinator's own
        overload: service.py); forget old revocations. Returns the expired ids."""
        expired = lapsed(self._members, now, grace_s)
        for m in expired:
            self.counters["expired"] += 1
            self.expire(m.peer_id, f"silent for {now - m.last_seen:.1f} s", now)
        self.exclusions.forget_lapsed(now)
        self._stages.attest_all()  # keep the attested steps at most a tick old
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
        move = self.planner.rebalance(min_gain)
        if move is None:
            return None
        self._move(move, now, f"bottleneck {move.bottleneck_before:.3g} -> "
                              f"{move.bottleneck_after:.3g} samples/s")
        return move

    def place_relayed(self, now: float) -> Move | None:
        """At most one move that puts a relayed peer where it costs least (stage 0) or brings a
        reachable replica to its stage first (coordinator/placement.py); none while a peer an
        earlier such move sent does not serve its new stage yet."""
        move = self.planner.relay_move()
        if move is None:
            return None
        why = ("nobody can dial it; a driver only dials out" if move.to_stage == 0 else
               f"it can be dialled; stage {move.to_stage}'s replica cannot")
        self._move(move, now, f"{why}; bottleneck {move.bottleneck_before:.3g} -> "
                              f"{move.bottleneck_after:.3g} samples/s")
        return move

    def _move(self, move: Move, now: float, detail: str) -> None:
        m = self._members[move.peer_id]
        self._stages[m.stage].discard(m)
        self._stages[move.to_stage].add(m)
        m.stage = move.to_stage
        m.pending_action = "move"
        self.counters["moves"] += 1
        self._changed_member(m, Event(now, "move", m.peer_id, move.to_stage,
                                      f"stage {move.from_stage} -> {move.to_stage}; {detail}"))

    def sample_history(self, now: float) -> HistoryPoint | None:
        """Offer the current training progress to the curve (stage-0 peers' loss and speed)."""
        drivers = [self._members[p] for p in self._stages[0].replicas]
        if not drivers:
            return None
        step = self.step()
        losses = [m.stats.loss for m in drivers if math.isfinite(m.stats.loss)]
        loss = sum(losses) / len(losses) if losses else math.nan
        tokens_per_s = sum(m.stats.tokens_per_s for m in drivers)
        point = HistoryPoint(now, step, loss, tokens_per_s, self.traffic.bytes_per_step(step))
        if not self.history.offer(point):
            return None
        self.traffic.mark(step)
        return point

    def note_certificate(self, peer_id: str, not_after: float) -> None:
        """Record that `peer_id` now holds a certificate valid until `not_after`."""
        m = self._members[peer_id]
        m.cert_expires = max(m.cert_expires, not_after)
        self._progressed.add(peer_id)

    # ------------------------------------------------------------------ internals

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
        """Take a live member out (the rules: coordinator/departure.py)."""
        # the stage's step as its replicas (this one too) last attested it
        self._stages.attest(m.stage)
        m.live = False
        m.state = state
        m.pending_action = ""
        st = self._stages[m.stage]
        st.discard(m)
        method = rebuild_after(m.stage, self._stages, self._members, self.n_stages,
                               self.spec.pipeline.checkfree_plus)
        if method:
            st.rebuild = method
        self.exclusions.revoke(m.peer_id, m.cert_expires, now)
        self._changed_member(m, event)
        if method and m.stage > 0:
            self.events.append(skip_event(now, m.stage, method))
        for peer_id in overflow(self._members, self.max_departed):
            del self._members[peer_id]
            self._deleted.add(peer_id)
            self._changed.discard(peer_id)
            self._progressed.discard(peer_id)
