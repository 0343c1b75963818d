"""SkipPipe paths: the rules every plan obeys, and the types a plan is made of (ALGORITHMS.md §2).

The planner that makes them is peer/pipeline/planner.py. A stage-0 peer calls its
`plan_iteration` once per iteration for its own microbatches, with the compute and link times it
has measured. Every plan obeys, for every microbatch path:

1. stage 0 starts and ends every path, so the planner deals only in block stages 1..S; each block
   stage appears at most once; every path of an iteration has the same length,
   `path_length(S, live, skip_ratio)`: S - floor(skip_ratio * S + 0.5) stages (round half up),
   at least 1. skip_ratio = 0 gives every stage in order, no swaps: plain SWARM.
2. over the iteration every live block stage is visited by an equal share of the microbatches,
   as equal as integers allow (max - min <= 1): each microbatch takes the least-visited stages,
   and only the choice among equally visited ones is left to timing.
3. the order is ascending except for at most `max_swaps` disjoint swaps of two neighbours in the
   path whose stage indices differ by exactly 1 (…, s+1, s, …).
4. no replica holds more than `max_held` activations at any planned instant (from a
   microbatch's forward arrival to the end of its backward there) and none computes two things
   at once. Collision avoidance: each hop goes to the replica, and each microbatch to the stage
   set and order, that finishes soonest given everything already planned; what cannot be
   avoided waits in the plan, in the replica's queue for compute or upstream for memory.
   (Stage 0 is not bound by max_held: it is the data source and holds its own microbatches.)
5. every `full_depth_every`-th iteration (iteration % N == 0) visits every live stage in order.

Empty stages (no live replica) are bypassed: they are left out of every path and listed in
`Path.bypassed`. Training never stops: when fewer live stages remain than the path length asks,
every path visits every live stage (more skipping than skip_ratio asks); with no live stage,
paths are empty and stage 0 trains its embedding and head alone.

CheckFree+ (option): odd microbatches run with stages 1 and 2 swapped and with S-1 and S swapped,
when both stages of a pair are on the path (`checkfree_swap_pairs`, from optim/checkfree.py); the
planner then adds no swaps of its own, so exactly the odd microbatches are swapped. At S = 3 the
two pairs (1, 2) and (2, 3) share stage 2 and cannot both swap in one path, so the odd microbatches
alternate: (1, 2) on microbatches 1, 5, 9, … and (2, 3) on 3, 7, 11, …. Each edge stage then runs
at stage 2's place on a quarter of the microbatches, which is what lets it stand in (the paper's
rule: an edge stage is replaced by its swap partner, `checkfree_stand_ins`); swapping (1, 2) alone,
as before, never trained stage 2 to stand in for stage 3. At S = 2 the one pair (1, 2) swaps on
every odd one.

Time model (the paper's): a forward on a replica takes its measured `forward_s`, a backward
1.5 x that; a link costs latency + bytes/bandwidth (both ends' latencies and the slower end's
bandwidth, unless a measured `Link` for the pair is given; links are not shared, so there is no
contention model, as in the paper's emulation); the head and loss at stage 0 take 2.5 x the
stage-0 peer's `forward_s` (forward + backward). Times are seconds from the start of the
iteration. The planner is greedy list scheduling: microbatches in index order, each taking
the (stage set, order, replicas) with the earliest planned finish among a bounded candidate set,
given everything already planned (about a second for 256 microbatches over 24 stages of 8
replicas); `collision_avoidance=False` is the network-blind baseline (random balanced stage
sets, round-robin replicas, same timeline and memory rule).

Why it runs on the stage-0 peers: they own the microbatches, they are where a path starts and
ends, and they measure the times a plan needs (call durations, link latencies) as they go. The
coordinator never carries tensors and sees only heartbeats; planning there would add a round
trip per iteration and a single point of failure for no information gain.

What it cannot guarantee across several stage-0 replicas: each plans its own microbatches on its
own view, so the per-replica memory bound and the collision avoidance hold only for one stage-0
peer's traffic (feed `ReplicaTiming.ready_at` from measured queues to account for the others),
and the equal share holds per stage-0 peer, so across k of them the visit counts of an iteration
differ by at most k. At run time the driver sends each hop to the plan's replica (with
skip_ratio > 0; the plain SWARM pipeline keeps choosing replicas as it goes) unless that one
is banned or fails, and the SWARM router (peer/pipeline/router.py) resends a failed or timed-out
hop to another replica of the same stage. The times come from peer/pipeline/links.py: compute
and queue from the replicas' replies, latency from EndStep round trips, bandwidth from what is
left of a call's network time; the activation size from the run spec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from optim.checkfree import checkfree_stand_ins, checkfree_swap_pairs

__all__ = ["checkfree_stand_ins", "checkfree_swap_pairs"]  # the rule lives in optim/checkfree.py

BACKWARD_FACTOR = 1.5
LOSS_FACTOR = 2.5  # forward + backward of head and loss at stage 0


class PlanError(ValueError):
    """The planner's inputs are inconsistent; the message names the bad argument."""


@dataclass(frozen=True)
class ReplicaTiming:
    """Measured numbers for one replica (or for the planning stage-0 peer itself)."""

    peer_id: str
    forward_s: float  # forward compute time of one microbatch here
    latency_s: float = 0.0  # one-way latency of this peer's link (half its round trip)
    bandwidth_Bps: float = math.inf  # bytes/second of this peer's link
    ready_at: float = 0.0  # busy with other work until then (queue x forward_s, router ETA)


@dataclass(frozen=True)
class Link:
    """A measured link between two peers, overriding the per-peer model."""

    latency_s: float
    bandwidth_Bps: float


@dataclass(frozen=True)
class Hop:
    """One stage visit of a microbatch and its planned timeline on the chosen replica."""

    stage: int
    peer_id: str
    forward_arrival: float
    forward_start: float
    forward_end: float
    backward_arrival: float
    backward_start: float
    backward_end: float


@dataclass(frozen=True)
class Path:
    """One microbatch's route over block stages (stage 0 implied at both ends) and timeline."""

    microbatch: int
    hops: tuple[Hop, ...]
    release: float  # stage 0 sends the activation to the first hop
    loss_start: float
    loss_end: float
    finish: float  # the first hop's gradient is back at stage 0
    swaps: int
    full_depth: bool
    bypassed: tuple[int, ...] = ()  # block stages left out: no live replica

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(h.stage for h in self.hops)

    @property
    def route(self) -> tuple[tuple[int, str], ...]:
        return tuple((h.stage, h.peer_id) for h in self.hops)


def path_length(n_stages: int, n_live: int, skip_ratio: float) -> int:
    """Block stages per path: S - round_half_up(skip_ratio * S), at least 1, at most n_live."""
    if n_stages == 0:
        return 0
    target = max(1, n_stages - math.floor(skip_ratio * n_stages + 0.5))
    return min(target, n_live)


def is_full_depth(iteration: int, full_depth_every: int | None) -> bool:
    """Iterations 0, N, 2N, … visit every live stage (None: never forced)."""
    return full_depth_every is not None and iteration % full_depth_every == 0


def makespan(paths: Sequence[Path]) -> float:
    """Planned iteration time: the last finish (0 for no paths)."""
    return max((p.finish for p in paths), default=0.0)


def count_swaps(stages: Sequence[int]) -> int | None:
    """Number of adjacent swaps that turn the sorted stages into `stages`, or None if `stages`
    is not the sorted order with disjoint (s+1, s) neighbour swaps applied."""
    ordered = sorted(stages)
    swaps, i = 0, 0
    while i < len(stages):
        if stages[i] == ordered[i]:
            i += 1
        elif (i + 1 < len(stages) and stages[i] == ordered[i + 1]
              and stages[i + 1] == ordered[i] and ordered[i + 1] == ordered[i] + 1):
            swaps, i = swaps + 1, i + 2
        else:
            return None
    return swaps


def apply_checkfree_swaps(order: Sequence[int], n_stages: int, microbatch: int,
                          max_swaps: int) -> tuple[tuple[int, ...], int]:
    """`order` (ascending block stages) with `microbatch`'s CheckFree+ pairs swapped where both
    stages of a pair are on it, at most `max_swaps` of them; returns (order, swaps)."""
    seq, swaps = list(order), 0
    for a, b in checkfree_swap_pairs(n_stages, microbatch)[:max_swaps]:
        if a in seq and b in seq and seq.index(b) == seq.index(a) + 1:
            i = seq.index(a)
            seq[i], seq[i + 1] = b, a
            swaps += 1
    return tuple(seq), swaps
