"""`shoal lab --nat` runs (root only): peers behind their own NAT take part in training.

The smoke run: 4 peer hosts, peer3 behind a NAT and placed at stage 0 (a driver, which only
dials out, so it trains without any relay). It must complete, the NAT'd peer must have trained
(its own step rows), the coordinator must not call it directly reachable (it cannot dial in),
and summary.json must carry the NAT fields: `lab.nat`, per peer `peers_reach` rows with
`reachable`, `relayed_bytes` and `direct_bytes`. Nothing of the lab may be left behind.

The slow run puts a block replica (stage 1) behind the NAT: calls into it can only arrive
through a relay (the coordinator's, by default). It must be called `relayed`, train to the
end, and the coordinator's relay must have carried its training calls (`relayed_bytes` well
above what the dial-back's pings and the keep-alives take).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.lab.network import netns_available

pytestmark = pytest.mark.root
REACH = {"direct", "relayed", "unreachable", ""}


def run_lab(out: Path, nat: str, place: str, steps: int, timeout: int) -> dict:
    why = netns_available()
    if why:
        pytest.skip(why)
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    cmd = [sys.executable, "-m", "shoal.cli", "lab", "--hosts", "4", "--nat", nat, "--place",
           place, "--steps", str(steps), "--mbit", "25", "--delay-ms", "20", "--out", str(out),
           "--no-export", "--timeout", str(timeout)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
    print(p.stdout[-3000:], p.stderr[-3000:])
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(after.split()) == sorted(before.split()), "the lab left namespaces behind"
    assert p.returncode == 0, f"shoal lab exited {p.returncode}; logs in {out / 'logs'}"
    return json.loads((out / "summary.json").read_text())


def trained_steps(out: Path, host: str) -> int:
    rows = [json.loads(x) for f in (out / "logs").glob(f"{host}-*.metrics.jsonl")
            for x in f.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in rows), default=0)


def row_of(summary: dict, host: str) -> dict:
    rows = [r for r in summary["peers_reach"] if r["host"] == host and r["live"]]
    assert len(rows) == 1, summary["peers_reach"]
    return rows[0]


@pytest.mark.timeout(900)
def test_nat_driver_trains_and_summary_has_reach_fields(tmp_path):
    steps = 8
    s = run_lab(tmp_path / "lab", "peer3", "peer3=0", steps, 600)
    assert s["completed"] and s["steps"] >= steps
    assert s["lab"]["nat"] == ["peer3"]
    assert isinstance(s["relayed_bytes"], int) and s["relayed_bytes"] >= 0
    assert isinstance(s["direct_bytes"], int) and s["direct_bytes"] > 0
    assert s["relayed_bytes_metric"]
    assert {r["host"] for r in s["peers_reach"] if r["live"]} == {"peer1", "peer2", "peer3",
                                                                   "peer4"}
    assert all(r["reachable"] in REACH for r in s["peers_reach"])
    nat = row_of(s, "peer3")
    assert nat["behind_nat"] and nat["stage"] == 0
    assert nat["reachable"] != "direct", "nothing can dial in to a NAT'd peer"
    assert not any(r["behind_nat"] for r in s["peers_reach"] if r["host"] != "peer3")
    assert trained_steps(tmp_path / "lab", "peer3") >= steps - 1, "the NAT'd driver did not train"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_nat_block_replica_trains_through_the_relay(tmp_path):
    steps = 30  # the dial-back takes its deadline (~20 s) before the replica is relayed
    out = tmp_path / "lab"
    s = run_lab(out, "peer4", "peer4=1", steps, 900)
    assert s["completed"]
    nat = row_of(s, "peer4")
    assert nat["behind_nat"] and nat["stage"] == 1
    assert nat["reachable"] == "relayed", nat
    # more than the dial-back's pings and the keep-alives: training calls went through it
    assert s["relayed_bytes"] > 100_000, (s["relayed_bytes"], s["relayed_bytes_metric"])
    assert (nat["step"] or 0) >= steps - 1, f"the NAT'd replica did not train: {nat}"
    assert s["final_loss"] < s["initial_loss"]
