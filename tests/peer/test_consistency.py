"""The replicas' consistency rules (peer/consistency.py) on hand-made views, without a network."""

from __future__ import annotations

from peer import consistency
from tests.fakes import FakeView, stage_infos


def view(steps: dict[str, int], holders: dict[int, list[str]]) -> FakeView:
    return FakeView(stage_infos(3), holders, steps)


def test_lowest_id_leads_and_orders_the_candidates() -> None:
    assert consistency.lowest_id(["c", "a", "b"]) == "a"
    assert consistency.leader_order({"c", "a", "b"}) == ["a", "b", "c"]


def test_a_hash_belongs_to_the_step_it_was_computed_after() -> None:
    h = consistency.StateHash()
    h.set(4, "abc")
    assert h.at(4) == "abc" and h.at(5) == ""
    h.clear()
    assert h.at(4) == ""


def test_the_replica_that_is_not_the_lowest_id_yields_on_a_differing_hash() -> None:
    v = view({"a": 7, "b": 7}, {1: ["a", "b"]})  # the view's replicas all hash "h"
    assert consistency.differing_hash(v, "b", 1, 7, "h") is None
    verdict = consistency.differing_hash(v, "b", 1, 7, "other")
    assert verdict is not None and verdict.action == "download"
    assert consistency.differing_hash(v, "0", 1, 7, "other") is None  # "0" is the lowest id


def test_a_stalled_replica_downloads_when_its_stage_is_ahead_else_adopts_the_swarm_step() -> None:
    v = view({"a": 9, "b": 5, "z": 9}, {1: ["a", "b"], 2: ["z"]})
    verdict = consistency.behind_the_swarm(v, "b", 1, 5, fast_forwards=True)
    assert verdict is not None and verdict.action == "download"
    alone = view({"b": 5, "z": 9}, {1: ["b"], 2: ["z"]})
    verdict = consistency.behind_the_swarm(alone, "b", 1, 5, fast_forwards=True)
    assert verdict == consistency.Verdict("adopt", step=9)
    assert consistency.behind_the_swarm(alone, "b", 1, 5, fast_forwards=False) is None


def test_the_stall_clock_counts_from_when_a_step_was_first_seen() -> None:
    clock = consistency.StallClock()
    assert not clock.stalled(3, 100.0, 10.0)
    assert not clock.stalled(3, 105.0, 10.0)
    assert clock.stalled(3, 110.0, 10.0)
    assert not clock.stalled(4, 111.0, 10.0)  # a new step restarts it


def test_fast_forward_only_when_no_other_holder_is_ahead_or_differs() -> None:
    v = view({"a": 5, "b": 5}, {1: ["a", "b"]})
    assert consistency.may_fast_forward(v, "a", 1, 5, "h")
    assert not consistency.may_fast_forward(v, "a", 1, 5, "other")
    v.steps["b"] = 6
    assert not consistency.may_fast_forward(v, "a", 1, 5, "h")
