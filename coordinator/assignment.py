"""Stage assignment and rebalancing: where a joining peer goes, and when to move one.

Pure functions of the throughput numbers peers report in their heartbeats (samples/second each
replica served, measured; its join self-benchmark until it has served something), in the shape of
Petals' block_selection.py. The coordinator calls them; they do no I/O, read no clock and import
nothing beyond the standard library (coordinator/ never imports torch).

The quantity optimised is the swarm's bottleneck: a pipeline runs no faster than its weakest
stage, and a stage serves the sum of its replicas' throughputs (SWARM §1). A stage's *capacity* is
that sum divided by its `visit_share`, the fraction of microbatches that pass through it (1 for
stage 0 and for every stage of a plain SWARM pipeline; 1 - skip_ratio for block stages under
SkipPipe), so stages are compared by how many microbatches/second of the whole pipeline they can
carry.

- `assign_stage`: a joining peer goes to the stage that most needs throughput: an empty stage
  first, else the one with the least capacity, ties to the lowest index. Adding to the weakest
  stage is optimal for the bottleneck whatever the newcomer's speed, so its throughput only has
  to be valid.
- `plan_rebalance` (SWARM: every few minutes, `rebalance_due`): one peer moves from a stage that
  can spare it to the weakest stage, only if that raises the bottleneck by more than `min_gain`
  (relative; a move costs the peer a state download and its old stage a replica, and the EMA
  estimates are noisy, so tiny gains would make peers thrash) or fills an empty stage. Every
  stage with more than one replica is a possible donor; the move chosen is the one that leaves
  the best sorted capacity vector, which usually takes from the stage with the most spare
  throughput, but also avoids moving a peer so large that its old stage becomes the new
  bottleneck.

Invariants: a move never leaves a stage empty, so stage 0 always keeps a replica once it has one
(without stage 0 nothing drives microbatches). Stage 0 is otherwise counted like any stage: it
gets newcomers when it is the bottleneck and gives peers away when it has spare. An empty stage 0
is the first stage a joining peer fills (empty first, lowest index). Assumed: a peer serves any
stage at the throughput it was measured at on its current one (stages are equal slices); the
coordinator refreshes the number after the move.

Memory (coordinator/placement.py's memory part): a peer goes only to a stage its device has room
for (`allowed`), and a move only to a stage the moved peer fits (`fits`); among empty stages one
that no other live member fits goes first (`prefer`), so a roomy peer takes the stage only it
can hold and leaves the small stages to small peers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

REBALANCE_PERIOD_S = 300.0
DEFAULT_MIN_GAIN = 0.1
RELAY_FACTOR = 2.0  # a relayed byte crosses two links (peer/pipeline/router.py charges the same)
# A move must beat the bottleneck by this relative margin even with min_gain=0: sums of floats
# recomputed after a move differ in the last bits, and without a margin two peers can swap
# places forever over a gain of one ulp (Petals' block_selection keeps epsilons for the same).
_FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class StageLoad:
    """One stage as the coordinator sees it: its replicas' measured throughputs."""

    replicas: Mapping[str, float]  # peer id -> measured samples/second on this stage
    visit_share: float = 1.0  # fraction of microbatches that visit this stage

    def __post_init__(self) -> None:
        if not 0.0 < self.visit_share <= 1.0:
            raise ValueError(f"visit_share={self.visit_share} must be in (0, 1]")
        for peer_id, value in self.replicas.items():
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"throughput of {peer_id} is {value!r}; report a finite "
                                 "number >= 0 (samples/second)")

    @property
    def throughput(self) -> float:
        return sum(self.replicas.values())

    @property
    def capacity(self) -> float:
        """Pipeline microbatches/second this stage can carry."""
        return self.throughput / self.visit_share


@dataclass(frozen=True)
class Move:
    """Move `peer_id` from `from_stage` to `to_stage`; the bottleneck goes from before to after."""

    peer_id: str
    from_stage: int
    to_stage: int
    bottleneck_before: float
    bottleneck_after: float


def bottleneck(stages: Mapping[int, StageLoad]) -> float:
    """The swarm's throughput: the least stage capacity (0 with an empty stage)."""
    return min((s.capacity for s in stages.values()), default=0.0)


def _weakest(stages: Mapping[int, StageLoad], allowed: Collection[int] | None = None,
             prefer: Collection[int] = ()) -> int:
    """Empty stages first (those in `prefer` before the others), then least capacity, ties to
    the lowest index; only stages in `allowed` (None: all)."""
    if not stages:
        raise ValueError("no stages: the run spec defines at least stage 0")
    choices = [i for i in stages if allowed is None or i in allowed]
    if not choices:
        raise ValueError("no stage is allowed: the caller refuses a peer that fits none")
    return min(choices, key=lambda i: (bool(stages[i].replicas),
                                       bool(stages[i].replicas) or i not in prefer,
                                       stages[i].capacity, i))


def assign_stage(stages: Mapping[int, StageLoad], peer_throughput: float,
                 allowed: Collection[int] | None = None, prefer: Collection[int] = ()) -> int:
    """The stage a joining peer with `peer_throughput` samples/second should serve, among
    `allowed` (the stages its memory fits, coordinator/placement.py; None: any). An empty
    stage in `prefer` (one only this peer fits) goes before the other empty ones."""
    if not (peer_throughput > 0.0 and math.isfinite(peer_throughput)):
        raise ValueError(f"peer_throughput={peer_throughput!r}: the join self-benchmark must "
                         "report a positive number of samples/second")
    return _weakest(stages, allowed, prefer)


def contribution(stages: Mapping[int, StageLoad], stage: int, peer_id: str, throughput: float,
                 relayed: Collection[str] = ()) -> float:
    """What a peer of `throughput` samples/s adds to `stage`'s capacity: a peer nobody can dial
    serves a block stage at 1 / RELAY_FACTOR of it (every call into it crosses its relay)."""
    if stage != 0 and peer_id in relayed:
        throughput /= RELAY_FACTOR
    return throughput / stages[stage].visit_share


def capacities(stages: Mapping[int, StageLoad], relayed: Collection[str] = ()
               ) -> dict[int, float]:
    """Each stage's capacity, relayed block replicas counted as `contribution` says."""
    return {i: sum(contribution(stages, i, p, v, relayed) for p, v in s.replicas.items())
            for i, s in stages.items()}


def plan_rebalance(stages: Mapping[int, StageLoad],
                   min_gain: float = DEFAULT_MIN_GAIN,
                   relayed: Collection[str] = (),
                   fits: Callable[[str, int], bool] | None = None) -> Move | None:
    """The one move that best raises the bottleneck, or None when no move is worth it. Peers in
    `relayed` (nobody can dial them) are counted at a block stage as `contribution` says; a
    peer moves only to a stage `fits(peer_id, stage)` allows (its memory; None: any)."""
    if min_gain < 0.0:
        raise ValueError(f"min_gain={min_gain} must be >= 0 (relative bottleneck gain)")
    caps = capacities(stages, relayed)
    to = min(stages, key=lambda i: (bool(stages[i].replicas), caps[i], i))  # `_weakest`
    filling = not stages[to].replicas
    before = min(caps.values())
    best: tuple[list[float], float] | None = None
    best_move: tuple[int, str] | None = None
    for donor in sorted(stages):
        load = stages[donor]
        if donor == to or len(load.replicas) < 2:
            continue
        for peer_id in sorted(load.replicas):
            if fits is not None and not fits(peer_id, to):
                continue
            value = load.replicas[peer_id]
            after = dict(caps)
            after[donor] -= contribution(stages, donor, peer_id, value, relayed)
            after[to] += contribution(stages, to, peer_id, value, relayed)
            # the best sorted capacity vector; ties to the donor with most spare, then to the
            # lowest stage index and peer id (strict > keeps the first one met)
            key = (sorted(after.values()), caps[donor])
            if best is None or key > best:
                best, best_move = key, (donor, peer_id)
    if best is None or best_move is None:
        return None
    after_min = best[0][0]
    if not filling and not after_min > before * (1.0 + min_gain + _FLOAT_SLACK):
        return None
    return Move(best_move[1], best_move[0], to, before, after_min)


def rebalance_due(last: float | None, now: float, period: float = REBALANCE_PERIOD_S) -> bool:
    """Whether `period` seconds have passed since the last rebalance (None: never ran)."""
    if period <= 0.0:
        raise ValueError(f"period={period} must be positive (SWARM uses 300 s)")
    return last is None or now - last >= period


def rebuild_method(stage: int, live: set[int], n_stages: int, checkfree_plus: bool) -> str:
    """How the next holder of an emptied `stage` gets weights (ALGORITHMS.md §3), given the stages
    that still have a live replica (`live`, stage 0 included) of `n_stages` in all.

    "checkfree" for an inner block stage averaged from both neighbours; "checkfree+" for a copy
    of a CheckFree+ swap partner (1<->2, S-1<->S; at S = 3 stages 1 and 3 both swap with 2 on
    alternate odd microbatches, so 1 and 3 copy 2, and 2 averages 1 and 3 or copies the one left:
    peer/pipeline/paths.py's `checkfree_swap_pairs`, optim/checkfree.plan_recovery) and for stage
    0 rebuilt from the copy stage 1 or S keeps; otherwise "snapshot" (the holder's local
    snapshot, else a degraded copy).
    """
    last = n_stages - 1
    if stage == 0:
        return "checkfree+" if checkfree_plus and ({1, last} & live) else "snapshot"
    partners: set[int] = set()
    if checkfree_plus and last >= 2:
        pairs = {(1, 2), (2, 3)} if last == 3 else {(1, 2), (last - 1, last)}
        partners = {b if a == stage else a for a, b in pairs if stage in (a, b)}
    if len(partners) == 1:
        return "checkfree+" if partners & live else "snapshot"
    inner = 2 <= stage <= last - 1 and stage - 1 in live and stage + 1 in live
    if inner:
        return "checkfree"
    return "checkfree+" if partners & live else "snapshot"


def stage_for_hint(hint: int, stages: Mapping[int, StageLoad], *, held: int | None,
                   rebuilding: set[int], trusted: bool = False) -> int | None:
    """The stage a joining peer's `stage_hint` gets it, or None: the normal assignment decides.

    A hint is the peer's wish, and stage 0 (the driver) and the stage a peer shares with its
    replicas are privileges, so it is honoured only where it takes nothing from anyone:
    re-attaching the stage the coordinator knows this peer held (`held`: a restart, a re-join
    after a lapsed lease), an empty stage, or a stage waiting for a rebuild. With `trusted`
    (an operator's lab or test swarm: `shoal coordinator --trust-stage-hints`) every valid hint
    is honoured. `hint` < 0 means none.
    """
    if hint < 0 or hint not in stages:
        return None
    if trusted or hint == held or not stages[hint].replicas or hint in rebuilding:
        return hint
    return None
