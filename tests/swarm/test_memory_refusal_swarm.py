"""End to end through real processes: a `shoal peer` whose device has room for no stage of the
run is refused at join with the figures (so the memory it measured reached the coordinator),
exits, and the coordinator's status shows why (coordinator/placement.py, protocols/memory.py;
docs/gpus.md)."""

from __future__ import annotations

import pytest

from protocols.memory import stage_bytes
from tests.polling import poll_until
from tests.swarm.local_swarm import logs_tail, spec_with

# Sequences of 64 Ki bytes in batches of 64 Ki: every stage's activations alone are terabytes
HUGE = {"model.seq_len": 65536, "pipeline.microbatch": 64, "pipeline.target_batch": 65536}


@pytest.mark.slow
def test_a_peer_too_small_for_every_stage_is_refused_and_the_status_says_why(swarm_factory
                                                                             ) -> None:
    spec = spec_with(**HUGE)
    assert min(stage_bytes(spec)) > 1 << 40  # more than any test machine has
    swarm = swarm_factory(spec, [])
    peer = swarm.add_peer(0)
    assert poll_until(lambda: peer.poll() is not None, 60, interval=0.3), logs_tail(swarm)
    assert peer.returncode != 0
    log = (swarm.logs / "peer0.log").read_text(errors="replace")
    assert "cannot join" in log and "available, and the smallest stage of this run" in log, log
    status = swarm.status() or {}
    refused = [e for e in status.get("events", []) if e["kind"] == "refuse"]
    assert len(refused) == 1 and "needs about" in refused[0]["detail"], status.get("events")
    assert not [p for p in status.get("peers", []) if p.get("live")]
