"""A replica respawned on a thin link catches up although its stage steps faster than it
downloads (root, slow).

Four lab hosts, sync DeMo (small rounds, a large state): peer1 drives (stage 0), peer2 holds
stage 1, peer3 and peer4 hold stage 2. Once
the swarm trains, peer4's peer is killed, its link shaped down to 4 Mbit/s, and a fresh peer
(new identity) started there. Its download of stage 2 takes longer than a step, so it lands
steps behind; it then replays the rounds it missed from peer3 (peer/sync/replay.py) instead of
downloading again and again, trains again, and at the end stage 2's replicas hold one state.
The download and step times are printed, not asserted.
"""

from __future__ import annotations

import re
import signal

import pytest

from protocols.runspec import RunSpec
from shoal.lab.network import LabNetwork, netns_available
from shoal.lab.swarm import COORD_HOST, LabSwarm
from shoal.swarm import read_metrics
from tests.polling import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.root]

# the rounds replayed as an EndStep came in, or in the background after falling behind
CAUGHT_UP = re.compile(r"(?:caught up by replaying|downloaded, then replayed|replayed) (\d+) "
                       r"rounds(?: for EndStep\(\d+\))?, after step (\d+)")
DOWNLOADED = re.compile(r"downloaded state at step (\d+)")


def step_of(swarm: LabSwarm) -> int:
    return max((r["step"] for r in read_metrics(swarm.logs)), default=0)


def stage_replicas(swarm: LabSwarm, stage: int) -> list[dict]:
    return [p for p in (swarm.status() or {}).get("peers", [])
            if p["live"] and p["stage"] == stage and p["state"] in ("training", "rebuilt")]


@pytest.mark.timeout(900)
def test_a_respawned_replica_on_a_thin_link_catches_up_and_ends_equal(tmp_path) -> None:
    why = netns_available()
    if why:
        pytest.skip(why)
    spec = RunSpec().replace(**{"model.d_model": 96, "model.n_layers": 4, "model.n_heads": 4,
                                "model.seq_len": 32, "pipeline.stages": 2,
                                "pipeline.microbatch": 4, "pipeline.target_batch": 8,
                                "membership.heartbeat_s": 0.5, "membership.lease_s": 8.0,
                                "sync.timeout_s": 10.0, "sync.mode": "demo"})
    net = LabNetwork([COORD_HOST, "peer1", "peer2", "peer3", "peer4"], mbit=25.0)
    swarm = None
    try:
        net.create()
        swarm = LabSwarm(tmp_path, spec, net, delay_ms=20.0)
        swarm.start(stages={"peer1": 0, "peer2": 1, "peer3": 2, "peer4": 2})
        assert poll_until(lambda: step_of(swarm) >= 5, 300), "the lab swarm does not train"
        swarm.kill("peer4")
        net.shape("peer4", 4.0)
        killed_at = step_of(swarm)
        assert poll_until(lambda: step_of(swarm) >= killed_at + 3, 120)
        log = swarm.logs / "peer4.log"
        seen = len(log.read_text(errors="replace"))
        swarm.spawn_peer("peer4", ["--stage", "2"])
        respawned_at = step_of(swarm)

        def caught_up() -> re.Match | None:
            return CAUGHT_UP.search(log.read_text(errors="replace"), seen)
        match = poll_until(caught_up, 300)
        text = log.read_text(errors="replace")[seen:]
        assert match, f"the respawned replica never caught up:\n{text[-4000:]}"
        downloads = DOWNLOADED.findall(text)
        print(f"respawned at swarm step {respawned_at}; downloads at steps {downloads}; "
              f"{match.group(0)}")
        assert 1 <= len(downloads) <= 2, text[-4000:]  # not a chase of re-downloads
        # it trains on: ten more steps without falling behind again
        after = int(match.group(2))
        assert poll_until(lambda: step_of(swarm) >= after + 10, 240), "training stopped"
        later = log.read_text(errors="replace")[seen + match.end():]
        assert "re-downloading" not in later and "replaying" not in later, later[-4000:]
        # it trains: it is a ready replica of stage 2 at the others' step, with their hash
        driver = swarm.on_host["peer1"]
        driver.send_signal(signal.SIGSTOP)  # no new step: the replicas settle
        try:
            def equal() -> list[dict] | None:
                reps = stage_replicas(swarm, 2)
                same = len(reps) == 2 and len({(p["step"], p["state_hash"]) for p in reps}) == 1
                return reps if same and reps[0]["state_hash"] else None
            reps = poll_until(equal, 120)
            assert reps, stage_replicas(swarm, 2)
        finally:
            driver.send_signal(signal.SIGCONT)
        rows = read_metrics(swarm.logs)
        steps = sorted({r["step"] for r in rows if r["step"] > respawned_at})
        seconds = [r["seconds"] for r in rows if r["step"] > respawned_at]
        if seconds:
            print(f"{len(steps)} steps after the respawn, {sum(seconds) / len(seconds):.2f} s "
                  "per step on the driver")
    finally:
        if swarm is not None:
            swarm.stop(grace=5.0)
        net.destroy()
