"""A relay peer killed mid-run in `shoal lab` (root; slow): its NAT'd peers move to another relay.

Unit tests first (no root needed: pure functions): `--relay` is checked against the lab's hosts
and its NAT, and a `--nat` lab with no `--place` for a NAT'd host starts the last one at stage 1.

The slow run: 5 peer hosts, `--nat peer3,peer4`, `--relay peer2`; peer1, peer2 and peer5 are
stage-0 drivers (so killing the relay peer takes no stage with it, and two drivers are left to
end on one state hash), peer4 is the only replica of stage 1 and peer3 of stage 2, so every
call into a block stage is relayed and the relay peer carries training calls, not only pings.
The lab starts peer2 first and the others once the coordinator offers it as a relay, so the
two NAT'd peers are spread over the coordinator's relay and peer2's (the coordinator breaks the
tie towards its own, so one of them is peer2's). At step 20 peer2 is killed with SIGKILL and
*not* respawned: a respawned relay peer would come back at the same address (host:7100), and
the coordinator's sticky choice could re-attach the NAT'd peer there, which would not show a
move to another relay. Asserted from the coordinator's reports (summary.json `relay_track`,
polled every half second), the peers' logs and the delay relays' byte counters, never assumed:
a NAT'd peer was relayed by peer2 before the kill, peer2's relayed port carried more than
pings, and after the kill the same peer, in the same stage, was relayed by the coordinator;
the run reached its last step; both NAT'd peers trained to it; the coordinator relayed bytes;
every stage's replicas ended on one state hash. Nothing is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.lab.command import nat_default_place, parse_relay
from shoal.lab.network import netns_available

PEERS = [f"peer{i}" for i in range(1, 6)]
# the relay peer a driver beside peer1 (its loss takes no stage with it); stage 1 served only
# by the two NAT'd peers (every call into it is relayed, so the relay peer carries training
# calls, and its replica keeps stage 1 going while the other moves); stage 2 by peer5
PLACES = {"peer1": 0, "peer2": 0, "peer3": 1, "peer4": 1, "peer5": 2}
# room after a late outage: in one CI run both NAT'd stage-1 replicas fell behind at step 41
# (state downloads through the relay failing), the drivers bypassed stage 1, and it was back at
# step 57 of 60, one step inside the last five that must skip no stage
STEPS = 75
KILL_STEP = 20  # late enough for peer2's relay to carry training calls first
COORD_RELAY = "198.18.0.1:7000"  # the coordinator on host `coord`, gRPC port 7000
PEER2_RELAY = "198.18.0.3:7100"  # peer2's own server, where its Relay service is


def test_relay_hosts_are_checked():
    assert parse_relay(None, PEERS, ["peer3"]) == []
    assert parse_relay("peer2, peer1", PEERS, ["peer3"]) == ["peer2", "peer1"]
    with pytest.raises(SystemExit, match="behind the lab's NAT"):
        parse_relay("peer3", PEERS, ["peer3", "peer4"])
    with pytest.raises(SystemExit, match="not a peer host"):
        parse_relay("coord", PEERS, [])
    with pytest.raises(SystemExit, match="named twice"):
        parse_relay("peer1,peer1", PEERS, [])


def test_nat_default_places_the_last_natd_host_at_a_block_stage():
    places, note = nat_default_place(["peer3", "peer4"], {"peer2": 0}, 2)
    assert places == {"peer2": 0, "peer4": 1}
    assert "peer4" in note and "--place peer4=STAGE overrides" in note
    # any --place naming a NAT'd host wins, and without NAT nothing changes
    assert nat_default_place(["peer3", "peer4"], {"peer3": 0}, 2) == ({"peer3": 0}, "")
    assert nat_default_place([], {"peer1": 2}, 2) == ({"peer1": 2}, "")


def log_of(out: Path, host: str) -> str:
    return (out / "logs" / f"{host}.log").read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(900)
def test_a_relay_peer_killed_mid_run_moves_its_natd_peer_and_the_run_completes(tmp_path):
    why = netns_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "lab"
    places = [x for h, stage in PLACES.items() for x in ("--place", f"{h}={stage}")]
    cmd = [sys.executable, "-m", "shoal.cli", "lab", "--hosts", str(len(PEERS)), "--nat",
           "peer3,peer4", "--relay", "peer2", *places, "--steps", str(STEPS), "--mbit", "25",
           "--delay-ms", "20", "--fault",
           f"at step {KILL_STEP} kill peer2", "--no-export", "--out", str(out), "--timeout",
           "600", "--set", "model.d_model=64", "--set", "model.n_layers=2", "--set",
           "model.seq_len=32"]
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=800)
    print(p.stdout[-3000:], p.stderr[-3000:])
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(after.split()) == sorted(before.split()), "the lab left namespaces behind"
    assert "--nat: " not in p.stdout, "--place names the NAT'd hosts: no default placement"
    s = json.loads((out / "summary.json").read_text())
    track = s["relay_track"]
    print(json.dumps({k: s.get(k) for k in ("steps", "faults", "lab", "peers_reach",
                                            "relayed_bytes", "peer_relay_bytes",
                                            "stage_hashes")}, indent=1))
    print(json.dumps(track, indent=1))
    assert s["completed"] and p.returncode == 0, f"the run stopped at step {s['steps']}"
    assert s["lab"]["relay"] == ["peer2"] and s["lab"]["nat"] == ["peer3", "peer4"]
    (kill,) = s["faults"]
    assert (kill["action"], kill["target"]) == ("kill", "peer2"), kill
    assert not kill["detail"].startswith("failed"), kill

    # which NAT'd peer peer2 carried before the kill: the coordinator said so
    def relayed_by(name: str, relay: str, when) -> list[dict]:
        return [r for r in track.get(name, []) if r["relay"] == relay
                and r["reach"] == "relayed" and when(r["t"])]

    carried = [n for n in ("peer3-1", "peer4-1")
               if relayed_by(n, "peer2", lambda t: t < kill["t"])]
    assert carried, f"no NAT'd peer was relayed by peer2 before the kill: {track}"
    for name in carried:
        host = name.rpartition("-")[0]
        # ... and after it, the coordinator relays the same peer (its stage kept: below)
        moved = relayed_by(name, "coord", lambda t: t > kill["t"])
        assert moved, f"{name} was not relayed by the coordinator after the kill: {track[name]}"
        log = log_of(out, host)
        at_peer2 = log.find(f"relayed by {PEER2_RELAY}: others reach this peer at")
        lost = log.find(f"relay {PEER2_RELAY} is lost")
        at_coord = log.rfind(f"relayed by {COORD_RELAY}: others reach this peer at")
        assert -1 < at_peer2 < at_coord, f"{host}'s log does not show peer2's relay, then the " \
                                         f"coordinator's"
        print(f"{host}: lost-relay line at {lost} (-1: the coordinator named another relay "
              "before the peer gave up on peer2)")
    assert "relaying for peer" in log_of(out, "peer2")
    # training calls, not only the coordinator's dial-back pings (a few KB each)
    assert s["peer_relay_bytes"] > 200_000, f"peer2 carried {s['peer_relay_bytes']} bytes"
    assert s["relayed_bytes"] > 0

    # both NAT'd peers trained to the last step, in the stage they started in
    for host in ("peer3", "peer4"):
        (row,) = [r for r in s["peers_reach"] if r["host"] == host and r["live"]]
        assert row["behind_nat"] and row["reachable"] == "relayed", row
        assert row["relayed_by"] == "coord", row
        assert row["step"] >= STEPS, row
        stages = {r["stage"] for r in track[f"{host}-1"]}
        assert stages == {row["stage"]} == {PLACES[host]}, (host, track[f"{host}-1"])

    # the moved replica is back in the pipeline: the drivers' last steps skipped no stage
    for f in (out / "logs").glob("peer1-*.metrics.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        late = [(r["step"], r.get("skipped_stages")) for r in rows[-5:]]
        assert rows and not any(skipped for _, skipped in late), late

    hashes = s["stage_hashes"]
    assert sorted(hashes) == ["0", "1", "2"], hashes
    for stage, replicas in hashes.items():
        assert replicas and all(replicas), f"stage {stage}: a hash is unknown: {replicas}"
        assert len(set(replicas)) == 1, f"stage {stage}: replicas differ: {replicas}"
    assert len(hashes["1"]) == 2, f"stage 1 should end with peer3 and peer4: {hashes}"
    assert s["final_loss"] < s["initial_loss"]
