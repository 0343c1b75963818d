"""`sync.mode = spsa` in real swarms on 127.0.0.1 (coordinator + peer processes).

One stage-0 driver and two block stages with two replicas each train forward-only: the loss
falls, every stage's replicas end at the last step with one state hash, and the sync bytes are
counted under `sync:spsa` (a few bytes per step). A late joiner downloads a live replica's
checkpoint and replays the coordinator's ledger from it to the same hash (slow); a replica
whose weights drift is caught by the hash check and re-downloads (slow).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peer.sync.spsa import DRIFT_ENV
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics
from tests.swarm.local_swarm import holders, replicas_agree, step_of, wait_for

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 32,
        "pipeline.stages": 2, "pipeline.microbatch": 8, "pipeline.target_batch": 16,
        "sync.timeout_s": 5.0, "membership.heartbeat_s": 0.5, "membership.lease_s": 8.0,
        "sync.mode": "spsa", "sync.spsa.lr": 3e-3, "sync.spsa.hash_every": 5}
LAYOUT = [0, 1, 1, 2, 2]


def settled(swarm: Swarm, counts: dict[int, int], steps: int) -> dict[int, list[dict]] | None:
    """Every stage's replicas at `steps` with one non-empty hash, or None."""
    return replicas_agree(swarm, counts, steps)


def losses(swarm: Swarm) -> list[float]:
    rows = sorted((r for r in read_metrics(swarm.logs) if r.get("loss") is not None),
                  key=lambda r: r["step"])
    return [r["loss"] for r in rows]


def test_spsa_swarm_trains_and_replicas_agree(swarm_of) -> None:
    steps = 60
    swarm = swarm_of(RunSpec().replace(**{**TINY, "run.steps": steps}), LAYOUT)
    wait_for(f"{steps} spsa steps", lambda: step_of(swarm) >= steps, 240, swarm)
    loss = losses(swarm)
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < first - 0.05, (first, last)
    counts = {s: LAYOUT.count(s) for s in set(LAYOUT)}
    by = wait_for("replicas at the last step with one hash", lambda: settled(swarm, counts,
                                                                            steps), 30, swarm)
    assert isinstance(by, dict)
    driver = by[0][0]
    sent = driver["bytes_by_kind"].get("sync:spsa", 0)
    assert 0 < sent < 200 * steps, sent  # a post and a few bytes per block replica per step
    rows = [r for r in read_metrics(swarm.logs) if r.get("spsa_codes")]
    assert any(c != 0 for r in rows for c in r["spsa_codes"])
    logs = "".join(f.read_text() for f in swarm.logs.glob("peer*.log"))
    assert "re-downloading" not in logs


@pytest.mark.slow
def test_spsa_late_joiner_replays_the_ledger(swarm_of) -> None:
    steps = 300  # long enough that the joiner, started at step 6, arrives mid-run
    swarm = swarm_of(RunSpec().replace(**{**TINY, "run.steps": steps, "pipeline.stages": 1,
                                          "sync.spsa.hash_every": 4}), [0, 1])
    wait_for("step 6", lambda: step_of(swarm) >= 6, 120, swarm)
    swarm.add_peer(2, ["--stage", "1", "--grace", "5"])
    by = wait_for("both block replicas at the last step with one hash",
                  lambda: settled(swarm, {0: 1, 1: 2}, steps), 180, swarm)
    assert isinstance(by, dict)
    log = (swarm.logs / "peer2.log").read_text()
    m = re.search(r"downloaded state at step (\d+)", log)
    assert m, log[-2000:]
    assert int(m.group(1)) % 4 == 0 and int(m.group(1)) < steps  # a checkpoint, mid-run
    assert re.search(r"replayed \d+ steps from the ledger", log), log[-2000:]


@pytest.mark.slow
def test_spsa_drifted_replica_is_caught_and_re_downloads(tmp_path: Path, monkeypatch) -> None:
    steps = 200
    spec = RunSpec().replace(**{**TINY, "run.steps": steps, "pipeline.stages": 1,
                                "sync.spsa.hash_every": 4})
    swarm = Swarm(tmp_path / "drift", spec, 0, None, "cpu")
    try:
        swarm.start(0)
        monkeypatch.setenv(DRIFT_ENV, "9")  # only this replica drifts, once, after step 9
        swarm.add_peer(1, ["--stage", "1", "--grace", "5"])
        monkeypatch.delenv(DRIFT_ENV)
        swarm.add_peer(2, ["--stage", "1", "--grace", "5"])
        wait_for("two block replicas", lambda: len(holders(swarm).get(1, [])) == 2, 90,
                 swarm)
        swarm.add_peer(0, ["--stage", "0", "--grace", "5"])
        by = wait_for("block replicas at the last step with one hash",
                      lambda: settled(swarm, {0: 1, 1: 2}, steps), 300, swarm)
        assert isinstance(by, dict)
        logs = {f.name: f.read_text() for f in swarm.logs.glob("peer*.log")}
        assert "corrupted one weight" in logs["peer1.log"]
        assert "spsa hash check" in logs["peer1.log"] or "spsa hash check" in logs["peer2.log"]
        assert "downloaded state" in logs["peer1.log"] + logs["peer2.log"]
    finally:
        swarm.stop(grace=5)
