"""Placement that knows who is relayed, with real processes: a relayed block replica ends as a
driver and a reachable driver takes its stage, without the stage ever losing its weights.

The relayed peer registers at 127.0.0.2, where nothing listens (the stand-in for NAT of
test_relay_swarm.py). Join order makes the assignment deterministic: A (no hint) fills the empty
stage 0, C is placed at stage 0 by the operator (`--stage 0`, trusted here), R (relayed, no
hint) fills stage 1, B fills stage 2. Once the dial-back calls R relayed, the coordinator moves A
to stage 1 (it downloads the stage from R, through R's relay), and when A serves it, moves R to
stage 0, where it drives microbatches: both keep training, and the run ends with every stage's
replicas on one state.
"""

from __future__ import annotations

import pytest

from shoal.swarm import Swarm
from tests.swarm.local_swarm import describe, replicas_agree, spec_with, step_of, wait_for


@pytest.mark.slow  # ~30 s: CI's slow pass runs it; the default suite stays under 15 min
def test_a_relayed_block_replica_and_a_reachable_driver_trade_places(tmp_path) -> None:
    steps = 40
    swarm = Swarm(tmp_path / "swarm", spec_with(**{"run.steps": steps}), 0, None, "cpu")

    def peers() -> list[dict]:
        return [p for p in (swarm.status() or {}).get("peers", []) if p["live"]]

    def joined(n: int) -> list[dict] | None:
        now = peers()
        return now if len(now) >= n else None

    try:
        swarm.start(0)
        order = [("A", []), ("C", ["--stage", "0"]), ("R", ["--advertise", "127.0.0.2"]),
                 ("B", [])]
        ids: dict[str, str] = {}
        for i, (name, extra) in enumerate(order):
            swarm.add_peer(i, ["--grace", "10", *extra])
            now = wait_for(f"peer {name} to join", lambda n=i + 1: joined(n), 180, swarm)
            ids[name] = next(p["peer_id"] for p in now if p["peer_id"] not in ids.values())
        def placed() -> dict[str, dict] | None:
            by_id = {p["peer_id"]: p for p in peers()}
            a, r = by_id.get(ids["A"]), by_id.get(ids["R"])
            if (a and r and a["stage"] == 1 and r["stage"] == 0 and r["reach"] == "relayed"
                    and a["state"] == "training" and r["state"] == "training"):
                return {"A": a, "R": r}
            return None

        wait_for("R at stage 0 (relayed) and A at stage 1, both training", placed, 300, swarm)
        events = (swarm.status() or {}).get("events", [])
        name = {v: k for k, v in ids.items()}
        joins = {name[e["peer_id"]]: e["stage"] for e in events if e["kind"] == "join"}
        assert joins == {"A": 0, "C": 0, "R": 1, "B": 2}, events
        moves = [(name[e["peer_id"]], e["stage"]) for e in events if e["kind"] == "move"]
        assert moves == [("A", 1), ("R", 0)], events  # the partner first, then the relayed one
        # R drives now (only drivers write step rows to their metrics file), and the run ends
        # with every stage's replicas on one state
        wait_for(f"{steps} steps", lambda: step_of(swarm) >= steps, 300, swarm)
        r_rows = swarm.logs / "peer2.metrics.jsonl"
        assert r_rows.exists() and r_rows.read_text().strip(), "R drove no step at stage 0"
        agree = wait_for("the replicas equal at the last step",
                         lambda: replicas_agree(swarm, {0: 2, 1: 1, 2: 1}, steps), 120, swarm)
        assert {p["peer_id"] for p in agree[0]} == {ids["C"], ids["R"]}, describe(agree)
        assert placed(), "the placement did not hold"
    finally:
        swarm.stop(grace=5)
