"""coordinator/placement.py: relayed peers end at stage 0, reachable ones at the block stages,
one move at a time, no stage ever left without the weights it holds."""

from __future__ import annotations

from coordinator.assignment import StageLoad, plan_rebalance
from coordinator.membership import Membership
from coordinator.placement import plan_relay_move
from protocols.coordinator_client import Benchmark, PeerStats
from protocols.runspec import RunSpec


def loads(**stages: dict[str, float]) -> dict[int, StageLoad]:
    return {int(k[1:]): StageLoad(v) for k, v in stages.items()}


def test_a_relayed_block_replica_first_gets_a_reachable_partner_from_stage_0() -> None:
    # the relayed "r" is stage 1's only replica: taking it away would leave nobody to download
    # stage 1 from, so a reachable driver moves there first: the faster one ("d")
    stages = loads(s0={"c": 9.0, "d": 10.0}, s1={"r": 10.0}, s2={"b": 10.0})
    everyone = {"b", "c", "d", "r"}
    move = plan_relay_move(stages, relayed={"r"}, ready=everyone)
    assert (move.peer_id, move.from_stage, move.to_stage) == ("d", 0, 1)
    # r at stage 1 delivers half through its relay: the swap raises the bottleneck 5 -> 10
    assert (move.bottleneck_before, move.bottleneck_after) == (5.0, 10.0)
    # once d serves stage 1, r goes to stage 0
    stages = loads(s0={"c": 10.0}, s1={"r": 10.0, "d": 10.0}, s2={"b": 10.0})
    move = plan_relay_move(stages, relayed={"r"}, ready=everyone)
    assert (move.peer_id, move.from_stage, move.to_stage) == ("r", 1, 0)
    # and then nothing is left to do
    stages = loads(s0={"c": 10.0, "r": 10.0}, s1={"d": 10.0}, s2={"b": 10.0})
    assert plan_relay_move(stages, relayed={"r"}, ready=everyone) is None


def test_nothing_moves_that_is_not_ready_placed_or_needed() -> None:
    stages = loads(s0={"c": 10.0, "d": 10.0}, s1={"r": 10.0}, s2={"b": 10.0})
    everyone = {"b", "c", "d", "r"}
    assert plan_relay_move(stages, relayed=set(), ready=everyone) is None  # nobody relayed
    assert plan_relay_move(stages, relayed={"r"}, ready=everyone - {"d", "c"}) is None
    assert plan_relay_move(stages, relayed={"r"}, ready=everyone, placed={"r"}) is None
    assert plan_relay_move(stages, relayed={"r"}, ready=everyone, placed={"c", "d"}) is None
    # the only driver is not given away, and a relayed driver is no partner
    lone = loads(s0={"d": 10.0}, s1={"r": 10.0})
    assert plan_relay_move(lone, relayed={"r"}, ready={"d", "r"}) is None
    both = loads(s0={"c": 10.0, "q": 10.0}, s1={"r": 10.0})
    assert plan_relay_move(both, relayed={"r", "q"}, ready={"c", "q", "r"}).peer_id == "c"
    assert plan_relay_move(both, relayed={"r", "q", "c"}, ready={"c", "q", "r"}) is None


def test_a_call_weighs_a_bounded_number_of_candidates_and_the_caller_rotates_them() -> None:
    # three relayed replicas with a reachable partner each; one weighed per call
    stages = loads(s0={"c": 10.0}, s1={"r1": 10.0, "d1": 10.0}, s2={"r2": 10.0, "d2": 10.0},
                   s3={"r3": 10.0, "d3": 10.0})
    ready = {"c", "r1", "d1", "r2", "d2", "r3", "d3"}
    picked = {plan_relay_move(stages, {"r1", "r2", "r3"}, ready, start=turn,
                              max_candidates=1).peer_id for turn in range(3)}
    assert picked == {"r1", "r2", "r3"}


def test_a_move_that_would_lower_the_bottleneck_is_not_made() -> None:
    # stage 1 has a fast relayed replica and a slow direct one: without "r", stage 1 would
    # carry 1 sample/s where it now carries 1 + 20 / 2
    stages = loads(s0={"c": 50.0}, s1={"r": 20.0, "d": 1.0})
    assert plan_relay_move(stages, relayed={"r"}, ready={"c", "d", "r"}) is None
    # a driver much slower than the relayed replica is no good swap either (the fast one is
    # placed by the operator); the fast one would be
    stages = loads(s0={"c": 50.0, "d": 0.5}, s1={"r": 20.0})
    assert plan_relay_move(stages, relayed={"r"}, ready={"c", "d", "r"}, placed={"c"}) is None
    assert plan_relay_move(stages, relayed={"r"}, ready={"c", "d", "r"}).peer_id == "c"


def test_rebalancing_counts_a_relayed_peer_at_a_block_stage_for_what_its_relay_delivers(
        ) -> None:
    stages = loads(s0={"r": 10.0, "c": 10.0, "e": 10.0}, s1={"b": 1.0})
    move = plan_rebalance(stages, 0.1, relayed={"r"})
    assert move is not None and move.peer_id == "c" and move.bottleneck_after == 11.0
    # only relayed ones to give: one still goes, and brings stage 1 from 1 to 1 + 10 / 2
    move = plan_rebalance(stages, 0.1, relayed={"r", "c", "e"})
    assert move is not None and move.bottleneck_after == 6.0
    # an empty stage is filled whoever is relayed
    empty = loads(s0={"r": 10.0, "q": 10.0}, s1={})
    assert plan_rebalance(empty, 0.1, relayed={"r", "q"}).to_stage == 1


def test_the_coordinator_swaps_a_relayed_block_replica_with_a_driver_one_move_at_a_time(
        ) -> None:
    spec = RunSpec().replace(**{"pipeline.stages": 2})
    m = Membership(spec, "swarm-test", trust_stage_hints=True)
    t = 1_000.0
    # "c" placed at stage 0 by the operator; "d" and "r" assigned (r to the empty stage 1)
    for i, (peer, hint) in enumerate([("c", 0), ("d", -1), ("r", -1), ("b", -1)]):
        m.join(peer, bytes([i + 1]) * 32, f"198.18.0.{i + 2}:7100",
               Benchmark(samples_per_s=10.0, device="test"), hint, 0, t)
    where = {x.peer_id: x.stage for x in m.live_members()}
    # empty stages first: d and r fill stages 1 and 2, b ties and goes to the lowest, 0
    assert where == {"c": 0, "d": 1, "r": 2, "b": 0}, where
    assert m.get("c").placed and not m.get("b").placed

    def beat(peer: str, held: int, state: str = "training") -> None:
        m.heartbeat(peer, PeerStats(state=state, samples_per_s=10.0, held_stage=held), t)

    for x in m.live_members():
        beat(x.peer_id, x.stage)
    assert m.place_relayed(t) is None  # nobody is known to be relayed yet
    r_stage, donor = 2, "b"  # c, the other driver, was placed by the operator
    m.set_reach("r", m.get("r").address, "relayed", "dial-back refused", t)
    first = m.place_relayed(t)
    assert (first.peer_id, first.from_stage, first.to_stage) == (donor, 0, r_stage)
    assert m.get(donor).pending_action == "move"
    # until the donor serves its new stage, nothing else moves (r holds the only weights)
    assert m.place_relayed(t) is None
    m.get(donor).pending_action = ""  # the heartbeat reply delivered it
    beat(donor, 0)  # its next heartbeat is from before it began the move
    assert m.place_relayed(t) is None
    beat(donor, r_stage, "syncing")
    assert m.place_relayed(t) is None
    beat(donor, r_stage)
    second = m.place_relayed(t)
    assert (second.peer_id, second.from_stage, second.to_stage) == ("r", r_stage, 0)
    m.get("r").pending_action = ""
    beat("r", 0)
    assert m.place_relayed(t) is None
    assert {x.peer_id: x.stage for x in m.live_members()}["r"] == 0
    moves = [(e.peer_id, e.stage) for e in m.events.recent() if e.kind == "move"]
    assert moves == [("b", 2), ("r", 0)]
