"""Stage planning: which stage a joining member takes, and which member moves where.

The policies are pure functions of measured numbers: coordinator/assignment.py (a Join's stage,
stage hints, rebalancing) and coordinator/placement.py (what fits a device's memory,
relay-aware placement). This module feeds them what they read of the live members and the
stage table, and keeps the little state relay placement carries between ticks. It only plans:
Membership (coordinator/membership.py) applies a plan (moves the member, moves the epoch, logs
the event), so a plan that is not applied changes nothing but that state.
"""

from __future__ import annotations

from coordinator.assignment import Move, StageLoad, assign_stage, plan_rebalance, stage_for_hint
from coordinator.member import Member
from coordinator.placement import check_fits_some, fits, only_fits, plan_relay_move
from coordinator.stages import StageTable, Totals
from protocols.coordinator_client import READY_STATES, Benchmark
from protocols.runspec import RunSpec


class StagePlanner:
    """Plans stages for one run's members; reads them, never changes a member or a stage."""

    def __init__(self, spec: RunSpec, stage_needs: list[int], members: dict[str, Member],
                 stages: StageTable) -> None:
        """`stage_needs`: estimated bytes per stage (protocols/memory.py); `members` and
        `stages`: Membership's, read at each call."""
        self._spec = spec
        self._needs = stage_needs
        self._members = members
        self._stages = stages
        self._placing: set[str] = set()  # moved by relay_move, not serving the new stage yet
        self._turn = 0  # where relay_move begins among the relayed candidates

    def loads(self) -> dict[int, StageLoad]:
        return self._stages.loads(self._spec.pipeline.skip_ratio)

    def join_loads(self) -> dict[int, Totals]:
        """`loads` for a Join's assignment, from the stages' running totals: O(stages)."""
        return self._stages.join_loads(self._spec.pipeline.skip_ratio)

    def allowed(self, benchmark: Benchmark) -> list[int]:
        """The stages a device with `benchmark`'s memory fits; TooSmall when none does."""
        return check_fits_some(self._needs, benchmark.memory_available_bytes, benchmark.device)

    def join_stage(self, peer_id: str, benchmark: Benchmark, stage_hint: int,
                   old: Member | None, allowed: list[int], trusted: bool
                   ) -> tuple[int, int | None]:
        """(the stage, the honoured hint or None) for a peer joining with `benchmark`.

        `old`: the member as listed before this join (None for a newcomer), already taken out
        of its stage's replicas when live; `allowed`: `self.allowed(benchmark)`; `trusted`:
        every valid hint is honoured (Membership.trust_stage_hints). A hint to a stage the
        device does not fit is not honoured unless trusted; without an honoured hint a live
        member keeps its stage and a newcomer gets the normal assignment.
        """
        loads = self.join_loads()
        hinted = stage_for_hint(stage_hint, loads,
                                held=old.stage if old is not None else None,
                                rebuilding={i for i, st in enumerate(self._stages) if st.rebuild},
                                trusted=trusted)
        if hinted is not None and hinted not in allowed and not trusted:
            hinted = None  # its device has no room for the stage it asks for
        if hinted is not None:
            return hinted, hinted
        if old is not None and old.live:
            return old.stage, None
        return assign_stage(loads, benchmark.samples_per_s, allowed,
                            self.only_fits(peer_id, benchmark, allowed)), None

    def rebalance(self, min_gain: float) -> Move | None:
        """At most one SWARM rebalancing move (assignment.plan_rebalance). A peer nobody can
        dial counts at a block stage for what it delivers through its relay."""
        return plan_rebalance(self.loads(), min_gain, relayed=self.not_direct(), fits=self.fits)

    def relay_move(self) -> Move | None:
        """At most one move that puts a relayed peer where it costs least (stage 0) or brings a
        reachable replica to its stage first (placement.plan_relay_move); none while a peer an
        earlier such move sent does not serve its new stage yet. A move planned here counts as
        made: apply it."""
        live = [m for m in self._members.values() if m.live]
        ready = {m.peer_id for m in live
                 if m.stats.state in READY_STATES and m.stats.held_stage == m.stage
                 and not m.pending_action}
        self._placing &= {m.peer_id for m in live} - ready
        if self._placing:
            return None  # the last such move has not settled: loads and readiness will change
        not_direct = self.not_direct()
        if not any(self._members[p].stage != 0 and p in ready for p in not_direct):
            # no relayed block replica that serves its stage: nothing to weigh (the common
            # case; and weighing is O(members), a stall each tick in a large swarm)
            return None
        self._turn += 1
        move = plan_relay_move(self.loads(), not_direct, ready,
                               {m.peer_id for m in live if m.placed},
                               start=self._turn, fits_stage=self.fits)
        if move is not None:
            self._placing.add(move.peer_id)
        return move

    def only_fits(self, peer_id: str, benchmark: Benchmark, allowed: list[int]) -> set[int]:
        """The empty stages a joining peer fits and no other live member does (placement's
        `only_fits`); O(members), so only when the choice is among two or more empty stages."""
        if benchmark.memory_available_bytes <= 0 or \
                sum(1 for i in allowed if not self._stages[i].replicas) < 2:
            return set()
        others = [m.benchmark.memory_available_bytes for m in self._members.values()
                  if m.live and m.peer_id != peer_id]
        return only_fits(self._needs, benchmark.memory_available_bytes, others)

    def fits(self, peer_id: str, stage: int) -> bool:
        """Whether `stage` fits the memory `peer_id` reported at join."""
        return fits(self._needs[stage], self._members[peer_id].benchmark.memory_available_bytes)

    def not_direct(self) -> set[str]:
        return {m.peer_id for m in self._members.values()
                if m.live and m.reach in ("relayed", "unreachable")}
