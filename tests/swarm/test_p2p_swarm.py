"""Peer-to-peer hops in a real swarm (`pipeline.hops = "p2p"`, peer/pipeline/p2p.py), and the
stage-0 hub (`"hub"`), which the default ("auto") no longer takes outside SPSA, the same way.

Processes on 127.0.0.1: a coordinator, the stage-0 driver, two replicas of block stage 1 and one
of stage 2. Each microbatch goes driver -> stage 1 -> stage 2 -> driver (Stage.Deliver), and its
backward the same replicas back. What is checked: the loss falls and (almost) no microbatch is
dropped, each through both stages; the peers' own byte counters show who sent the activations:
the driver sends 2 of a microbatch's 6 messages peer to peer (the first forward and the head's
gradient) and 4 of 8 through the hub; every stage's replicas end at one step with one state
hash. Then a stage-1 replica is killed: the microbatches go on through the other one.
"""

from __future__ import annotations

import signal

import pytest

from shoal.swarm import read_metrics
from tests.swarm.local_swarm import (
    check_replicas_of_an_endless_run,
    logs_tail,
    spec_with,
    step_of,
    wait_for,
)


@pytest.mark.parametrize("hops", ["p2p", "hub"])
def test_hops_train_and_survive_a_kill(swarm_factory, hops: str) -> None:
    spec = spec_with(**{"pipeline.hops": hops, "membership.heartbeat_s": 1.0})
    swarm = swarm_factory(spec, [0, 1, 1, 2])
    wait_for("30 steps with their metrics",
             lambda: len([r for r in read_metrics(swarm.logs) if r["step"] <= 30]) >= 30, 240,
             swarm)
    rows = sorted((r for r in read_metrics(swarm.logs) if r["step"] <= 30),
                  key=lambda r: r["step"])
    steady = [r for r in rows if r["step"] >= 3]
    # a microbatch may be dropped on a loaded machine (a hop's timeout), never silently
    done, planned = sum(r["completed"] for r in steady), sum(r["microbatches"] for r in steady)
    assert done >= 0.9 * planned, \
        ([(r["step"], r["completed"], r["microbatches"]) for r in steady], logs_tail(swarm))
    assert all(r["visits"] == {"1": r["completed"], "2": r["completed"]} for r in steady), \
        [(r["visits"], r["completed"]) for r in steady]
    rows = [r for r in rows if r.get("loss") is not None]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    # replicas step many times a second: frozen drivers let them settle (as the hub tests do)
    check_replicas_of_an_endless_run(swarm, swarm.peers[:1], {0: 1, 1: 2, 2: 1})
    peers = (swarm.status() or {}).get("peers") or []
    sent = {p["peer_id"]: (p.get("bytes_by_kind") or {}).get("activations", 0) for p in peers}
    driver = next(p["peer_id"] for p in peers if p["stage"] == 0)
    share = sent[driver] / max(1, sum(sent.values()))  # 2/6 peer to peer, 4/8 through the hub
    assert (share < 0.42) if hops == "p2p" else (share > 0.42), (hops, share, sent)

    swarm.peers[1].send_signal(signal.SIGKILL)
    swarm.peers[1].wait()
    at_kill = step_of(swarm)
    wait_for("5 more steps after a stage-1 replica was killed",
             lambda: step_of(swarm) >= at_kill + 5, 180, swarm)
    late = [r for r in read_metrics(swarm.logs) if r["step"] > at_kill + 2]
    assert any(r["completed"] == r["microbatches"] for r in late), late
