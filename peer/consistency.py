"""The rules that keep the replicas of a stage identical: pure functions of the swarm view.

No network and no torch here; the daemon, the sync rounds and recovery apply these rules, and
tests check them with a hand-made view:
- *ready*: a peer serves its stage and counts as a live replica in `READY_STATES`;
- *lowest id wins*: when replicas disagree (hashes, aggregators), the one with the lowest peer id
  keeps its weights and the others yield (`lowest_id`);
- *a hash belongs to a step*: a state hash is reported only for the step it was computed after
  (`StateHash`);
- *when a replica re-downloads or fast-forwards* (`differing_hash`, `behind_the_swarm`,
  `may_fast_forward`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocols.coordinator_client import READY_STATES, SwarmView


def lowest_id(peer_ids: Iterable[str]) -> str:
    """The replica whose view wins a disagreement: the lowest peer id. ValueError if none."""
    return min(peer_ids)


def leader_order(peer_ids: Iterable[str]) -> list[str]:
    """Replicas in the order a round picks its aggregator: the first reachable one, lowest id
    first (so that, reachable, `lowest_id` leads)."""
    return sorted(peer_ids)


def live_replicas(view: SwarmView | None, stage: int) -> list[str]:
    """The ready, unrevoked replicas of `stage`, in peer-id order (the sync rounds' order)."""
    if view is None:
        return []
    return leader_order(p.peer_id for p in view.replicas(stage)
                        if p.state in READY_STATES and p.peer_id not in view.revoked)


def address_of(view: SwarmView | None, peer_id: str) -> str:
    """Where `peer_id` is reached, from the swarm view; KeyError when it is not in the view."""
    p = view.peer(peer_id) if view is not None else None
    if p is None:
        raise KeyError(f"peer {peer_id[:8]} is not in the swarm view")
    return p.address


def departed_peers(view: SwarmView | None) -> set[str]:
    """Peers the view says are gone or going (not ready, not syncing; or revoked)."""
    if view is None:
        return set()
    gone = {p.peer_id for p in view.peers if p.state not in (*READY_STATES, "syncing")}
    return gone | set(view.revoked)


def swarm_step(view: SwarmView | None) -> int:
    """The newest step any stage of the view reached."""
    return max((s.step for s in (view.stages if view else ())), default=0)


class StateHash:
    """A stage's state hash, paired with the step it was computed after.

    A step advances the step counter on the compute thread before the new hash is computed; a
    heartbeat in between must not pair the new step with the old hash (a false drift), so `at`
    answers "" for any other step than the one the hash was set at.
    """

    def __init__(self) -> None:
        self._step, self._value = -1, ""

    def set(self, step: int, value: str) -> None:
        self._step, self._value = step, value

    def at(self, step: int) -> str:
        return self._value if step == self._step else ""

    def clear(self) -> None:
        self._step, self._value = -1, ""


class StallClock:
    """Whether a replica's step has not moved for a while (the condition of `behind_the_swarm`):
    remembers when each new step was first seen."""

    def __init__(self) -> None:
        self._step, self._since = -1, 0.0

    def stalled(self, step: int, now: float, after_s: float) -> bool:
        """Whether `step` has been this replica's step for at least `after_s` seconds."""
        if self._step != step:
            self._step, self._since = step, now
        return now - self._since >= after_s


@dataclass(frozen=True)
class Verdict:
    """What a replica must do after comparing itself with the view: `download` the stage again
    (why says why), or `adopt` the swarm's `step` with its own weights."""

    action: str  # "download" or "adopt"
    why: str = ""
    step: int = 0


def differing_hash(view: SwarmView, me: str, stage: int, step: int, state_hash: str
                   ) -> Verdict | None:
    """Replicas at the same step must hash equal; the one that is not the lowest id yields
    (re-downloads). The heartbeat check of a ready replica after `step` with `state_hash`."""
    peers = [p for p in view.replicas(stage)
             if p.state in READY_STATES and p.stats.step == step
             and p.stats.state_hash and p.peer_id != me]
    differing = [p for p in peers if p.stats.state_hash != state_hash]
    if differing and lowest_id(p.peer_id for p in peers) < me:
        return Verdict("download", f"state hash differs from {differing[0].peer_id[:8]} at step "
                                   f"{step}")
    return None


def behind_the_swarm(view: SwarmView, me: str, stage: int, step: int, *, fast_forwards: bool
                     ) -> Verdict | None:
    """The heartbeat check of a ready replica whose step (`step`) has not moved for a while.

    Only then: the view's steps are heartbeat snapshots, and a swarm that steps several times a
    second shows replicas "two steps apart" that are only reporting at different moments.
    """
    # A replica that joined mid-step (or missed rounds) may be steps behind the others of its
    # stage for good: callers refuse its step. Two steps is not a race of one round.
    ahead = [p for p in view.replicas(stage) if p.state in READY_STATES
             and p.peer_id != me and p.stats.step >= step + 2]
    if ahead:
        return Verdict("download", f"{ahead[0].peer_id[:8]} is at step {ahead[0].stats.step}, "
                                   f"this replica after step {step}")
    # No replica of this stage is newer, but the other stages are steps ahead (the newer
    # replicas of this stage died): no download can help, and every caller refuses this step,
    # so the swarm would stall. Carry on at the swarm's step with these weights (only where the
    # sync mode allows a fast-forward: SPSA's replicas must replay the ledger's codes instead).
    newest = max((p.stats.step for p in view.peers if p.state in READY_STATES
                  and p.stage != stage), default=0)
    if newest >= step + 2 and fast_forwards:
        return Verdict("adopt", step=newest)
    return None


def may_fast_forward(view: SwarmView, me: str, stage: int, step: int, state_hash: str) -> bool:
    """Whether a replica after `step` may adopt a later step without applying the ones between:
    exact when no other holder of the stage is ahead of it or differs from it (same step and
    state hash in the view), since then no replica applied those steps."""
    others = [p for p in view.replicas(stage)
              if p.peer_id != me and p.state not in ("lost", "left")]
    return not any(p.state not in READY_STATES or p.stats.step > step
                   or p.stats.state_hash != state_hash for p in others)
