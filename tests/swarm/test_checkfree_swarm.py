"""CheckFree in a real swarm on 127.0.0.1 (coordinator and peer daemons as separate processes).

kill -9 every replica of the middle block stage mid-run: the stage-0 driver bypasses the empty
stage and training goes on; the coordinator logs a "skip" event and marks the stage for a
CheckFree rebuild; a new peer joins the stage, rebuilds it from its two neighbours' weights
(gradient-norm weighted average), reports it, and the loss returns to its pre-failure level.
"""

from __future__ import annotations

import signal

import pytest

from shoal.local import read_metrics
from tests.swarm.local_swarm import spec_with, step_of, wait_for

# 3 block stages of one layer each: stage 2's neighbours have the same layout, so they average.
# Leases long enough that a stalled shared machine does not expire the survivors too.
SPEC = {"model.n_layers": 3, "pipeline.stages": 3, "run.steps": 0,
        "membership.heartbeat_s": 1.0, "membership.lease_s": 10.0}


def losses(swarm) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(swarm.logs) if r.get("loss") is not None]


def mean_loss(rows: list[tuple[int, float]]) -> float:
    return sum(v for _, v in rows) / len(rows)


def stage_state(swarm, stage: int) -> dict:
    status = swarm.status() or {}
    return next((s for s in status.get("stages", []) if s["stage"] == stage), {})


@pytest.mark.slow
def test_middle_stage_lost_bypassed_and_rebuilt_by_checkfree(swarm_factory) -> None:
    swarm = swarm_factory(spec_with(**SPEC), [0, 1, 2, 2, 3])
    wait_for("30 steps", lambda: step_of(swarm) >= 30, 240, swarm)
    before = mean_loss(losses(swarm)[-5:])
    for victim in swarm.peers[2:4]:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    at_kill = step_of(swarm)

    wait_for("stage 2 empty and marked for a rebuild",
             lambda: stage_state(swarm, 2).get("rebuild")
             and stage_state(swarm, 2).get("state") == "empty", 60, swarm)
    assert stage_state(swarm, 2)["rebuild"] == "checkfree", swarm.status()["stages"]
    events = (swarm.status() or {}).get("events", [])
    assert any(e["kind"] == "skip" and e["stage"] == 2 for e in events), events
    wait_for("5 steps through the bypass", lambda: step_of(swarm) >= at_kill + 5, 90, swarm)
    bypassed = [r for r in read_metrics(swarm.logs) if r["step"] > at_kill + 1]
    assert bypassed and all(r["visits"]["2"] == 0 for r in bypassed[-3:]), bypassed[-3:]
    assert all(r["completed"] > 0 for r in bypassed[-3:])

    bypass_level = mean_loss(losses(swarm)[-5:])  # stages 1 and 3 kept learning meanwhile
    snaps = swarm.work / "snapshots"
    swarm.add_peer(7, ["--stage", "2", "--grace", "10", "--snapshot-dir", str(snaps)])

    def rebuilt() -> bool:
        evs = (swarm.status() or {}).get("events", [])
        return any(e["kind"] == "rebuild" and e["stage"] == 2
                   and "weighted_average" in e["detail"] for e in evs)
    wait_for("the rebuild event of stage 2", rebuilt, 90, swarm)
    log = (swarm.logs / "peer7.log").read_text()
    assert "rebuilt without a replica: weighted_average from stages [1, 3]" in log, log[-2000:]
    assert "DEGRADED" not in log
    at_rebuild = step_of(swarm)

    def through_stage2_again() -> bool:
        rows = [r for r in read_metrics(swarm.logs) if r["step"] > at_rebuild]
        return len(rows) >= 3 and all(r["visits"]["2"] > 0 for r in rows[-3:])
    wait_for("paths through the rebuilt stage 2", through_stage2_again, 90, swarm)

    def recovered() -> bool:
        after = [x for x in losses(swarm) if x[0] > at_rebuild]
        level = mean_loss(after[-5:]) if len(after) >= 5 else float("inf")
        return level <= before + 0.02 and level <= bypass_level + 0.05
    wait_for(f"the loss back at its pre-failure level {before:.3f} (and at the bypass level "
             f"{bypass_level:.3f})", recovered, 150, swarm)
    wait_for("a periodic snapshot of stage 2", lambda: list(snaps.glob("stage2-step*.safetensors")),
             60, swarm)
