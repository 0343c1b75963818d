"""A killed block replica is dropped from the swarm by its neighbours' reports, not its lease.

Real processes: a coordinator, two replicas of the one block stage and the stage-0 driver, with a
lease of 60 s. One replica is killed (SIGKILL): the driver's calls to it are refused, its next
heartbeat says so (peer/pipeline/unreachable.py), and the coordinator, seeing the replica also
silent for two of its beats, expires it (coordinator/suspicion.py) with an event that names the
reporter: a lapsed lease would say "silent for" instead, and could not come for a minute.
Training goes on with the other replica.
"""

from __future__ import annotations

import re
import signal

from tests.swarm.local_swarm import spec_with, step_of, wait_for

JOINED_AT = re.compile(r"joined \S+ as [0-9a-f]{8} at \S+:(\d+)")


def test_a_killed_replica_is_expired_on_its_neighbours_reports(swarm_factory) -> None:
    spec = spec_with(**{"pipeline.stages": 1, "membership.heartbeat_s": 1.0,
                        "membership.lease_s": 60.0})
    swarm = swarm_factory(spec, [1, 1, 0])
    wait_for("3 steps", lambda: step_of(swarm) >= 3, 120, swarm)
    status = swarm.status() or {}
    victim_id = next(p["peer_id"] for p in status["peers"]
                     if p["stage"] == 1 and p["address"].endswith(f":{port_of(swarm, 0)}"))
    swarm.peers[0].send_signal(signal.SIGKILL)
    swarm.peers[0].wait()
    at_kill = step_of(swarm)

    def reported_expiry() -> dict | None:
        return next((e for e in (swarm.status() or {}).get("events", [])
                     if e["kind"] == "expire" and e["peer_id"] == victim_id), None)
    event = wait_for("the killed replica's expiry", reported_expiry, 50, swarm)
    assert isinstance(event, dict) and "unreachable (reported by peer" in event["detail"], event
    wait_for("3 more steps on the other replica", lambda: step_of(swarm) >= at_kill + 3, 120,
             swarm)


def port_of(swarm, i: int) -> int:
    """The gRPC port peer `i` logged it joined at."""
    text = (swarm.logs / f"peer{i}.log").read_text(errors="replace")
    m = JOINED_AT.search(text)
    assert m, text[-2000:]
    return int(m.group(1))
