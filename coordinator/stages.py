"""Stages: each stage's replica set, its running throughput total and its attested state.

Membership (coordinator/membership.py) decides who is in which stage; this module keeps, per
stage, what follows from that and from the replicas' heartbeats, so that the questions asked
often (views, status, every Join) are cheap:

- Each live member is in exactly one stage's replica set; stages are 0..pipeline.stages.
- A stage's throughput is kept as a running integer sum (micro-samples/s): adding and removing
  members never drifts, and a Join's assignment reads it in O(stages), not O(members).
- A stage's state is *attested* (`attest`): the (step, state hash) most of its live ready
  replicas report, ties to the most senior member. The stage's step and `step()` (the swarm's)
  are attested steps, never the max of what one member claims; a stage keeps its last attested
  step while no replica attests one. Attestation runs lazily (views, status, the once-a-second
  sweep), not per heartbeat: a heartbeat only marks its stage dirty.

No I/O and no clock; the members themselves are Membership's (the table holds a reference to
its dict and never adds or removes one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from coordinator.assignment import StageLoad
from coordinator.member import HEALTHY_STATES, Member


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


def micro(samples_per_s: float) -> int:
    """`samples_per_s` as an integer count of micro-samples/s (0 for NaN or infinity)."""
    return round(samples_per_s * 1e6) if math.isfinite(samples_per_s) else 0


@dataclass(slots=True)
class Stage:
    """One stage's replicas and what the coordinator knows of its state."""

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
        self.throughput_u += micro(m.throughput)
        self.dirty = True

    def discard(self, m: Member) -> None:
        if m.peer_id in self.replicas:
            self.replicas.discard(m.peer_id)
            self.throughput_u -= micro(m.throughput)
        self.dirty = True


@dataclass(frozen=True, slots=True)
class Totals:
    """A stage as a Join's assignment sees it (what `assign_stage` and `stage_for_hint` read
    of a StageLoad: its replicas and its capacity), from the running totals: O(1) a stage."""

    replicas: set[str]
    capacity: float


class StageTable:
    """The stages 0..n_stages-1 of one run; indexable and iterable as its `Stage`s."""

    def __init__(self, n_stages: int, members: dict[str, Member]) -> None:
        """`members`: Membership's dict of every listed member by peer id (read, never
        changed here)."""
        self._members = members
        self._stages = [Stage() for _ in range(n_stages)]

    def __getitem__(self, i: int) -> Stage:
        return self._stages[i]

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    def live_count(self) -> int:
        """How many members are live; O(stages)."""
        return sum(len(st.replicas) for st in self._stages)

    def furthest_step(self) -> int:
        """The highest last attested step of any stage (not recomputed: O(stages))."""
        return max(st.step for st in self._stages)

    def attest(self, i: int) -> None:
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

    def attest_all(self) -> None:
        for i in range(len(self._stages)):
            self.attest(i)

    def attested(self, stage: int) -> tuple[int, str]:
        """(step, state hash) the coordinator attests for `stage` ((0, "") while none)."""
        self.attest(stage)
        st = self._stages[stage]
        return st.attested_step, st.attested_hash

    def step(self) -> int:
        """The swarm's optimizer step: stage 0's attested step (any stage's if stage 0 never
        attested one). Attested, not the furthest any member reports: one liar cannot move it."""
        self.attest_all()
        return self._stages[0].step or self.furthest_step()

    def summaries(self) -> list[StageSummary]:
        out = []
        for i, st in enumerate(self._stages):
            self.attest(i)
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

    def loads(self, skip_ratio: float) -> dict[int, StageLoad]:
        """Each stage's replicas and their throughput, for the planners (assignment.py,
        placement.py); block stages carry 1 - `skip_ratio` of the traffic. O(members)."""
        block_share = 1.0 - skip_ratio
        return {i: StageLoad({p: self._members[p].throughput for p in st.replicas},
                             1.0 if i == 0 else block_share)
                for i, st in enumerate(self._stages)}

    def join_loads(self, skip_ratio: float) -> dict[int, Totals]:
        """`loads` for a Join's assignment, from the stages' running totals: O(stages)."""
        block_share = 1.0 - skip_ratio
        return {i: Totals(st.replicas, st.throughput_u / 1e6 / (1.0 if i == 0 else block_share))
                for i, st in enumerate(self._stages)}
