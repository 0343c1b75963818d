"""CheckFree+ rebuilds stage 0 in a real swarm on 127.0.0.1 (coordinator and peers as processes).

Two stage-0 replicas (the drivers: embedding, final norm, tied head) train with three block
stages under `pipeline.checkfree_plus`, so stages 1 and 3 keep a copy of stage 0 that they
refresh every few steps (peer/recovery/edge_copy.py). Both stage-0 replicas are killed (-9) at
once mid-run. The coordinator marks stage 0 for a "checkfree+" rebuild once their leases lapse;
a new peer joins stage 0 and rebuilds it from stage 1's copy (peer/recovery/rebuild.py).

How recovery is measured, from what the drivers record (their metrics files: one row per step,
each with the mean training loss of that driver's microbatches): the pre-failure level is the
mean loss of the last 5 steps the killed drivers completed; recovered means the new driver's
mean loss over 5 consecutive steps is within 2 % of it. What tells a rebuild from a restart from
the initial weights (what the run did before this fix): the new driver's very first steps are
already far below the loss of the run's first steps.
"""

from __future__ import annotations

import json
import re
import signal

import pytest

from tests.swarm.local_swarm import spec_with, step_of, wait_for

SPEC = {"model.n_layers": 3, "pipeline.stages": 3, "run.steps": 0,
        "pipeline.checkfree_plus": True,
        "membership.heartbeat_s": 1.0, "membership.lease_s": 8.0}
REBUILD_EVENT = re.compile(r"stage rebuilt \(checkfree\+\): edge_copy of stages 1 at step (\d+)")
WINDOW = 5


def rows_of(swarm, peers: list[int]) -> list[dict]:
    """The metrics rows (with a loss) of the drivers `peers` (peer<i>.metrics.jsonl)."""
    names = {f"peer{i}.metrics.jsonl" for i in peers}
    return [r for f in sorted(swarm.logs.glob("peer*.metrics.jsonl")) if f.name in names
            for line in f.read_text().splitlines() if line.strip()
            for r in [json.loads(line)] if r.get("loss") is not None]


def step_means(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, mean loss over the drivers that recorded it), by step."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(r["step"], []).append(r["loss"])
    return sorted((s, sum(v) / len(v)) for s, v in by.items())


def stage_state(swarm, stage: int) -> dict:
    return next((s for s in (swarm.status() or {}).get("stages", []) if s["stage"] == stage), {})


@pytest.mark.slow
def test_every_stage_zero_replica_lost_and_rebuilt_by_checkfree_plus(swarm_factory) -> None:
    swarm = swarm_factory(spec_with(**SPEC), [0, 0, 1, 2, 3])
    wait_for("30 steps", lambda: step_of(swarm) >= 30, 300, swarm)
    for victim in swarm.peers[:2]:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    before_rows = step_means(rows_of(swarm, [0, 1]))
    first = sum(v for _, v in before_rows[:3]) / 3  # the loss of the run's first steps
    before = sum(v for _, v in before_rows[-WINDOW:]) / WINDOW
    last_step = before_rows[-1][0]
    assert before < first - 0.3, (first, before)  # the loss has clearly moved

    wait_for("stage 0 empty and marked for a CheckFree+ rebuild",
             lambda: stage_state(swarm, 0).get("state") == "empty"
             and stage_state(swarm, 0).get("rebuild"), 90, swarm)
    assert stage_state(swarm, 0)["rebuild"] == "checkfree+", swarm.status()["stages"]
    copies = [(swarm.logs / f"peer{i}.log").read_text() for i in (2, 4)]
    assert all("copy of stage 0 refreshed" in log for log in copies)

    swarm.add_peer(7, ["--stage", "0", "--grace", "10"])

    def rebuild_event() -> dict | None:
        return next((e for e in (swarm.status() or {}).get("events", [])
                     if e["kind"] == "rebuild" and e["stage"] == 0), None)
    event = wait_for("the rebuild event of stage 0", rebuild_event, 120, swarm)
    assert isinstance(event, dict)
    m = REBUILD_EVENT.fullmatch(event["detail"])
    assert m, event
    assert int(m.group(1)) >= last_step - 1, (m.group(1), last_step)
    log = (swarm.logs / "peer7.log").read_text()
    assert "rebuilt without a replica: edge_copy from stages [1]" in log, log[-2000:]
    assert "DEGRADED" not in log

    def after() -> list[tuple[int, float]]:
        return step_means(rows_of(swarm, [7]))
    wait_for("3 steps of the new driver", lambda: len(after()) >= 3, 90, swarm)
    start = sum(v for _, v in after()[:3]) / 3
    # not a restart: a re-initialized stage 0 starts near the run's first loss
    assert start < before + 0.25 * (first - before), (first, before, start)

    def recovered() -> float | None:
        rows = after()
        means = [sum(v for _, v in rows[i:i + WINDOW]) / WINDOW
                 for i in range(len(rows) - WINDOW + 1)]
        return next((x for x in means if x <= 1.02 * before), None)
    level = wait_for(f"the loss back within 2 % of its pre-failure level {before:.4f}",
                     recovered, 120, swarm)
    print(f"stage 0 rebuilt: loss first steps {first:.4f}, pre-failure {before:.4f}, "
          f"new driver's first 3 steps {start:.4f}, recovered window {level:.4f}, "
          f"{len(after())} steps after the rebuild")
