"""A block replica nobody can dial trains through the coordinator's relay: real processes.

The stage-1 peer listens on 127.0.0.1 but registers at 127.0.0.2, where nothing listens, so
the coordinator's dial-back fails and nobody can call it directly (a stand-in for NAT that needs
no root; the lab's `--nat` is the real thing). The coordinator tells it to attach to its relay
(peer/relayed.py), it announces the relayed port, and every Forward/Backward of the run goes
into it through the relay: steps complete, /api/status calls it relayed, and /metrics counts
the relayed bytes. Bounded waits only catch hangs; nothing is timed.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.swarm import Swarm
from tests.swarm.local_swarm import spec_with, step_of, wait_for


def _relayed_bytes(swarm: Swarm) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{swarm.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "shoal_relayed_bytes_total")


def test_a_block_replica_nobody_can_dial_trains_through_the_relay(tmp_path) -> None:
    steps = 12
    swarm = Swarm(tmp_path / "swarm", spec_with(**{"run.steps": steps}), 0, None, "cpu")
    try:
        swarm.start(0)
        swarm.add_peer(0, ["--stage", "0", "--grace", "10"])
        swarm.add_peer(1, ["--stage", "1", "--grace", "10", "--advertise", "127.0.0.2"])
        swarm.add_peer(2, ["--stage", "2", "--grace", "10"])

        def relayed_peer() -> dict | None:
            peers = (swarm.status() or {}).get("peers", [])
            return next((p for p in peers if p["stage"] == 1 and p.get("reach") == "relayed"
                         and p["live"]), None)

        peer = wait_for("the stage-1 peer to be reached through the relay", relayed_peer, 180,
                        swarm)
        assert not peer["address"].startswith("127.0.0.2:"), peer
        wait_for(f"{steps} steps", lambda: step_of(swarm) >= steps, 300, swarm)
        # still relayed: nothing dialled it directly (polled: one status read may time out)
        wait_for("the peer still relayed after training", relayed_peer, 60, swarm)
        assert _relayed_bytes(swarm) > 0
    finally:
        swarm.stop(grace=5)


@pytest.mark.slow  # CI's slow pass; the default suite keeps the first relay test
def test_a_peer_started_with_relay_carries_another(tmp_path) -> None:
    """The coordinator's relay carries the first unreachable replica; the second goes to the
    less loaded relay on offer, a reachable peer started with --relay, and trains through it."""
    steps = 12
    swarm = Swarm(tmp_path / "swarm", spec_with(**{"run.steps": steps}), 0, None, "cpu")

    def by_stage(stage: int, **want: object) -> list[dict]:
        return [p for p in (swarm.status() or {}).get("peers", []) if p["live"]
                and p["stage"] == stage and all(p.get(k) == v for k, v in want.items())]

    try:
        swarm.start(0)
        swarm.add_peer(0, ["--stage", "0", "--grace", "10"])
        swarm.add_peer(1, ["--stage", "2", "--grace", "10", "--relay"])
        relay = wait_for("the --relay peer to be reached directly",
                         lambda: by_stage(2, reach="direct", relay=True), 180, swarm)[0]
        swarm.add_peer(2, ["--stage", "1", "--grace", "10", "--advertise", "127.0.0.2"])
        first = wait_for("the first unreachable replica relayed by the coordinator",
                         lambda: by_stage(1, reach="relayed"), 180, swarm)[0]
        assert first["relayed_by"] != relay["address"], first
        swarm.add_peer(3, ["--stage", "1", "--grace", "10", "--advertise", "127.0.0.3"])
        second = wait_for("the second relayed by the --relay peer",
                          lambda: by_stage(1, reach="relayed", relayed_by=relay["address"]),
                          180, swarm)[0]
        assert second["peer_id"] != first["peer_id"]
        wait_for(f"{steps} steps", lambda: step_of(swarm) >= steps, 300, swarm)
        wait_for("both replicas still relayed and live",
                 lambda: len(by_stage(1, reach="relayed")) == 2, 60, swarm)
    finally:
        swarm.stop(grace=5)


@pytest.mark.slow  # CI's slow pass (tests/lab/test_lab_relay_chaos.py does it under NAT)
def test_a_relays_loss_moves_its_peer_to_another_relay_with_its_stage(tmp_path) -> None:
    """The --relay peer carrying a block replica is killed (SIGKILL): the replica finds its relay
    lost, the coordinator names its own relay, the replica moves there as the same member of the
    same stage, and training goes on."""
    swarm = Swarm(tmp_path / "swarm", spec_with(**{"run.steps": 10_000}), 0, None, "cpu")

    def by_stage(stage: int, **want: object) -> list[dict]:
        return [p for p in (swarm.status() or {}).get("peers", []) if p["live"]
                and p["stage"] == stage and all(p.get(k) == v for k, v in want.items())]

    try:
        swarm.start(0)
        swarm.add_peer(0, ["--stage", "0", "--grace", "10"])
        swarm.add_peer(1, ["--stage", "2", "--grace", "10"])
        relay_proc = swarm.add_peer(2, ["--stage", "2", "--grace", "10", "--relay"])
        relay = wait_for("the --relay peer to be reached directly",
                         lambda: by_stage(2, reach="direct", relay=True), 180, swarm)[0]
        swarm.add_peer(3, ["--stage", "1", "--grace", "10", "--advertise", "127.0.0.2"])
        wait_for("the first unreachable replica relayed by the coordinator",
                 lambda: by_stage(1, reach="relayed"), 180, swarm)
        swarm.add_peer(4, ["--stage", "1", "--grace", "10", "--advertise", "127.0.0.3"])
        moved = wait_for("the second relayed by the --relay peer",
                         lambda: by_stage(1, reach="relayed", relayed_by=relay["address"]),
                         180, swarm)[0]
        relay_proc.kill()
        relay_proc.wait()
        at_kill = step_of(swarm)

        def moved_on() -> dict | None:
            return next((p for p in by_stage(1, reach="relayed") if p["peer_id"] ==
                         moved["peer_id"] and p["relayed_by"] != relay["address"]), None)

        after = wait_for("the replica to move to another relay", moved_on, 240, swarm)
        assert after["stage"] == 1 and after["address"] != moved["address"]
        wait_for("training to go on after the relay's loss",
                 lambda: step_of(swarm) >= at_kill + 5, 300, swarm)
    finally:
        swarm.stop(grace=5)
