"""The replicas' consistency rules (peer/consistency.py) on hand-made views, without a network."""

from __future__ import annotations

from peer import consistency
from tests.fakes import FakeView, stage_infos


def view(steps: dict[str, int], holders: dict[int, list[str]]) -> FakeView:
    return FakeView(stage_infos(3), holders, steps)


def test_seniority_orders_the_candidates_and_the_id_only_breaks_ties() -> None:
    assert consistency.lowest_id(["c", "a", "b"]) == "a"
    assert consistency.leader_order({"c", "a", "b"}) == ["a", "b", "c"]
    # "0" ground a key that sorts first, but joined last: it leads nothing
    joined = {"0": 30.0, "a": 20.0, "b": 10.0}
    assert consistency.leader_order({"0", "a", "b"}, joined) == ["b", "a", "0"]
    # a peer the view does not list (the newest) comes last
    assert consistency.leader_order({"x", "a"}, {"a": 5.0}) == ["a", "x"]


def test_a_relayed_replica_leads_a_round_only_when_no_direct_one_can() -> None:
    joined = {"a": 10.0, "b": 20.0, "c": 30.0}
    # "a" is the most senior, but every part sent to it would cross its relay twice
    assert consistency.leader_order({"a", "b", "c"}, joined, relayed={"a"}) == ["b", "c", "a"]
    assert consistency.leader_order({"a", "b"}, joined, relayed={"a", "b"}) == ["a", "b"]


def test_a_hash_belongs_to_the_step_it_was_computed_after() -> None:
    h = consistency.StateHash()
    h.set(4, "abc")
    assert h.at(4) == "abc" and h.at(5) == ""
    h.clear()
    assert h.at(4) == ""


def test_the_replica_against_the_majority_yields_whatever_its_id() -> None:
    v = view({"a": 7, "b": 7}, {1: ["a", "b"]})  # the view's replicas all hash "h"
    assert consistency.differing_hash(v, "b", 1, 7, "h") is None
    verdict = consistency.differing_hash(v, "b", 1, 7, "other")
    assert verdict is not None and verdict.action == "download"
    # "0" sorts first, but a and b (the majority) hold "h": "0" yields (it used to win)
    verdict = consistency.differing_hash(v, "0", 1, 7, "other")
    assert verdict is not None and verdict.action == "download"


class AttestedStage:
    """A StageInfo with the coordinator's attestation (contract 1 of issue #12)."""

    def __init__(self, stage: int, attested_step: int, attested_hash: str) -> None:
        self.stage, self.step, self.rebuild, self.grad_norm = stage, attested_step, "", 0.0
        self.attested_step, self.attested_hash = attested_step, attested_hash


def test_the_attested_hash_decides_when_it_is_of_this_step() -> None:
    v = view({"a": 7}, {1: ["a"]})  # a hashes "h"
    v.stages = [AttestedStage(0, 7, "s0"), AttestedStage(1, 7, "mine")]
    assert consistency.attested(v, 1) == (7, "mine")
    # a disagrees, but the coordinator attests this replica's hash: it keeps its weights
    assert consistency.differing_hash(v, "b", 1, 7, "mine") is None
    verdict = consistency.differing_hash(v, "b", 1, 7, "h")
    assert verdict is not None and "attests" in verdict.why
    # an attestation of another step judges no replica, whatever the others say
    v.stages = [AttestedStage(0, 7, "s0"), AttestedStage(1, 6, "old")]
    assert consistency.differing_hash(v, "b", 1, 7, "mine") is None


def test_a_replica_behind_the_attested_step_downloads_once_the_swarm_stops() -> None:
    # the run ended with the majority of stage 1 after step 60 and this replica after 59: no
    # EndStep will come that it could refuse, and a lag of one step is not `behind_the_swarm`
    v = view({"a": 60, "b": 60}, {1: ["a", "b", "c"]})
    v.stages = [AttestedStage(0, 60, "s0"), AttestedStage(1, 60, "h")]
    assert consistency.behind_the_swarm(v, "c", 1, 59, fast_forwards=True) is None
    verdict = consistency.behind_the_attestation(v, 1, 59)
    assert verdict is not None and verdict.action == "download" and "60" in verdict.why
    # at the attested step or ahead of it (the attestation trails a training swarm): no verdict
    assert consistency.behind_the_attestation(v, 1, 60) is None
    assert consistency.behind_the_attestation(v, 1, 61) is None
    # without an attestation (an older coordinator) this rule says nothing
    v.stages = stage_infos(3)
    assert consistency.behind_the_attestation(v, 1, 59) is None


def test_a_tie_goes_to_the_most_senior_replica() -> None:
    assert consistency.winning_hash({"0": "x", "b": "h"}, {"0": 9.0, "b": 1.0}) == "h"
    assert consistency.winning_hash({"0": "x", "b": "h", "c": "x"}, {"b": 1.0}) == "x"
    assert consistency.winning_hash({"a": ""}) == ""


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


def test_a_peer_whose_address_a_later_joiner_took_is_no_live_replica() -> None:
    # a killed replica's lease still runs when its host respawns a new peer on the same port:
    # a call to that address reaches the new one, so the old one must not lead or be waited for
    from dataclasses import replace

    v = view({}, {1: ["old", "b"]})
    new = replace(v.replicas(1)[0], peer_id="new", joined_at=50.0)
    old = replace(v.replicas(1)[0], joined_at=10.0)
    other = v.replicas(1)[1]

    class Respawned(FakeView):
        @property
        def peers(self):
            return [old, other, new]

        def replicas(self, stage):
            return [old, other, new] if stage == 1 else []

    r = Respawned(stage_infos(3))
    assert old.address == new.address != other.address
    assert consistency.superseded(r) == {"old"}
    assert consistency.live_replicas(r, 1) == ["b", "new"]
    assert "old" in consistency.departed_peers(r)
