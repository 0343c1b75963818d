"""Chaos on the namespace lab: a real coordinator and 8 real peers survive a run of faults.

`shoal lab` (the CLI, as a user runs it) with 8 peer hosts on 25 Mbit/s links and 40 ms of
added one-way latency; the peers find the coordinator by mDNS across the bridge. The seeded
chaos scenario kills or preempts a third of the peers (each replaced 20 s later by a fresh peer
with a new identity), partitions one host for 20 s (longer than its lease) and heals it,
freezes one peer (SIGSTOP/SIGCONT), and restarts the coordinator once. The run must reach its
steps, the exported model must load, fewer than 5 % of the planned microbatches may be dropped
(end to end: their gradient never reached a step; see shoal/lab/command.py's microbatch_counts,
which also says why the coordinator's per-stage `discarded_graphs` is larger), and the report
counts the stages that were rebuilt. Nothing of the lab may be left behind.

Slow (minutes) and root-only: CI runs it; elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shoal.lab.network import netns_available

pytestmark = [pytest.mark.slow, pytest.mark.root]
PEERS = 8
STEPS = 60
SEED = 1


@pytest.mark.timeout(1200)
def test_chaos_run_completes_and_exports(tmp_path):
    why = netns_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "lab"
    cmd = [sys.executable, "-m", "shoal.cli", "lab", "--hosts", str(PEERS), "--stages", "2",
           "--steps", str(STEPS), "--mbit", "25", "--delay-ms", "40", "--chaos", str(SEED),
           "--mdns", "--grace", "8", "--out", str(out), "--timeout", "900",
           "--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.seq_len=32"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1100,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(p.stdout[-4000:], p.stderr[-4000:])
    assert (out / "summary.json").exists(), f"no summary (exit {p.returncode})"
    s = json.loads((out / "summary.json").read_text())
    print(json.dumps({k: s[k] for k in ("steps", "planned_microbatches", "dropped_microbatches",
                                        "dropped_ratio", "discarded_graphs", "rebuilt_stages",
                                        "faults",
                                        "initial_loss", "final_loss")}, indent=1))
    fired = [f for f in s["faults"] if not f["detail"].startswith("failed")]
    actions = [f["action"] for f in fired]
    assert sum(a in ("kill", "preempt") for a in actions) == round(PEERS / 3)
    assert "partition" in actions and "heal" in actions and "restart" in actions
    assert s["completed"], f"the run stopped at step {s['steps']} of {STEPS}"
    assert s["export_parameters"] > 0
    assert s["final_loss"] < s["initial_loss"]
    assert "rebuilt_stages" in s
    assert s["dropped_ratio"] < 0.05, (
        f"{s['dropped_microbatches']} of {s['planned_microbatches']} microbatches dropped")
    assert p.returncode == 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert s["lab"]["prefix"] not in left
