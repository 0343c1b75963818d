"""The rules that keep the replicas of a stage identical: pure functions of the swarm view.

No network and no torch here; the daemon, the sync rounds and recovery apply these rules, and
tests check them with a hand-made view:
- *ready*: a peer serves its stage and counts as a live replica in `READY_STATES`;
- *the attested hash wins, else majority then seniority*: when replicas disagree about their
  state, the hash the coordinator attests for the stage (StageInfo.attested_hash at
  attested_step: the majority of its replicas' heartbeats) is right; without one, the hash most
  replicas hold, and on a tie the one held by the most senior replica (earliest joined_at in the
  view, then peer id) (`winning_hash`). Never the lowest peer id alone: an id is a key's hash,
  and anyone can grind a key that sorts first;
- *seniority orders the aggregators*: a round's aggregator is the first reachable replica in
  seniority order (`leader_order`), for the same reason;
- *a hash belongs to a step*: a state hash is reported only for the step it was computed after
  (`StateHash`);
- *when a replica re-downloads or fast-forwards* (`differing_hash`,
  `behind_the_attestation`, `behind_the_swarm`, `may_fast_forward`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from protocols.coordinator_client import READY_STATES, SwarmView


def lowest_id(peer_ids: Iterable[str]) -> str:
    """The lowest peer id (a deterministic last tie-break only). ValueError if none."""
    return min(peer_ids)


def joined_at(view: SwarmView | None) -> dict[str, float]:
    """Each listed peer's joined_at (the coordinator's clock): its seniority."""
    return {p.peer_id: p.joined_at for p in (view.peers if view is not None else ())}


def seniority_key(joined: Mapping[str, float]):
    """Sort key: earliest joined_at first (unknown peers last), then peer id."""
    return lambda pid: (joined.get(pid) or math.inf, pid)


def leader_order(peer_ids: Iterable[str], joined: Mapping[str, float] | None = None,
                 relayed: Collection[str] = ()) -> list[str]:
    """Replicas in the order a round picks its aggregator: the first reachable one, directly
    dialled replicas before relayed ones (every part of a round goes to the aggregator, and
    through a relay each byte crosses two links and the relay's loop), then most senior first
    (earliest joined_at in the view, then peer id; without seniorities, peer id order)."""
    senior = seniority_key(joined or {})
    return sorted(set(peer_ids), key=lambda pid: (pid in relayed, *senior(pid)))


def relayed(view: SwarmView | None) -> set[str]:
    """The peers the view marks as reached through a relay (coordinator/reach.py's verdict)."""
    return {p.peer_id for p in (view.peers if view is not None else ()) if p.reach == "relayed"}


def winning_hash(hashes: Mapping[str, str], joined: Mapping[str, float] | None = None) -> str:
    """Among replicas' state hashes (empty = unknown, not counted): the one most of them hold;
    on a tie, the one the most senior of them holds. "" when none is known."""
    known = {r: h for r, h in hashes.items() if h}
    if not known:
        return ""
    counts = Counter(known.values())
    best = max(counts.values())
    tied = [r for r, h in known.items() if counts[h] == best]
    return known[min(tied, key=seniority_key(joined or {}))]


def attested(view: SwarmView | None, stage: int) -> tuple[int, str]:
    """The (step, hash) the coordinator attests for `stage` (StageInfo.attested_step /
    attested_hash), or (0, "") while it attests none (or an older coordinator sends none)."""
    for s in view.stages if view is not None else ():
        if s.stage == stage:
            h = getattr(s, "attested_hash", "") or ""
            return (int(getattr(s, "attested_step", 0) or 0), h) if h else (0, "")
    return 0, ""


def vouched(view: SwarmView | None, stage: int, peer_id: str) -> bool:
    """Whether the coordinator's attestation of `stage` is `peer_id`'s own latest report, i.e.
    the replica it vouches for (in the majority, or the senior one on a tie). A stage that
    trains on is always ahead of its attestation (heartbeats trail it): a state newer than the
    attested step is taken only from such a replica."""
    at, h = attested(view, stage)
    p = view.peer(peer_id) if view is not None and h else None
    return p is not None and (p.stats.step, p.stats.state_hash) == (at, h)


def live_replicas(view: SwarmView | None, stage: int) -> list[str]:
    """The ready, unrevoked replicas of `stage`, in peer-id order (not one whose address a
    later joiner took: see `superseded`)."""
    if view is None:
        return []
    gone = superseded(view)
    return sorted(p.peer_id for p in view.replicas(stage)
                  if p.state in READY_STATES and p.peer_id not in view.revoked
                  and p.peer_id not in gone)


def superseded(view: SwarmView | None) -> set[str]:
    """Peers whose host:port a later joiner took (a respawn on the same machine): the old
    process is gone even while its lease runs, and a call to its address reaches the new peer,
    so it must neither lead a round nor be waited for."""
    latest: dict[str, tuple[float, str]] = {}
    for p in (view.peers if view is not None else ()):
        if p.address:
            key = (float(getattr(p, "joined_at", 0.0) or 0.0), p.peer_id)
            latest[p.address] = max(latest.get(p.address, key), key)
    return {p.peer_id for p in (view.peers if view is not None else ())
            if p.address and latest[p.address][1] != p.peer_id}


def address_of(view: SwarmView | None, peer_id: str) -> str:
    """Where `peer_id` is reached, from the swarm view; KeyError when it is not in the view."""
    p = view.peer(peer_id) if view is not None else None
    if p is None:
        raise KeyError(f"peer {peer_id[:8]} is not in the swarm view")
    return p.address


def departed_peers(view: SwarmView | None) -> set[str]:
    """Peers the view says are gone or going (not ready, not syncing; revoked; superseded)."""
    if view is None:
        return set()
    gone = {p.peer_id for p in view.peers if p.state not in (*READY_STATES, "syncing")}
    return gone | set(view.revoked) | superseded(view)


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
    (why says why; `step`, when set, is the step it is behind of: it may catch up by replaying
    the rounds up to it), or `adopt` the swarm's `step` with its own weights."""

    action: str  # "download" or "adopt"
    why: str = ""
    step: int = 0


def differing_hash(view: SwarmView, me: str, stage: int, step: int, state_hash: str
                   ) -> Verdict | None:
    """Replicas at the same step must hash equal; the one whose hash is not the right one
    yields (re-downloads). The heartbeat check of a ready replica after `step` with
    `state_hash`. When the coordinator attests a hash for the stage, a replica yields only when
    its own hash at the attested step differs from it (at another step it is not judged here;
    the sync rounds compare the replicas of each round). Without any attestation (an older
    coordinator), the majority of the replicas at this step (this one included) is right, a
    tie going to the most senior (`winning_hash`)."""
    at_step, attested_hash = attested(view, stage)
    if attested_hash:  # yield only when this replica's hash at the attested step differs
        if at_step == step and state_hash != attested_hash:
            return Verdict("download", f"state hash at step {step} differs from the one the "
                                       f"coordinator attests ({attested_hash[:12]})")
        return None
    peers = [p for p in view.replicas(stage)
             if p.state in READY_STATES and p.stats.step == step
             and p.stats.state_hash and p.peer_id != me]
    if not any(p.stats.state_hash != state_hash for p in peers):
        return None
    hashes = {p.peer_id: p.stats.state_hash for p in peers}
    hashes[me] = state_hash
    right = winning_hash(hashes, joined_at(view))
    if right != state_hash:
        holder = next(p.peer_id for p in peers if p.stats.state_hash == right)
        return Verdict("download", f"state hash differs from {holder[:8]}'s at step {step}, "
                                   "which most replicas (or the most senior) hold")
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
                                   f"this replica after step {step}", step=ahead[0].stats.step)
    # No replica of this stage is newer, but the other stages are steps ahead (the newer
    # replicas of this stage died): no download can help, and every caller refuses this step,
    # so the swarm would stall. Carry on at the swarm's step with these weights (only where the
    # sync mode allows a fast-forward: SPSA's replicas must replay the ledger's codes instead).
    newest = max((p.stats.step for p in view.peers if p.state in READY_STATES
                  and p.stage != stage), default=0)
    if newest >= step + 2 and fast_forwards:
        return Verdict("adopt", step=newest)
    return None


def behind_the_attestation(view: SwarmView, stage: int, step: int) -> Verdict | None:
    """The heartbeat check of a ready replica whose step has not moved for a couple of
    heartbeats: when the coordinator attests a later step for the stage (the majority of its
    replicas reported it, so it trails the truth and is no reporting race), this replica missed
    a round for good. Nothing else would tell it once the swarm has stopped stepping: no
    EndStep comes that it could refuse, and `behind_the_swarm` waits for a lag of two steps."""
    at_step, attested_hash = attested(view, stage)
    if attested_hash and at_step > step:
        return Verdict("download", f"the coordinator attests step {at_step} for the stage, this "
                                   f"replica is after step {step}", step=at_step)
    return None


def may_fast_forward(view: SwarmView, me: str, stage: int, step: int, state_hash: str) -> bool:
    """Whether a replica after `step` may adopt a later step without applying the ones between:
    exact when no other holder of the stage is ahead of it or differs from it (same step and
    state hash in the view), since then no replica applied those steps."""
    others = [p for p in view.replicas(stage)
              if p.peer_id != me and p.state not in ("lost", "left")]
    return not any(p.state not in READY_STATES or p.stats.step > step
                   or p.stats.state_hash != state_hash for p in others)
