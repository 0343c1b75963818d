"""`python -m bench.pipeline`: SWARM routing against round-robin on an unequal swarm.

Two block stages with two replicas each; one replica of stage 1 is 3x slower. On one machine
all peers share its CPUs, so real compute cannot show a slow *machine*: a slow replica's idle
time is simply used by the others. Each replica therefore runs the real model (small) and
holds its compute thread for a fixed time per sample (`shoal peer --simulate-speed`), as if it had
a machine of its own: 40 samples/s for the fast ones, 40/3 for the slow one. The same swarm (real
coordinator and peer processes on 127.0.0.1) trains the same steps twice: stage 0 routing by
smallest expected finish time (ALGORITHMS.md §1), then round robin. Samples/s is measured from
the stage-0 driver's own step timings, after a warm-up.

Last line: `pipeline: swarm/round_robin = R` (target R >= 1.3; R rounded down, bench/report.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.report import Target, machine, targets_line
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics

SPEC = {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 32,
        "pipeline.stages": 2, "pipeline.microbatch": 4, "pipeline.target_batch": 64,
        "sync.timeout_s": 20.0, "membership.heartbeat_s": 1.0, "membership.lease_s": 8.0}


FAST_RATE = 40.0
TARGET = Target("swarm/round_robin", 1.3)


def wait_for_steps(swarm: Swarm, steps: int, seconds: float, arm: str) -> None:
    """Until the stage-0 metrics reach `steps`; SystemExit naming the logs after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = read_metrics(swarm.logs)
        if rows and rows[-1]["step"] >= steps:
            return
        time.sleep(1.0)
    raise SystemExit(f"{arm}: the run did not finish {steps} steps in time; see {swarm.logs}")


def run_arm(work: Path, router: str, steps: int, warmup: int, throttle: float) -> dict:
    spec = RunSpec().replace(**{**SPEC, "run.steps": steps})
    swarm = Swarm(work, spec, 0, None, "cpu")
    try:
        swarm.start(0)
        # stage 0, stage 1 x2 (one slow), stage 2 x2
        layout = [(0, 1.0), (1, 1.0), (1, throttle), (2, 1.0), (2, 1.0)]
        for i, (stage, slow) in enumerate(layout):
            extra = ["--stage", str(stage), "--grace", "5"]
            if stage > 0:
                extra += ["--simulate-speed", str(FAST_RATE / slow)]
            extra += ["--router", router]  # the drivers' hops, and block replicas' (p2p)
            swarm.add_peer(i, extra)
        wait_for_steps(swarm, steps, 60 + steps * 30, router)
        rows = [r for r in read_metrics(swarm.logs) if r["step"] > warmup]
        samples = sum(r["completed"] * spec.pipeline.microbatch for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        return {"router": router, "steps": len(rows), "samples_per_s": samples / seconds,
                "step_s_median": statistics.median(r["seconds"] for r in rows),
                "dropped": rows[-1]["dropped"], "loss": rows[-1]["loss"]}
    finally:
        swarm.stop(grace=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--throttle", type=float, default=3.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-pipeline-") as tmp:
        results = [run_arm(Path(tmp) / r, r, args.steps, args.warmup, args.throttle)
                   for r in ("swarm", "round_robin")]
    print(f"pipeline bench: 2 block stages x 2 replicas, one replica {args.throttle:g}x slower, "
          f"{args.steps} steps ({args.warmup} warm-up); {machine()}")
    print(f"{'router':<12} {'samples/s':>10} {'median step s':>14} {'dropped':>8} {'loss':>7}")
    for r in results:
        print(f"{r['router']:<12} {r['samples_per_s']:>10.1f} {r['step_s_median']:>14.2f} "
              f"{r['dropped']:>8} {r['loss']:>7.3f}")
    ratio = results[0]["samples_per_s"] / results[1]["samples_per_s"]
    print(targets_line([(TARGET, ratio)]))
    print(f"pipeline: swarm/round_robin = {TARGET.figure(ratio)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
