"""Placement that knows who is relayed: a peer nobody can dial serves where it costs least.

A stage-0 peer (a driver) only dials out: its microbatches leave it and come back as replies on
its own calls, so being behind a NAT costs it nothing but its sync round's parts. A block replica
is called *into* for every microbatch; relayed, each of those bytes crosses two links (the
caller's to the relay, the relay's down the peer's stream) and the relay's event loop. So where
the swarm has a choice, relayed peers hold stage 0 and reachable ones the block stages.

Stages are assigned at join, before the coordinator's dial-back (coordinator/reach.py) knows
whether the newcomer can be dialled, so this corrects the assignment once the verdict is in, one
move at a time, never emptying a stage and never taking a stage's only weights away:

- A relayed block replica whose stage has a ready, reachable replica besides it moves to stage 0
  unless that lowers the swarm's bottleneck by more than TOLERANCE, the relayed replica counted
  at a block stage at 1 / RELAY_FACTOR of its measured throughput (what it delivers there
  through the relay: coordinator/assignment.py's `contribution`). The tolerance is for the
  figures: EMAs of noisy measurements, and a driver's is its stage-0 work's, not what it will
  serve at a block stage.
- A relayed block replica with no reachable ready partner first gets one: a reachable, ready
  stage-0 replica moves to its stage (stage 0 keeping another replica), unless the swap as a
  whole (that one at the block stage, the relayed one at stage 0) lowers the bottleneck by
  more than TOLERANCE. It
  downloads the stage from the relayed replica, which keeps serving; once it is ready, the rule
  above moves the relayed one to stage 0. The two moves make a swap in which the stage's weights
  are never left without a holder.

Peers an operator placed (`--stage` honoured under `--trust-stage-hints`, the lab's `--place`)
are never moved. Pure functions of the loads and sets the coordinator passes in (no clock, no
I/O), like coordinator/assignment.py; coordinator/membership.py applies the move.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from coordinator.assignment import Move, StageLoad, contribution
from protocols.memory import gib

TOLERANCE = 0.25  # a placement move may lower the computed bottleneck by this fraction
MAX_CANDIDATES = 8  # relayed replicas (and stage-0 partners for each) weighed per call


def _capacities(stages: Mapping[int, StageLoad], where: Mapping[str, int],
                relayed: Collection[str]) -> list[float]:
    """The stages' capacities, weakest first, with the peers at the stages `where` says."""
    speed = {p: v for load in stages.values() for p, v in load.replicas.items()}
    caps = dict.fromkeys(stages, 0.0)
    for peer_id, stage in where.items():
        caps[stage] += contribution(stages, stage, peer_id, speed[peer_id], relayed)
    return sorted(caps.values())


def plan_relay_move(stages: Mapping[int, StageLoad], relayed: Collection[str],
                    ready: Collection[str], placed: Collection[str] = (), *, start: int = 0,
                    max_candidates: int = MAX_CANDIDATES,
                    fits_stage: Callable[[str, int], bool] | None = None) -> Move | None:
    """The one move that puts a relayed peer where it costs least, or None (see the module
    docstring). `relayed`: peers no one can dial directly; `ready`: peers that hold their stage
    and serve it now; `placed`: peers an operator placed, which never move. Each weighing costs
    O(peers), so at most `max_candidates` relayed replicas are weighed per call, beginning at
    the `start`-th (the caller rotates it: a large swarm gets to every one over a few calls),
    and for each at most `max_candidates` stage-0 partners, the fastest first. A peer moves
    only to a stage `fits_stage(peer_id, stage)` allows (its memory; None: any)."""
    ok = fits_stage or (lambda _peer, _stage: True)
    if 0 not in stages or len(stages) < 2:
        return None
    where = {p: s for s, load in stages.items() for p in load.replicas}
    movable = set(where) - set(placed)
    candidates = [(stage, p) for stage in sorted(s for s in stages if s != 0)
                  for p in sorted(stages[stage].replicas)
                  if p in relayed and p in movable and p in ready and ok(p, 0)]
    if not candidates:
        return None
    first = start % len(candidates)
    before = _capacities(stages, where, relayed)
    donors = sorted((p for p in stages[0].replicas
                     if p not in relayed and p in movable and p in ready),
                    key=lambda p: (-stages[0].replicas[p], p))[:max_candidates]
    for stage, peer_id in (candidates[first:] + candidates[:first])[:max_candidates]:
        if any(p not in relayed and p in ready for p in stages[stage].replicas):
            after = _capacities(stages, {**where, peer_id: 0}, relayed)
            if after[0] >= before[0] * (1.0 - TOLERANCE):
                return Move(peer_id, stage, 0, before[0], after[0])
            continue
        if len(stages[0].replicas) < 2:
            continue  # stage 0 cannot spare a driver
        best: tuple[list[float], str] | None = None
        for donor in donors:
            if not ok(donor, stage):
                continue
            swapped = _capacities(stages, {**where, donor: stage, peer_id: 0}, relayed)
            if best is None or swapped > best[0]:
                best = (swapped, donor)
        if best is not None and best[0][0] >= before[0] * (1.0 - TOLERANCE):
            return Move(best[1], 0, stage, before[0], best[0][0])
    return None


# --------------------------------------------------------------------------- memory
# Stages go only where they fit: a peer reports its device's available memory at join
# (Benchmark.memory_available_bytes; 0 from an older peer, which is placed as before), and the
# coordinator compares it with each stage's estimated need (protocols/memory.py stage_bytes).


class TooSmall(Exception):
    """A joining peer's device has room for no stage of this run; the message says by how much."""


def fits(need: int, available: int) -> bool:
    """Whether a stage needing `need` bytes fits a device with `available` (0: not reported)."""
    return available <= 0 or need <= available


def stages_that_fit(needs: Sequence[int], available: int) -> list[int]:
    """The stages (indices of `needs`) a device with `available` bytes can hold."""
    return [i for i, need in enumerate(needs) if fits(need, available)]


def check_fits_some(needs: Sequence[int], available: int, device: str) -> list[int]:
    """`stages_that_fit`, or TooSmall naming the device, its memory and the smallest need."""
    allowed = stages_that_fit(needs, available)
    if not allowed:
        small = min(range(len(needs)), key=lambda i: (needs[i], i))
        raise TooSmall(
            f"this peer's device ({device or 'unnamed'}) has {gib(available)} available, and "
            f"the smallest stage of this run (stage {small}) needs about {gib(needs[small])} "
            f"(weights, gradients, optimizer state and activations; protocols/memory.py): "
            f"join from a device with more free memory, or ask the operator for smaller "
            f"stages (more block stages, shorter sequences or smaller microbatches)")
    return allowed


def only_fits(needs: Sequence[int], available: int, others: Iterable[int]) -> set[int]:
    """The stages a device with `available` bytes fits and no device among `others` (the other
    live members' available bytes) does: where a newcomer helps most. A member that reported
    nothing fits everything."""
    others = list(others)
    return {i for i in stages_that_fit(needs, available)
            if not any(fits(needs[i], a) for a in others)}
