"""SWARM replica choice: which replica of the next stage gets a microbatch.

A sending peer (stage 0, or any stage forwarding to the next hop) keeps one `Router`. For every
replica of every stage it knows about, the router holds two measured numbers:

- a *throughput estimate*: an exponential moving average (alpha 0.1) of measured samples/second,
  measured around the whole call (network and the replica's queue included), seeded from the
  self-benchmark the peer reported when it joined;
- an *expected finish time*: when the work this sender has handed to the replica should be done.

`choose` sends to the replica with the smallest expected finish time and then adds
`work / throughput` to it (SWARM's interleaved weighted round-robin: over time each replica gets
work in proportion to its measured speed). Ties break at random through an injected
`random.Random`; a replica that has never been used, or has nothing outstanding, is "free now",
so a new replica is tried at once.

Relayed replicas (the view's `reach`): when replicas are compared, a relayed one's expected
finish is moved later by `relay_factor - 1` (1) times the estimated duration of the call being
placed there; its booking stays the measured one. Every byte to it crosses two links (the
caller's to the relay, the relay's to it) and the relay's one event loop, which every other
relayed peer shares, while this sender's estimate sees only its own share of that. So a direct
replica is preferred while it is free or nearly so, and a relayed one still takes the work a
busy direct one cannot (Petals penalizes relayed servers in its routing for the same reason).

Invariants:
- expected finish time = now + (work outstanding at the replica) / throughput, re-anchored on
  every completion, timeout and ban, so the estimate never drifts away from what was measured;
- a banned replica is never chosen before its ban ends; an excluded one never in that call;
- the router reads no clock and does no I/O: time is always passed in (`now=`), so the policy is a
  pure function of measured numbers and the tests are deterministic.

Units: `work` is in forward-sample equivalents. A stateless backward (the replica recomputes its
forward, as SWARM's servers do) costs `BACKWARD_WORK_FACTOR` = 2.5 forward samples per sample
(1 recompute + 1.5 backward); a backward that reuses stored activations costs 1.5.

Failures (SWARM §1): a call that times out is resent by the caller to the next-best replica
(`choose(..., exclude={peer})`) and the slow replica is *not* banned, only measured as slow; any
other error bans the replica until its lease expires (`ban(peer, until)`).

A replica whose last call timed out, and that has completed none since, is *suspect*: it gets
one call at a time (a probe) until one completes. Without that, a replica that froze, or whose
link was cut, took every microbatch of the next step and cost each of them a timeout before it
went elsewhere (or around its stage): in bench.churn, steps of 4-7 s instead of 1-2 s. A replica
that is only slow completes its probe and is back to its share, measured slower.

Timeouts adapt to measured speed instead of SWARM's fixed 30 s forward / 75 s backward:
`timeout = clamp(factor * expected duration, floor, ceiling)`, where the expected duration is the
work this sender has outstanding at the replica (this call included) divided by its throughput
estimate. The floors (5 s forward, 12.5 s backward, the reference's 2.5 ratio) protect against
an optimistic estimate right after join; the reference's fixed values are what a replica whose
expected forward takes 7.5 s gets with the default factor of 4. Once a replica completed
`measured_after` (3) calls for this sender its estimate is measured, and the floors drop to 1 s
and 2.5 s: a frozen or cut-off replica then costs a microbatch about that, not 5 or 12.5 s (a
backward cannot go elsewhere: the replica holds its graph). A timeout lowers the estimate, so a
replica that is only slow gets a longer timeout next time.

`RoundRobinRouter` has the same interface and bookkeeping but ignores the estimates when it
chooses: it is the baseline the benchmarks compare `Router` against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

EMA_ALPHA = 0.1
BACKWARD_WORK_FACTOR = 2.5
RELAY_FACTOR = 2.0
_MIN_SECONDS = 1e-6


class NoReplicaAvailable(LookupError):
    """Every replica of the stage is banned, excluded or unknown: the caller must wait for a new
    swarm view (`update_replicas`) or bypass the stage (peer/pipeline/paths.py plans around empty
    stages)."""


@dataclass(frozen=True)
class TimeoutPolicy:
    """How long a call may take before the caller gives up and resends it.

    timeout = min(ceiling_s, max(floor, factor * expected_seconds)); floor is
    `forward_floor_s` or `backward_floor_s`.
    """

    factor: float = 4.0
    forward_floor_s: float = 5.0
    backward_floor_s: float = 12.5
    ceiling_s: float = 600.0
    # once a replica completed `measured_after` calls for this sender, its estimate is a
    # measurement, not a guess: the floors drop to these (same 2.5 ratio; never above the floors)
    measured_after: int = 3
    measured_forward_floor_s: float = 1.0
    measured_backward_floor_s: float = 2.5

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"TimeoutPolicy.factor={self.factor} must be >= 1 (a multiple of "
                             "the expected duration)")
        if not 0.0 < self.forward_floor_s <= self.ceiling_s:
            raise ValueError("TimeoutPolicy needs 0 < forward_floor_s <= ceiling_s")
        if not 0.0 < self.backward_floor_s <= self.ceiling_s:
            raise ValueError("TimeoutPolicy needs 0 < backward_floor_s <= ceiling_s")
        if not (self.measured_forward_floor_s > 0.0 and self.measured_backward_floor_s > 0.0):
            raise ValueError("TimeoutPolicy needs measured floors > 0")


@dataclass
class ReplicaEstimate:
    """What one sender knows about one replica. Mutated only by its `Router`."""

    peer_id: str
    stage: int
    throughput: float
    """EMA of measured samples/second (seeded from the join self-benchmark)."""
    expected_finish: float = -math.inf
    """Absolute time the work outstanding here should be done; <= now means free now."""
    outstanding: float = 0.0
    """Work (forward-sample equivalents) sent and not yet completed, timed out or failed."""
    last_completion: float = -math.inf
    calls: int = 0
    timeouts: int = 0
    completions: int = 0
    suspect: bool = False
    """Its last call timed out and none completed since: one call at a time (module docstring)."""


def _check_positive(name: str, value: float) -> None:
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name}={value!r} must be a positive finite number")


class Router:
    """Earliest-expected-finish replica choice with a throughput EMA per replica (SWARM §1).

    Args:
        rng: the only source of randomness (tie-breaking); seed it for reproducible runs.
        alpha: EMA weight of a new measurement.
        timeouts: the adaptive timeout policy.
        relay_factor: how many times its estimate a call to a relayed replica is charged when
            replicas are compared (>= 1; 1 = no preference for direct paths).
    """

    def __init__(self, rng: random.Random, alpha: float = EMA_ALPHA,
                 timeouts: TimeoutPolicy | None = None,
                 relay_factor: float = RELAY_FACTOR) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in (0, 1]")
        if not (relay_factor >= 1.0 and math.isfinite(relay_factor)):
            raise ValueError(f"relay_factor={relay_factor} must be a finite number >= 1")
        self._relay_factor = relay_factor
        self._relayed: set[str] = set()
        self._rng = rng
        self._alpha = alpha
        self._timeouts = timeouts or TimeoutPolicy()
        self._replicas: dict[str, ReplicaEstimate] = {}
        self._stages: dict[int, list[str]] = {}
        self._banned_until: dict[str, float] = {}

    # -- the swarm view -------------------------------------------------------------------

    def update_replicas(self, stage: int, seeds: Mapping[str, float],
                        relayed: Collection[str] = ()) -> None:
        """Replace the replica set of `stage` with the keys of `seeds` (peer id -> self-benchmark
        throughput in samples/s); those in `relayed` are reached through a relay. Known replicas
        keep their measurements; new ones start free now with the seed as their estimate;
        replicas no longer listed are forgotten. A peer serves one stage: a peer listed under a
        new stage is re-seeded there (new work, new speed)."""
        for peer_id, seed in seeds.items():
            _check_positive(f"seed throughput of {peer_id}", seed)
        for peer_id in self._stages.get(stage, []):
            self._relayed.discard(peer_id)
            if peer_id not in seeds:
                del self._replicas[peer_id]
        self._relayed |= set(relayed) & set(seeds)
        for peer_id, seed in seeds.items():
            known = self._replicas.get(peer_id)
            if known is not None and known.stage != stage:
                self._stages[known.stage].remove(peer_id)
                known = None
            if known is None:
                self._replicas[peer_id] = ReplicaEstimate(peer_id, stage, float(seed))
        self._stages[stage] = sorted(seeds)

    def replicas(self, stage: int) -> list[str]:
        """Peer ids of the replicas of `stage` in the current view, sorted."""
        return list(self._stages.get(stage, []))

    def estimate(self, peer_id: str) -> ReplicaEstimate:
        """A copy of what this router knows about `peer_id` (KeyError if not in the view)."""
        e = self._replicas[peer_id]
        return ReplicaEstimate(e.peer_id, e.stage, e.throughput, e.expected_finish,
                               e.outstanding, e.last_completion, e.calls, e.timeouts,
                               e.completions, e.suspect)

    def banned_until(self, peer_id: str) -> float:
        """End of the peer's ban, or -inf if it was never banned."""
        return self._banned_until.get(peer_id, -math.inf)

    # -- choosing -------------------------------------------------------------------------

    def choose(self, stage: int, work_samples: float, now: float,
               exclude: Collection[str] = (), prefer: str | None = None) -> str:
        """Pick the replica of `stage` for `work_samples` of work sent at `now` and book the
        work on it: `prefer` (a SkipPipe plan's replica) when it is usable, else the policy's.
        Raises NoReplicaAvailable when every replica is banned, excluded, or suspect with its
        probe still out."""
        _check_positive("work_samples", work_samples)
        candidates = [p for p in self._stages.get(stage, [])
                      if p not in exclude and self._banned_until.get(p, -math.inf) <= now
                      and not self._probing(p)]
        if not candidates:
            known = self._stages.get(stage, [])
            banned = [p for p in known if self._banned_until.get(p, -math.inf) > now]
            probing = [p for p in known if self._probing(p)]
            raise NoReplicaAvailable(
                f"stage {stage} has no usable replica at t={now:.3f}: {len(known)} in view, "
                f"{len(banned)} banned, {len([p for p in known if p in exclude])} excluded, "
                f"{len(probing)} timed out with a probe call still out; "
                "refresh the swarm view or bypass the stage")
        peer_id = (prefer if prefer in candidates
                   else self._pick(stage, candidates, now, work_samples))
        e = self._replicas[peer_id]
        e.outstanding += work_samples
        e.expected_finish = max(e.expected_finish, now) + work_samples / e.throughput
        e.calls += 1
        return peer_id

    def _probing(self, peer_id: str) -> bool:
        """Suspect (its last call timed out) with a call to it still out."""
        e = self._replicas.get(peer_id)
        return e is not None and e.suspect and e.outstanding > 0.0

    def is_relayed(self, peer_id: str) -> bool:
        """Whether the view said `peer_id` is reached through a relay."""
        return peer_id in self._relayed

    def _pick(self, stage: int, candidates: list[str], now: float, work: float) -> str:
        """Smallest expected finish time (anything <= now counts as now), a relayed replica
        charged `relay_factor - 1` times this call's estimated duration on top; random among
        ties."""
        extra = self._relay_factor - 1.0
        finish = {p: max(self._replicas[p].expected_finish, now)
                  + (extra * work / self._replicas[p].throughput if p in self._relayed else 0.0)
                  for p in candidates}
        best = min(finish.values())
        tied = [p for p in candidates if finish[p] <= best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    # -- outcomes -------------------------------------------------------------------------

    def record(self, peer_id: str, samples: float, seconds: float, now: float) -> None:
        """A call of `samples` work to `peer_id` completed at `now` after `seconds`.

        The measured throughput is samples over the time the replica spent on this call for us:
        when our calls overlap, that is the time since our previous completion there (hivemind's
        trick: concurrent calls measure throughput, not latency); two completions at the same
        instant carry no timing for the second, so only its work is released. A late reply from
        a replica that has left the view is ignored."""
        _check_positive("samples", samples)
        if seconds < 0.0:
            raise ValueError(f"seconds={seconds} is negative: pass the call's wall time")
        e = self._replicas.get(peer_id)
        if e is None:
            return
        busy = min(seconds, now - e.last_completion)
        if busy > 0.0:
            self._measure(e, samples, busy)
        e.last_completion = now
        e.completions += 1
        e.suspect = False
        self._release(e, samples, now)

    def on_timeout(self, peer_id: str, samples: float, seconds: float, now: float) -> None:
        """A call of `samples` work to `peer_id` gave up at `now` after waiting `seconds`; the
        caller resends it with `choose(stage, samples, now, exclude={peer_id})`. The replica is
        not banned (slow is not broken), but the wait counts as a measurement of samples/seconds
        (an upper bound on its real speed): its estimate drops, so it gets less work and a
        longer timeout next time, and it is suspect: one call at a time until one completes."""
        _check_positive("samples", samples)
        _check_positive("seconds", seconds)
        e = self._replicas.get(peer_id)
        if e is None:
            return
        self._measure(e, samples, seconds)
        e.timeouts += 1
        e.suspect = True
        self._release(e, samples, now)

    def abandon(self, peer_id: str, samples: float, now: float) -> None:
        """A call of `samples` work to `peer_id` was given up at `now` for a reason of the
        caller's (it was stopped while the call was out): the work is released, nothing is
        measured, the replica is not suspect."""
        _check_positive("samples", samples)
        e = self._replicas.get(peer_id)
        if e is not None:
            self._release(e, samples, now)

    def ban(self, peer_id: str, until: float) -> None:
        """Any error other than a timeout: skip `peer_id` until `until` (its lease expiry). Work
        outstanding there is written off; the caller resends it elsewhere."""
        self._banned_until[peer_id] = max(self._banned_until.get(peer_id, -math.inf), until)
        e = self._replicas.get(peer_id)
        if e is not None:
            e.outstanding = 0.0
            e.expected_finish = -math.inf

    def timeout_for(self, peer_id: str, work_samples: float, backward: bool = False) -> float:
        """Seconds to wait for a call of `work_samples` to `peer_id` (see the module docstring).
        Call it after `choose`, so this call's own work is part of the outstanding work."""
        _check_positive("work_samples", work_samples)
        policy = self._timeouts
        floor = policy.backward_floor_s if backward else policy.forward_floor_s
        e = self._replicas.get(peer_id)
        if e is None:
            return floor
        if e.completions >= policy.measured_after:
            floor = min(floor, policy.measured_backward_floor_s if backward
                        else policy.measured_forward_floor_s)
        expected = max(work_samples, e.outstanding) / e.throughput
        return min(policy.ceiling_s, max(floor, policy.factor * expected))

    def planning_timing(self, peer_id: str, samples: float, now: float) -> tuple[float, float]:
        """What the SkipPipe planner (peer/pipeline/paths.py) needs of a replica, from the
        measurements: (seconds one forward of `samples` takes there, seconds from `now` until the
        work this sender already has outstanding there should be done). The throughput EMA mixes
        forward and backward calls, so the first figure is a whole-call estimate, which is what the
        planner compares replicas and stage sets by."""
        _check_positive("samples", samples)
        e = self._replicas[peer_id]
        return samples / e.throughput, max(0.0, e.expected_finish - now)

    def usable(self, stage: int, now: float) -> list[str]:
        """Replicas of `stage` in the view that are not banned at `now`."""
        return [p for p in self._stages.get(stage, [])
                if self._banned_until.get(p, -math.inf) <= now]

    # -- internals ------------------------------------------------------------------------

    def _measure(self, e: ReplicaEstimate, samples: float, seconds: float) -> None:
        measured = samples / max(seconds, _MIN_SECONDS)
        e.throughput = (1.0 - self._alpha) * e.throughput + self._alpha * measured

    def _release(self, e: ReplicaEstimate, samples: float, now: float) -> None:
        e.outstanding = max(0.0, e.outstanding - samples)
        e.expected_finish = now + e.outstanding / e.throughput if e.outstanding else -math.inf


class RoundRobinRouter(Router):
    """Baseline: cycles through the usable replicas of a stage in peer-id order, blind to speed.
    Bookkeeping (estimates, timeouts, bans) is the same as `Router`'s."""

    def __init__(self, rng: random.Random, alpha: float = EMA_ALPHA,
                 timeouts: TimeoutPolicy | None = None,
                 relay_factor: float = RELAY_FACTOR) -> None:
        super().__init__(rng, alpha, timeouts, relay_factor)
        self._turn: dict[int, int] = {}

    def _pick(self, stage: int, candidates: list[str], now: float, work: float) -> str:
        turn = self._turn.get(stage, 0)
        self._turn[stage] = turn + 1
        return candidates[turn % len(candidates)]
