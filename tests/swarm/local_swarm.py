"""Reading a local swarm (shoal/local.py's `Swarm`) from outside, as the swarm tests do.

Everything here goes through what a user sees: the coordinator's /api/status, the peers' metrics
files and logs. Waits are bounded polls that fail with the tail of every log; none of them is a
timing assertion (a bound only turns a hang into a failure).

The check every swarm test ends with is `replicas_agree`: each stage has the replicas the test
expects, all at one step with one non-empty state hash (an empty hash means "not known yet",
never "equal").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

from protocols.coordinator_client import READY_STATES
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics
from tests.polling import poll_until

TINY = {"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 32,
        "pipeline.stages": 2, "pipeline.microbatch": 4, "pipeline.target_batch": 16,
        "optim.lr": 3e-3, "sync.timeout_s": 5.0, "membership.heartbeat_s": 0.5,
        "membership.lease_s": 4.0}

# Peers that hold a stage and report its state (a "lost" or "left" entry keeps stale stats).
HOLDING = READY_STATES


def spec_with(**changes: object) -> RunSpec:
    return RunSpec().replace(**{**TINY, **changes})


def logs_tail(swarm: Swarm, chars: int = 1500) -> str:
    return "\n".join(f"--- {f.name}\n" + _tail(f.read_text(errors="replace"), chars)
                     for f in sorted(swarm.logs.glob("*.log")))


def _tail(text: str, chars: int) -> str:
    """The last `chars` of a log, and before them its last task dump (see `dump_tasks`) whole,
    up to 8000 characters, when the tail does not already hold it."""
    at = text.rfind("SIGUSR1: ")
    if at < 0 or at >= len(text) - chars:
        return text[-chars:]
    return text[at:at + 8000] + "\n[…]\n" + text[-chars:]


def dump_tasks(swarm: Swarm, settle_s: float = 1.0) -> None:
    """SIGUSR1 to every live peer of `swarm`: each logs where its tasks wait
    (peer/machine.py), so a failed wait shows what a stalled peer was stuck on."""
    sent = False
    for p in swarm.peers:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGUSR1)
                sent = True
    if sent:
        time.sleep(settle_s)


def wait_for(what: str, pred: Callable[[], object], timeout: float, swarm: Swarm) -> object:
    """Poll `pred` until it returns something true (returned); fail after `timeout` seconds."""
    value = poll_until(pred, timeout, interval=0.3)
    if value:
        return value
    dump_tasks(swarm)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                         f"{logs_tail(swarm)}")


def peers_by_stage(swarm: Swarm) -> dict[int, list[dict]]:
    """/api/status peers by stage, every state included."""
    status = swarm.status() or {}
    out: dict[int, list[dict]] = {}
    for p in status.get("peers", []):
        out.setdefault(p["stage"], []).append(p)
    return out


def holders(swarm: Swarm) -> dict[int, list[dict]]:
    """The live peers that hold each stage (state training or rebuilt)."""
    return {s: [p for p in reps if p["live"] and p["state"] in HOLDING]
            for s, reps in peers_by_stage(swarm).items()}


def step_of(swarm: Swarm) -> int:
    return max((r["step"] for r in read_metrics(swarm.logs)), default=0)


def replicas_agree(swarm: Swarm, counts: dict[int, int], step: int | None = None
                   ) -> dict[int, list[dict]] | None:
    """`holders` if every stage in `counts` has exactly that many holders, all at one step
    (`step` when given) with one non-empty state hash; else None (poll it with wait_for)."""
    by = holders(swarm)
    for s, n in counts.items():
        reps = by.get(s, [])
        if len(reps) != n or not reps[0]["state_hash"]:
            return None
        if {(p["step"], p["state_hash"]) for p in reps} != {(reps[0]["step"],
                                                              reps[0]["state_hash"])}:
            return None
        if step is not None and reps[0]["step"] != step:
            return None
    return by


def describe(by: dict[int, list[dict]]) -> str:
    return "; ".join(f"stage {s}: " + ", ".join(
        f"{p['peer_id'][:8]} {p['state']} step {p['step']} hash {p['state_hash'][:12] or '-'}"
        for p in reps) for s, reps in sorted(by.items()))


def wait_replicas_agree(swarm: Swarm, counts: dict[int, int], timeout: float,
                        step: int | None = None) -> dict[int, list[dict]]:
    """Wait (bounded) for `replicas_agree`; the failure names every replica's step and hash."""
    try:
        by = wait_for(f"replicas of stages {sorted(counts)} ({counts}) at one step with one "
                      f"non-empty hash" + (f" (step {step})" if step is not None else ""),
                      lambda: replicas_agree(swarm, counts, step), timeout, swarm)
    except AssertionError as exc:
        raise AssertionError(f"{describe(peers_by_stage(swarm))}\n{exc}") from None
    assert isinstance(by, dict)
    return by


@contextlib.contextmanager
def frozen(procs: list[subprocess.Popen]) -> Iterator[None]:
    """SIGSTOP `procs` (the stage-0 drivers) for the block: no step can start, so replicas of a
    run without a last step settle on one step. SIGCONT after, whatever happened."""
    stopped = []
    try:
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
            stopped.append(p)
        yield
    finally:
        for p in stopped:
            os.kill(p.pid, signal.SIGCONT)


def check_replicas_of_an_endless_run(swarm: Swarm, drivers: list[subprocess.Popen],
                                     counts: dict[int, int], timeout: float = 60
                                     ) -> dict[int, list[dict]]:
    """The end check of a run without `run.steps`: stage 0's replicas agree while they drive,
    then, with the drivers frozen, every block stage's replicas settle on one step and hash."""
    wait_replicas_agree(swarm, {s: n for s, n in counts.items() if s == 0}, timeout)
    with frozen(drivers):
        return wait_replicas_agree(swarm, {s: n for s, n in counts.items() if s > 0}, timeout)


def join_late_and_check(swarm: Swarm, more_steps: int = 5, index: int = 5, stage: int = 2
                        ) -> str:
    """A replica of `stage` added to a running 3-peer swarm ([0, 1, 2]) once it has stepped 4
    times: it trains, the swarm steps `more_steps` more, and then every stage's replicas settle
    on one hash (check_replicas_of_an_endless_run). Returns the joiner's log."""
    wait_for("4 steps", lambda: step_of(swarm) >= 4, 120, swarm)
    swarm.add_peer(index, ["--stage", str(stage), "--grace", "10"])

    def joined() -> bool:
        reps = holders(swarm).get(stage, [])
        return len(reps) == 2 and min(p["step"] for p in reps) > 0
    wait_for("the late joiner training", joined, 90, swarm)
    at = step_of(swarm)
    wait_for(f"{more_steps} more steps with the joiner",
             lambda: step_of(swarm) >= at + more_steps, 90, swarm)
    # Replicas step many times a second here, so two heartbeats rarely show one step: the
    # check freezes the stage-0 driver (SIGSTOP), and both replicas of the stage must settle on
    # the same step with the same hash.
    check_replicas_of_an_endless_run(swarm, swarm.peers[:1],
                                     {s: 2 if s == stage else 1 for s in (0, 1, 2)})
    return (swarm.logs / f"peer{index}.log").read_text()
