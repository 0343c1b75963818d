"""The SkipPipe planner (online, greedy list scheduling): which block stages each microbatch
visits, in which order, on which replica, and when.

The rules every plan obeys, the time model and why it runs on the stage-0 peers are in
peer/pipeline/paths.py's docstring, beside the types (`Path`, `Hop`, `ReplicaTiming`, `Link`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from peer.pipeline.paths import (
    BACKWARD_FACTOR,
    LOSS_FACTOR,
    Hop,
    Link,
    Path,
    PlanError,
    ReplicaTiming,
    apply_checkfree_swaps,
    is_full_depth,
    path_length,
)


@dataclass
class _Calendar:
    """Busy intervals [start, end) of one peer, sorted and disjoint."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)

    def fit(self, t: float, duration: float) -> float:
        """Earliest start >= t of a free gap of `duration`."""
        i = bisect.bisect_right(self.ends, t)
        while i < len(self.starts) and self.starts[i] < t + duration:
            t = max(t, self.ends[i])
            i += 1
        return t

    def add(self, start: float, end: float) -> None:
        if end > start:
            i = bisect.bisect_left(self.starts, start)
            self.starts.insert(i, start)
            self.ends.insert(i, end)


def _saturated_until(holds: list[tuple[float, float]], max_held: int) -> float:
    """End of the last instant at which `max_held` or more of the half-open `holds` overlap
    (-inf if never): from then on one more activation always fits."""
    until, live = -math.inf, 0
    for x, delta in sorted([(a, 1) for a, _ in holds] + [(b, -1) for _, b in holds]):
        live += delta
        if delta < 0 and live == max_held - 1:
            until = x
    return until


class _Planner:
    """State of one `plan_iteration` call: per peer, a compute calendar, the activations it
    holds, and the time from which it always has room for one more (`room_from`). A hop never
    arrives before `room_from`: the microbatch waits upstream instead, which costs the upstream
    replicas nothing, since they hold it until its backward anyway. That keeps the memory rule
    exact without search (it forgoes squeezing into a gap between two full periods)."""

    def __init__(self, stages: Mapping[int, list[ReplicaTiming]], origin: ReplicaTiming,
                 activation_bytes: float, links: Mapping[tuple[str, str], Link],
                 max_held: int, aware: bool) -> None:
        self.stages, self.origin, self.links = stages, origin, links
        self.nbytes, self.max_held, self.aware = activation_bytes, max_held, aware
        self.cal = {r.peer_id: _Calendar() for rs in stages.values() for r in rs}
        self.cal[origin.peer_id] = _Calendar()
        for r in [origin, *(r for rs in stages.values() for r in rs)]:
            self.cal[r.peer_id].add(0.0, r.ready_at)
        self.holds: dict[str, list[tuple[float, float]]] = {p: [] for p in self.cal}
        self.room_from = dict.fromkeys(self.cal, -math.inf)
        self.turn = dict.fromkeys(stages, 0)

    def link(self, a: ReplicaTiming, b: ReplicaTiming) -> float:
        known = self.links.get((a.peer_id, b.peer_id))
        if known is not None:
            return known.latency_s + (self.nbytes / known.bandwidth_Bps if self.nbytes else 0.0)
        bw = min(a.bandwidth_Bps, b.bandwidth_Bps)
        return a.latency_s + b.latency_s + (self.nbytes / bw if self.nbytes else 0.0)

    def _arrival(self, prev: ReplicaTiming, r: ReplicaTiming, t: float) -> float:
        return max(t + self.link(prev, r), self.room_from[r.peer_id])

    def _replica(self, stage: int, prev: ReplicaTiming, t: float) -> ReplicaTiming:
        replicas = self.stages[stage]
        if not self.aware:
            return replicas[self.turn[stage] % len(replicas)]

        def forward_end(r: ReplicaTiming) -> float:
            return self.cal[r.peer_id].fit(self._arrival(prev, r, t), r.forward_s) + r.forward_s

        return min(replicas, key=forward_end)

    def trial(self, order: tuple[int, ...], swaps: int) -> Path:
        """The route for `order` with the replica that finishes each forward first (microbatch
        number, full_depth and bypassed are filled in by the caller)."""
        chosen: list[ReplicaTiming] = []
        fwd: list[tuple[float, float, float]] = []
        prev, t = self.origin, 0.0
        for stage in order:
            r = self._replica(stage, prev, t)
            arrival = self._arrival(prev, r, t)
            start = self.cal[r.peer_id].fit(arrival, r.forward_s)
            chosen.append(r)
            fwd.append((arrival, start, start + r.forward_s))
            prev, t = r, start + r.forward_s
        release = fwd[0][0] - self.link(self.origin, chosen[0]) if chosen else 0.0
        loss_d = LOSS_FACTOR * self.origin.forward_s
        loss_start = self.cal[self.origin.peer_id].fit(t + self.link(prev, self.origin), loss_d)
        t, nxt = loss_start + loss_d, self.origin
        hops: list[Hop] = []
        for stage, r, (fa, fs, fe) in reversed(list(zip(order, chosen, fwd, strict=True))):
            arrival = t + self.link(nxt, r)
            duration = BACKWARD_FACTOR * r.forward_s
            start = self.cal[r.peer_id].fit(arrival, duration)
            hops.append(Hop(stage, r.peer_id, fa, fs, fe, arrival, start, start + duration))
            t, nxt = start + duration, r
        hops.reverse()
        finish = t + self.link(nxt, self.origin)
        return Path(-1, tuple(hops), release, loss_start, loss_start + loss_d, finish, swaps,
                    full_depth=False)

    def commit(self, trial: Path) -> None:
        self.cal[self.origin.peer_id].add(trial.loss_start, trial.loss_end)
        for h in trial.hops:
            self.cal[h.peer_id].add(h.forward_start, h.forward_end)
            self.cal[h.peer_id].add(h.backward_start, h.backward_end)
            if h.backward_end > h.forward_arrival:
                self.holds[h.peer_id].append((h.forward_arrival, h.backward_end))
                self.room_from[h.peer_id] = _saturated_until(self.holds[h.peer_id],
                                                             self.max_held)
            self.turn[h.stage] += 1

    def busy(self, replicas: list[ReplicaTiming]) -> float:
        """Planned compute seconds per replica of a stage: how congested it is so far."""
        cals = [self.cal[r.peer_id] for r in replicas]
        return sum(sum(c.ends) - sum(c.starts) for c in cals) / len(replicas)


def _stage_sets(counts: dict[int, int], length: int, budget: int, rng: random.Random,
                load: Mapping[int, float]) -> list[tuple[int, ...]]:
    """Candidate stage sets that keep the visit counts within 1 of each other (rule 2)."""
    low_count = min(counts.values())
    low = [s for s in sorted(counts) if counts[s] == low_count]
    if len(low) >= length:
        must, pool, k = [], low, length
    else:
        must, pool, k = low, [s for s in sorted(counts) if counts[s] > low_count], length - len(low)
    if math.comb(len(pool), k) <= budget:
        picks = [list(c) for c in itertools.combinations(pool, k)]
        rng.shuffle(picks)
    else:
        quiet = sorted(pool, key=lambda s: (load[s], rng.random()))[:k]
        picks, seen = [quiet], {frozenset(quiet)}
        for _ in range(4 * budget):
            if len(picks) >= budget:
                break
            pick = rng.sample(pool, k)
            if frozenset(pick) not in seen:
                seen.add(frozenset(pick))
                picks.append(pick)
    return [tuple(sorted(must + p)) for p in picks]


def _swap_variants(order: tuple[int, ...], max_swaps: int, budget: int,
                   rng: random.Random) -> list[tuple[tuple[int, ...], int]]:
    """Orders with 1..max_swaps disjoint (s+1, s) neighbour swaps (rule 3)."""
    spots = [i for i in range(len(order) - 1) if order[i + 1] == order[i] + 1]
    variants = []
    for n in range(1, max_swaps + 1):
        for combo in itertools.combinations(spots, n):
            if all(b - a >= 2 for a, b in itertools.pairwise(combo)):
                variants.append(combo)
    if len(variants) > budget:
        variants = rng.sample(variants, budget)
    out = []
    for combo in variants:
        seq = list(order)
        for i in combo:
            seq[i], seq[i + 1] = seq[i + 1], seq[i]
        out.append((tuple(seq), len(combo)))
    return out


def _validate(n_microbatches: int, stages: Mapping[int, list[ReplicaTiming]],
              origin: ReplicaTiming, links: Mapping[tuple[str, str], Link], skip_ratio: float,
              full_depth_every: int | None, max_swaps: int, max_held: int,
              candidates: int) -> None:
    if n_microbatches < 0:
        raise PlanError(f"n_microbatches={n_microbatches} must be >= 0")
    if set(stages) != set(range(1, len(stages) + 1)):
        raise PlanError(f"stages must be keyed 1..S (block stages; stage 0 is the planner's own "
                        f"peer, pass it as origin=); got keys {sorted(stages)}")
    if not 0.0 <= skip_ratio < 1.0:
        raise PlanError(f"skip_ratio={skip_ratio} must be in [0, 1)")
    if full_depth_every is not None and full_depth_every < 1:
        raise PlanError(f"full_depth_every={full_depth_every} must be >= 1 or None")
    if max_swaps < 0 or max_held < 1 or candidates < 1:
        raise PlanError("need max_swaps >= 0, max_held >= 1 and candidates >= 1")
    ids = [r.peer_id for rs in stages.values() for r in rs]
    if len(ids) != len(set(ids)):
        raise PlanError("a peer id appears twice: a peer serves exactly one stage")
    for r in [origin, *(r for rs in stages.values() for r in rs)]:
        if not (0 <= r.forward_s < math.inf and 0 <= r.latency_s < math.inf
                and r.bandwidth_Bps > 0 and math.isfinite(r.ready_at)):
            raise PlanError(f"replica {r.peer_id}: need finite forward_s >= 0, latency_s >= 0 "
                            f"and ready_at, and bandwidth_Bps > 0; got {r}")
    for pair, link in links.items():
        if not (0 <= link.latency_s < math.inf and link.bandwidth_Bps > 0):
            raise PlanError(f"link {pair}: need finite latency_s >= 0 and bandwidth_Bps > 0")


def plan_iteration(iteration: int, n_microbatches: int,
                   stages: Mapping[int, list[ReplicaTiming]], skip_ratio: float,
                   rng: random.Random, full_depth_every: int | None = 10, max_swaps: int = 2,
                   max_held: int = 3, checkfree_plus: bool = False, *,
                   origin: ReplicaTiming | None = None, activation_bytes: float = 0.0,
                   links: Mapping[tuple[str, str], Link] | None = None,
                   collision_avoidance: bool = True, candidates: int = 16) -> list[Path]:
    """Plan one iteration of `n_microbatches` for the stage-0 peer `origin`.

    Args:
        stages: block stage 1..S -> its live replicas with measured timings (an empty list for a
            stage with none; it is bypassed).
        rng: the only source of randomness; the same seed and inputs give the same plan.
        origin: the planning stage-0 peer (its forward_s is its head + loss forward time).
        activation_bytes: size of one microbatch's activation (and of its gradient).
        links: measured (src, dst) links; other pairs use the per-peer model.
        collision_avoidance: False gives the network-blind baseline.
        candidates: bound on (stage set, order) candidates tried per microbatch.
    Returns one Path per microbatch, in microbatch order.
    """
    origin = origin or ReplicaTiming("stage0", 0.0)
    links = links or {}
    _validate(n_microbatches, stages, origin, links, skip_ratio, full_depth_every, max_swaps,
              max_held, candidates)
    n_stages = len(stages)
    live = {s: list(rs) for s, rs in sorted(stages.items()) if rs}
    bypassed = tuple(s for s in sorted(stages) if not stages[s])
    full = is_full_depth(iteration, full_depth_every) or skip_ratio == 0.0
    length = path_length(n_stages, len(live), 0.0 if full else skip_ratio)
    planner_swaps = 0 if (full or checkfree_plus or not collision_avoidance) else max_swaps
    planner = _Planner(live, origin, activation_bytes, links, max_held, collision_avoidance)
    counts = dict.fromkeys(live, 0)
    paths: list[Path] = []
    for mb in range(n_microbatches):
        if not live:
            orders = [((), 0)]
        elif collision_avoidance:
            load = {s: planner.busy(live[s]) for s in live}
            sets = _stage_sets(counts, length, max(1, candidates // 2), rng, load)
            orders = [(s, 0) for s in sets]
        else:
            orders = [(_stage_sets(counts, length, 1, rng, dict.fromkeys(live, 0.0))[0], 0)]
        if checkfree_plus and mb % 2 == 1:
            orders = [apply_checkfree_swaps(o, n_stages, mb, max_swaps) for o, _ in orders]
        trials = [planner.trial(o, n) for o, n in orders]
        if planner_swaps:
            base = min(trials, key=lambda t: t.finish)
            budget = max(0, candidates - len(orders))
            trials += [planner.trial(o, n)
                       for o, n in _swap_variants(base.stages, planner_swaps, budget, rng)]
        best = min(trials, key=lambda t: (t.finish, t.swaps))
        planner.commit(best)
        for s in best.stages:
            counts[s] += 1
        paths.append(replace(best, microbatch=mb, full_depth=full, bypassed=bypassed))
    return paths
