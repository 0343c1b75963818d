"""Durable checkpoints in a real swarm: the run survives losing every peer.

A coordinator started with `--checkpoint-every 5 --checkpoint-dir DIR` and three peers (stages
0, 1, 2) train a run of 13 steps: checkpoints at steps 5 and 10, then three more steps, after
which the driver idles. Every peer is then killed (SIGKILL, the ones this test started, by pid);
once the coordinator has expired them, three new peers with new identities start with
`--resume DIR` (block stages first, so the driver's first step goes through them). Checks:

- the new peers take their stages from the checkpoint (their logs say so, at its step N = 10),
  and the new driver's steps are N + 1 .. 13: the run continues from the checkpoint's step,
  although the coordinator remembers the lost swarm at step 13;
- the loss of step N + 1 equals the one the old driver logged for it, within 1e-6 (measured:
  bit-equal). Both are the mean loss of the same microbatches (a batch is a function of the step
  and the seed) through the same weights: the checkpoint's bytes are the old swarm's state after
  step N;
- the losses of steps N + 2 .. 13 equal the old ones within 1e-4: those went through updates
  with the checkpoint's AdamW moments and step count (without them one update moves weights by
  ~5e-3: tests/peer/test_durable_checkpoint.py). The slack is for gradient sums whose
  microbatches arrive in another order (several are in flight at once), float noise only
  (measured: bit-equal here too).

The coordinator-served path (`checkpoint.init`) is tested against a real coordinator process
in tests/peer/test_durable_checkpoint.py, without a swarm (the slow pass has little room).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from shoal.swarm import Swarm
from tests.swarm.local_swarm import holders, spec_with, wait_for

EVERY = 5
STEPS = 2 * EVERY + 3  # the run's length: its last checkpoint is at 10, three steps before
N = STEPS - 3


def index_step(ckpt: Path) -> int:
    try:
        return json.loads((ckpt / "index.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def losses_of(swarm: Swarm, peer: int) -> dict[int, float]:
    f = swarm.logs / f"peer{peer}.metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def kill(procs) -> None:
    for p in procs:  # SIGKILL only the processes this test started, by pid
        p.send_signal(signal.SIGKILL)
        p.wait()


def resume(swarm: Swarm, first: int, flags: list[str], reference: dict[int, float],
           where: str) -> None:
    """Start peers `first`.. (stages 1, 2, then 0) with `flags`; check they continue the run
    from the checkpoint of step N with the losses of `reference` (see the module docstring)."""
    for i, stage in ((first + 1, 1), (first + 2, 2)):  # blocks first
        swarm.add_peer(i, ["--stage", str(stage), "--grace", "5", *flags])
    wait_for("stages 1 and 2 resumed",
             lambda: all(holders(swarm).get(s) for s in (1, 2)), 60, swarm)
    swarm.add_peer(first, ["--stage", "0", "--grace", "5", *flags])
    wait_for(f"the resumed run at step {STEPS}",
             lambda: max(losses_of(swarm, first), default=0) >= STEPS, 60, swarm)
    for i in range(first, first + 3):
        log = (swarm.logs / f"peer{i}.log").read_text()
        assert f"resumed from the checkpoint in {where} at step {N}" in log, log[-2000:]
    resumed = losses_of(swarm, first)
    print(f"resumed from {where} at step {N}: losses {resumed}, before {reference}")
    assert sorted(resumed) == list(range(N + 1, STEPS + 1)), sorted(resumed)
    assert abs(resumed[N + 1] - reference[N + 1]) <= 1e-6, (resumed, reference)
    # the steps after it went through updates with the checkpoint's AdamW moments and step count
    for step in range(N + 2, STEPS + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-4, (step, resumed, reference)


@pytest.mark.slow
def test_every_peer_lost_then_resumed_from_the_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    # a lease that outlasts a new peer's start on a busy machine (building its stage holds its
    # heartbeats back for seconds): a lapsed driver is refused by the blocks until they see its
    # new certificate, and its steps bypass them, which is no longer the same computation
    spec = spec_with(**{"run.steps": STEPS, "membership.heartbeat_s": 1.0,
                        "membership.lease_s": 10.0})
    swarm = Swarm(tmp_path / "swarm", spec, 0, None, "cpu")
    swarm.coordinator_args = ["--checkpoint-every", str(EVERY), "--checkpoint-dir", str(ckpt)]
    try:
        swarm.start(0)
        for i, stage in enumerate([0, 1, 2]):
            swarm.add_peer(i, ["--stage", str(stage), "--grace", "5"])
        # The run stops by itself after STEPS: the index (step N) and the driver's logged losses
        # then hold still, with steps N + 1 .. STEPS logged by the old swarm.
        wait_for(f"the old run at step {STEPS} and its checkpoint of step {N}",
                 lambda: max(losses_of(swarm, 0), default=0) >= STEPS
                 and index_step(ckpt) == N, 90, swarm)
        reference = losses_of(swarm, 0)
        kill(list(swarm.peers))
        assert index_step(ckpt) == N
        complete = sorted(d.name for d in ckpt.iterdir() if (d / "index.json").is_file())
        assert complete == [f"step-{EVERY:09d}", f"step-{N:09d}"], complete

        def all_lost() -> bool:
            peers = (swarm.status() or {}).get("peers", [])
            return bool(peers) and not any(p["live"] for p in peers)
        wait_for("the coordinator to expire every old peer", all_lost, 40, swarm)
        resume(swarm, 10, ["--resume", str(ckpt)], reference, str(ckpt))
    finally:
        swarm.stop(grace=5)
