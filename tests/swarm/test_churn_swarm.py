"""Churn on a real local swarm: a replica that misses rounds catches up by replaying them.

A block replica is frozen (SIGSTOP) for several rounds, each of which its stage's aggregator
closes without it after the sync timeout; thawed (SIGCONT), it learns from the next EndStep that
it is behind, fetches the aggregates of the rounds it missed from the other replica
(peer/sync/replay.py) and trains again, without downloading its stage. The run then ends with
the stage's replicas at one step and one hash.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.swarm.local_swarm import (
    check_replicas_of_an_endless_run,
    peers_by_stage,
    spec_with,
    step_of,
    wait_for,
)

# the rounds replayed as an EndStep came in, or in the background after falling behind
CAUGHT_UP = re.compile(r"(?:caught up by replaying|replayed) (\d+) rounds"
                       r"(?: for EndStep\((\d+)\))?, after step (\d+)")
FIRST_END = re.compile(r"EndStep\((\d+)\)")
JOINED = re.compile(r"joined \S+ as ([0-9a-f]{8}) at")


def stage1_replica(swarm, role: str) -> int:
    """The index in swarm.peers (1 or 2) of stage 1's round aggregator (its senior replica:
    earliest joined_at, then peer id) or of its other replica."""
    ids = {i: JOINED.search((swarm.logs / f"peer{i}.log").read_text(errors="replace"))
           for i in (1, 2)}
    members = {p["peer_id"][:8]: p for p in peers_by_stage(swarm).get(1, [])}
    senior = min((1, 2), key=lambda i: (members[ids[i].group(1)]["joined_at"], ids[i].group(1)))
    return senior if role == "aggregator" else 3 - senior


@pytest.mark.slow
@pytest.mark.parametrize("role", ["member", "aggregator"])
def test_a_frozen_replica_catches_up_by_replay_without_a_download(swarm_factory, role) -> None:
    # a lease longer than the freeze: the replica stays a member, it only misses rounds
    spec = spec_with(**{"sync.timeout_s": 2.0, "membership.lease_s": 120.0})
    swarm = swarm_factory(spec, [0, 1, 1, 2])
    wait_for("3 steps", lambda: step_of(swarm) >= 3, 120, swarm)
    i = stage1_replica(swarm, role)
    victim, log = swarm.peers[i], swarm.logs / f"peer{i}.log"
    frozen_at = step_of(swarm)
    os.kill(victim.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:  # each of these rounds waits out the sync timeout for the frozen replica
        wait_for("3 steps without the frozen replica", lambda: step_of(swarm) >= frozen_at + 3,
                 120, swarm)
        # and longer than the sync timeout (the case): 3 steps can pass in less
        time.sleep(max(0.0, stopped_at + 1.5 * spec.sync.timeout_s - time.monotonic()))
    finally:
        # read while it is stopped: thawed, it logs its catch-up within milliseconds
        seen = len(log.read_text(errors="replace"))
        os.kill(victim.pid, signal.SIGCONT)

    thawed_at = step_of(swarm)
    victim_id = JOINED.search(log.read_text(errors="replace")).group(1)

    def caught_up() -> str | None:
        """Evidence that the thawed replica is at the swarm's step again: a catch-up line
        (replay, or the others' aggregate) reaching the step its first EndStep after the thaw
        named, or, when every missed round came back as replies to the late parts of the
        EndSteps queued while it slept (no line is logged for those), its own reported step
        past the swarm's step at the thaw."""
        text = log.read_text(errors="replace")
        first_end = FIRST_END.search(text, seen)
        if first_end is not None:
            swarm_step = int(first_end.group(1))
            for m in CAUGHT_UP.finditer(text, seen):
                if int(m.group(3)) >= swarm_step - 1:
                    assert int(m.group(3)) <= swarm_step + 5, (m.group(0), swarm_step)
                    return m.group(0)
        me = next((p for p in peers_by_stage(swarm).get(1, [])
                   if p["peer_id"].startswith(victim_id)), None)
        if me is not None and me["state"] == "training" and me["step"] > thawed_at:
            return f"reported step {me['step']} (the swarm was at {thawed_at} at the thaw)"
        return None

    how = wait_for("the thawed replica back at the swarm's step", caught_up, 90, swarm)
    print(f"frozen after step {frozen_at}; thawed at step {thawed_at}: {how}")
    # The rounds closed without it come back three ways, none a download: as replies to the
    # late parts of the EndSteps queued while it slept (the aggregator answers them with the
    # kept aggregate), as the others' aggregate when it was the aggregator itself (it asks
    # whether they closed the round without it), or by replay; which mix depends on timing.
    at = step_of(swarm)
    wait_for("5 more steps", lambda: step_of(swarm) >= at + 5, 120, swarm)
    since_thaw = log.read_text(errors="replace")[seen:]
    assert "downloaded state" not in since_thaw, since_thaw[-3000:]
    check_replicas_of_an_endless_run(swarm, swarm.peers[:1], {0: 1, 1: 2, 2: 1})
