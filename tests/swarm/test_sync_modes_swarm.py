"""`sync.mode = demo` and `diloco` in real swarms on 127.0.0.1 (coordinator + peer processes).

Two block stages with two replicas each sync over the wire (one stage-0 driver: the driver
cannot yet bring a second stage-0 replica that starts a step late back into step). Checked: the
loss falls; the replicas of each stage end at the run's last step with equal state hashes
(DiLoCo: the last step is an outer step, and its hash covers the shared weights and the outer
momentum); sync bytes are counted under `sync:<mode>`; DiLoCo replicas, apart between outer
steps by design, are never taken for drifted ones.
"""

from __future__ import annotations

import re

import pytest

from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics
from tests.swarm.conftest import LAYOUT
from tests.swarm.local_swarm import (
    join_late_and_check,
    spec_with,
    step_of,
    wait_for,
    wait_replicas_agree,
)

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 32,
        "pipeline.stages": 2, "pipeline.microbatch": 4, "pipeline.target_batch": 16,
        "sync.timeout_s": 5.0, "membership.heartbeat_s": 0.5, "membership.lease_s": 8.0}
STEPS = 30


def train_and_check(swarm: Swarm, drop: float) -> dict[int, list[dict]]:
    mode = swarm.spec.sync.mode
    wait_for(f"{STEPS} steps of {mode}", lambda: step_of(swarm) >= STEPS, 150, swarm)
    rows = sorted((r for r in read_metrics(swarm.logs) if r.get("loss") is not None),
                  key=lambda r: r["step"])
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - drop, (mode, first, last)

    by = wait_replicas_agree(swarm, {s: LAYOUT.count(s) for s in (0, 1, 2)}, 20, step=STEPS)
    for stage in (1, 2):
        for p in by[stage]:
            assert p["bytes_by_kind"].get(f"sync:{mode}", 0) > 0, p
    return by


def test_demo_swarm_trains_and_replicas_agree(swarm_of) -> None:
    spec = RunSpec().replace(**{**TINY, "run.steps": STEPS, "sync.mode": "demo",
                                "sync.demo.lr": 3e-3, "sync.demo.topk": 8})
    train_and_check(swarm_of(spec), drop=0.3)


@pytest.mark.slow
def test_delayed_demo_swarm_trains_and_replicas_agree_after_the_flush(swarm_of) -> None:
    """sync.demo.delayed: each step's round runs behind the next step and lands one step late;
    the last step flushes, so the replicas end on one hash, and none is taken for drifted."""
    spec = RunSpec().replace(**{**TINY, "run.steps": STEPS, "sync.mode": "demo",
                                "sync.demo.lr": 3e-3, "sync.demo.topk": 8,
                                "sync.demo.delayed": True})
    swarm = swarm_of(spec)
    train_and_check(swarm, drop=0.3)
    logs = "".join(f.read_text() for f in swarm.logs.glob("peer*.log"))
    assert "re-downloading" not in logs


@pytest.mark.slow
def test_delayed_demo_late_joiner_catches_up(swarm_factory) -> None:
    """A replica that joins while a round is in flight has no part in it: it is found out by
    the hash check, downloads once more, and then trains in step with its stage."""
    swarm = swarm_factory(spec_with(**{"sync.mode": "demo", "sync.demo.lr": 3e-3,
                                       "sync.demo.topk": 8, "sync.demo.delayed": True}),
                          [0, 1, 2])
    assert "downloaded state" in join_late_and_check(swarm, more_steps=10)


def test_diloco_swarm_trains_and_replicas_agree_after_outer_steps(swarm_of) -> None:
    spec = RunSpec().replace(**{**TINY, "run.steps": STEPS, "sync.mode": "diloco",
                                "sync.diloco.inner_steps": 5, "sync.diloco.inner_lr": 3e-3,
                                "sync.diloco.inner_weight_decay": 0.0})
    swarm = swarm_of(spec)
    train_and_check(swarm, drop=0.3)
    logs = "".join(f.read_text() for f in swarm.logs.glob("peer*.log"))
    assert "re-downloading" not in logs  # replicas apart between outer steps is not drift


@pytest.mark.slow
def test_bandwidth_bench_small(capsys) -> None:
    """bench/bandwidth.py end to end at a small size (13 short swarms, ~3.5 minutes)."""
    from bench import bandwidth

    assert bandwidth.main(["--steps", "6", "--warmup", "3", "--inner-steps", "3",
                           "--stream-h", "4", "--fragments", "2", "--delay", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"bandwidth: allreduce/demo = ([\d.]+), allreduce/diloco = ([\d.]+), "
                     r"spsa_bytes_per_step = ([\d.]+), allreduce/streaming = ([\d.]+)",
                     lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) > 50 and float(m.group(2)) > 3 * 0.9 * 3
    assert 0 < float(m.group(3)) <= 16
    assert float(m.group(4)) > 4 * 8 * 0.9  # int4 at H = 4: 8x fewer bytes per value, / H
    assert "streaming loss gap vs allreduce = " in lines[-2]


def test_async_diloco_swarm_trains_and_replicas_agree_after_the_flush(swarm_of) -> None:
    """sync.diloco.delayed: each outer round runs behind the next inner steps and lands one
    round late; the run's last outer step flushes, so the replicas end on one hash."""
    spec = RunSpec().replace(**{**TINY, "run.steps": STEPS, "sync.mode": "diloco",
                                "sync.diloco.inner_steps": 5, "sync.diloco.inner_lr": 3e-3,
                                "sync.diloco.inner_weight_decay": 0.0,
                                "sync.diloco.delayed": True})
    swarm = swarm_of(spec)
    train_and_check(swarm, drop=0.3)
    logs = "".join(f.read_text() for f in swarm.logs.glob("peer*.log"))
    assert "re-downloading" not in logs


@pytest.mark.slow
def test_streaming_diloco_swarm_trains_and_replicas_agree(swarm_of) -> None:
    """sync.diloco.streaming_fragments: 2 fragments synced in turn every 5 steps over the wire
    in int4, each merged (alpha 0.5) one step later; the replicas share one hash at the end."""
    spec = RunSpec().replace(**{**TINY, "run.steps": STEPS, "sync.mode": "diloco",
                                "sync.diloco.inner_steps": 10, "sync.diloco.inner_lr": 3e-3,
                                "sync.diloco.inner_weight_decay": 0.0,
                                "sync.diloco.quant": "int4",
                                "sync.diloco.streaming_fragments": 2,
                                "sync.diloco.streaming_delay": 1})
    swarm = swarm_of(spec)
    train_and_check(swarm, drop=0.3)
    logs = "".join(f.read_text() for f in swarm.logs.glob("peer*.log"))
    assert "re-downloading" not in logs
