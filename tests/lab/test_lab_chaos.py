"""Chaos on the namespace lab: a real coordinator and 8 real peers survive a run of faults.

`shoal lab` (the CLI, as a user runs it) with 8 peer hosts on 25 Mbit/s links and 40 ms of
added one-way latency; the peers find the coordinator by mDNS across the bridge. The seeded
chaos scenario kills or preempts a third of the peers (each replaced 20 s later by a fresh peer
with a new identity), partitions one host for 20 s (longer than its lease) and heals it,
freezes one peer (SIGSTOP/SIGCONT), and restarts the coordinator once. The run must reach its
steps, the exported model must load, fewer than 5 % of the planned microbatches may be dropped
(end to end: their gradient never reached a step; see shoal/lab/command.py's microbatch_counts,
which also says why the coordinator's per-stage `discarded_graphs` is larger), every fault of
the schedule and its follow-ups (respawn, heal, thaw) must have fired, and at the end every
stage's replicas must hold one non-empty state hash (summary.json's `stage_hashes`). Nothing of
the lab may be left behind. The run's time is bounded only by the pytest timeout.

Slow (minutes) and root-only: CI runs it; elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from shoal.lab.network import netns_available
from shoal.lab.scenario import chaos, parse

pytestmark = [pytest.mark.slow, pytest.mark.root]
PEERS = 8
STEPS = 60
SEED = 1
GRACE = 8
STAGES = 2
FOLLOW_UP = {"kill": "spawn", "preempt": "spawn", "partition": "heal", "freeze": "thaw"}


def scheduled_faults() -> Counter:
    """(action, target) of every fault `--chaos SEED` schedules, with the follow-ups the runner
    adds (a respawn after a kill or preemption, a heal after a partition, a thaw after a
    freeze); the lab builds its schedule with the same call."""
    out: Counter = Counter()
    for f in parse(chaos(PEERS, STEPS, SEED, grace_s=GRACE)):
        out[(f.action, f.target)] += 1
        if f.action in FOLLOW_UP and ("respawn" in f.options or "for" in f.options):
            out[(FOLLOW_UP[f.action], f.target)] += 1
    return out


@pytest.mark.timeout(1200)
def test_chaos_run_completes_and_exports(tmp_path):
    why = netns_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "lab"
    cmd = [sys.executable, "-m", "shoal.cli", "lab", "--hosts", str(PEERS), "--stages",
           str(STAGES), "--steps", str(STEPS), "--mbit", "25", "--delay-ms", "40", "--chaos",
           str(SEED), "--mdns", "--grace", str(GRACE), "--out", str(out), "--timeout", "900",
           "--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.seq_len=32"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1100,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(p.stdout[-4000:], p.stderr[-4000:])
    print(chaos(PEERS, STEPS, SEED, grace_s=GRACE))
    assert (out / "summary.json").exists(), f"no summary (exit {p.returncode})"
    s = json.loads((out / "summary.json").read_text())
    print(json.dumps({k: s.get(k) for k in (
        "steps", "planned_microbatches", "dropped_microbatches", "dropped_ratio",
        "discarded_graphs", "rebuilt_stages", "faults", "faults_not_fired", "stage_hashes",
        "initial_loss", "final_loss")}, indent=1))
    assert s["completed"], f"the run stopped at step {s['steps']} of {STEPS}"

    # every scheduled fault fired, each once, and none failed
    failed = [f for f in s["faults"] if f["detail"].startswith("failed")]
    assert not failed, failed
    assert s["faults_not_fired"] == [], s["faults_not_fired"]
    fired = Counter((f["action"], f["target"]) for f in s["faults"])
    assert fired == scheduled_faults(), (fired, scheduled_faults())
    assert sum(a in ("kill", "preempt") for a, _ in fired.elements()) == round(PEERS / 3)

    # the replicas of every stage end bit-identical, with hashes that are known
    hashes = s["stage_hashes"]
    assert sorted(hashes) == [str(i) for i in range(STAGES + 1)], hashes
    for stage, replicas in hashes.items():
        assert replicas and all(replicas), f"stage {stage}: a hash is unknown: {replicas}"
        assert len(set(replicas)) == 1, f"stage {stage}: replicas differ: {replicas}"

    assert s["export_parameters"] > 0
    assert s["final_loss"] < s["initial_loss"]
    assert s["dropped_ratio"] < 0.05, (
        f"{s['dropped_microbatches']} of {s['planned_microbatches']} microbatches dropped")
    assert p.returncode == 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert s["lab"]["prefix"] not in left
