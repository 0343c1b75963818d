"""CheckFree+: the stages the planner swaps are the stages recovery and the coordinator pair.

The swaps are what train an edge stage to stand in for its partner, so a lost stage may be
rebuilt as a copy of a stage only if the planner actually ran that stage in its place. Three
places encode the rule (peer/pipeline/paths.py for the planner, optim/checkfree.py for the peer's
rebuild, coordinator/assignment.py for the rebuild method the view announces: the package
boundaries keep them apart); these tests derive the pairs from real plans and hold the other two
to them. Before the fix, at S = 3 the planner swapped (1, 2) only while recovery and the
coordinator copied stage 2 into a lost stage 3.
"""

from __future__ import annotations

import random

import pytest

from coordinator.assignment import rebuild_method
from optim import checkfree
from peer.pipeline import paths
from peer.pipeline.paths import ReplicaTiming
from peer.pipeline.planner import plan_iteration


def planned_partners(n_stages: int) -> dict[int, set[int]]:
    """stage -> the stages the planner ran in its place (swapped with it) over real plans."""
    stages = {s: [ReplicaTiming(f"p{s}{r}", 1.0) for r in range(2)]
              for s in range(1, n_stages + 1)}
    out: dict[int, set[int]] = {s: set() for s in stages}
    for it in range(1, 4):
        for path in plan_iteration(it, 8, stages, 0.0, random.Random(it), None,
                                   checkfree_plus=True):
            order = path.stages
            for i in range(len(order) - 1):
                if order[i] > order[i + 1]:  # a swapped pair (s+1, s)
                    out[order[i]].add(order[i + 1])
                    out[order[i + 1]].add(order[i])
    return out


@pytest.mark.parametrize("n_stages", range(2, 9))
def test_recovery_and_coordinator_copy_only_a_stage_the_planner_swapped_in(n_stages) -> None:
    partners = planned_partners(n_stages)
    assert {s for s, p in partners.items() if p} >= {1, n_stages}  # both edge stages swap
    for stage in range(1, n_stages + 1):
        assert set(checkfree.checkfree_stand_ins(stage, n_stages)) == partners[stage]
        assert set(paths.checkfree_stand_ins(stage, n_stages)) == partners[stage]
        for mb in range(8):
            assert (checkfree.checkfree_swap_pairs(n_stages, mb)
                    == paths.checkfree_swap_pairs(n_stages, mb))
        everyone = set(range(1, n_stages + 1)) - {stage}
        for lost_too in [set(), *({s} for s in everyone)]:
            alive = everyone - lost_too
            plan = checkfree.plan_recovery(stage, n_stages, alive)
            method = rebuild_method(stage, alive | {0}, n_stages + 1, checkfree_plus=True)
            if plan.method == "copy_neighbor":
                assert set(plan.sources) <= partners[stage], (stage, alive, plan)
                assert method == "checkfree+", (stage, alive)
            elif plan.method == "weighted_average":
                assert method == "checkfree", (stage, alive)
            else:
                assert (plan.method, method) == ("snapshot", "snapshot"), (stage, alive, plan)


def test_at_three_stages_both_edge_stages_learn_to_stand_in_for_the_middle() -> None:
    assert planned_partners(3) == {1: {2}, 2: {1, 3}, 3: {2}}
    assert checkfree.plan_recovery(3, 3, {1, 2}).sources == (2,)
    swapped = [mb for mb in range(8) if paths.checkfree_swap_pairs(3, mb)]
    assert swapped == [1, 3, 5, 7]  # still exactly the odd microbatches


def test_stage_zero_is_rebuilt_alike_by_peer_and_coordinator() -> None:
    for n in (1, 2, 3, 6):
        for alive in ({1, n}, {n}, {1}, set(range(2, n)) - {1, n}):
            plan = checkfree.plan_recovery(0, n, alive)
            method = rebuild_method(0, alive, n + 1, checkfree_plus=True)
            assert (plan.method == "edge_copy") == (method == "checkfree+"), (n, alive)
        assert rebuild_method(0, {1, n}, n + 1, checkfree_plus=False) == "snapshot"
