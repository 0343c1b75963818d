"""Hub against peer-to-peer hops over thin links: the bytes a microbatch's activations put on the
network, and the time of a step.

    python3 -m bench.hops [--mbit 25] [--delay-ms 40] [--steps 40] [--warmup 8]

The lab (shoal/lab/network.py): 4 hosts on one bridge, each capped at `--mbit` Mbit/s both
ways (tbf, ifb for ingress), `--delay-ms` added one way to every TCP connection by the lab's delay
relay; the real coordinator on `coord`, one real peer on each other host: the stage-0 driver on
`peer1`, block stage 1 on `peer2`, block stage 2 on `peer3`. One replica per stage, so no sync
traffic: what moves is the pipeline's. The model is bench.wan's (a byte-level Llama-style
decoder, d_model 192, 4 layers, 64-token sequences, 32 per step in microbatches of 8), split
into the two block stages, with the run's default activation encoding (pipeline.activations).
The same run twice, `pipeline.hops` = "hub" (every block replica answers the driver, which
sends the next hop) and "p2p" (peer/pipeline/p2p.py: each replica sends its output to the next
stage's replica; the last one delivers to the driver; the backward walks back the same way).

Measured over the steps after `--warmup`, per arm:
- activation bytes per microbatch on the network: what every peer counted as sent under kind
  "activations" (their own counters, /api/status; each message counted once, by its sender),
  over the microbatches completed in that window (the driver's metrics rows);
- the driver's link: bytes its host sent and received per microbatch (its eth0 counters: frames
  with their headers, heartbeats and EndSteps included);
- seconds per step: the median of the driver's step times (its metrics rows).

Last line: `hops: hub/p2p bytes = A, hub/p2p step time = B` (hub over p2p, rounded down), targets
A >= 1.8 and B >= 1.3 (issue #15). Root only; a few minutes.

With the head on stage 0, a microbatch through 2 block stages is 4 activation messages each way
through the hub and 3 peer to peer, so A is at most 8/6 = 1.33 here whatever the transport does;
the driver's own link carries 8 -> 4 messages, which is where B comes from when that link is
the bottleneck.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import Target, fresh_out, machine, targets_line
from shoal.lab.network import LabNetwork, netns_available

HOSTS = ("coord", "peer1", "peer2", "peer3")
STAGES = {"peer1": 0, "peer2": 1, "peer3": 2}
DRIVER = "peer1"
MODEL = {"model.d_model": 192, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 64,
         "pipeline.microbatch": 8, "pipeline.target_batch": 32, "pipeline.stages": 2,
         "optim.lr": 3e-3, "sync.mode": "allreduce", "sync.timeout_s": 30.0,
         "membership.heartbeat_s": 1.0, "membership.lease_s": 20.0}
TARGETS = {"bytes": Target("hub/p2p bytes", 1.8), "time": Target("hub/p2p step time", 1.3)}


@dataclass
class Arm:
    hops: str
    activation_bytes_per_mb: float | None = None
    driver_link_bytes_per_mb: float | None = None
    seconds_per_step: float | None = None
    steps: int = 0
    microbatches: int = 0
    dropped: int = 0
    note: str = ""


def link_bytes(net: LabNetwork, host: str) -> int:
    """Bytes `host` has sent and received on its link (eth0 tx + rx)."""
    p = subprocess.run(["ip", "-n", net.hosts[host].netns, "-s", "-j", "link", "show", "dev",
                        "eth0"], capture_output=True, text=True, check=True)
    stats = json.loads(p.stdout)[0]["stats64"]
    return int(stats["tx"]["bytes"]) + int(stats["rx"]["bytes"])


def activation_bytes(status: dict) -> int:
    """Activation bytes every live peer says it sent (each message once, by its sender)."""
    return sum(int((p.get("bytes_by_kind") or {}).get("activations", 0))
               for p in status.get("peers") or [])


def spec_for(hops: str, steps: int):
    from protocols.runspec import RunSpec

    return RunSpec().replace(**MODEL, **{"pipeline.hops": hops, "run.steps": steps,
                                         "run.name": f"hops-{hops}"})


def run_arm(hops: str, args: argparse.Namespace, work: Path) -> Arm:
    from shoal.lab.swarm import LabSwarm
    from shoal.local import read_metrics

    arm = Arm(hops)
    steps = args.warmup + args.steps
    net = LabNetwork(list(HOSTS), mbit=args.mbit)
    net.create()
    swarm = LabSwarm(work / hops, spec_for(hops, steps + 2), net, delay_ms=args.delay_ms)
    try:
        swarm.start(stages=STAGES)
        deadline = time.monotonic() + args.max_seconds
        start: tuple[int, int, int] | None = None  # (step, activation bytes, driver link bytes)
        end: tuple[int, int, int] | None = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            rows = read_metrics(swarm.logs)
            step = max((r["step"] for r in rows), default=0)
            if step >= args.warmup and start is None:
                time.sleep(args.heartbeat_wait)  # the counters ride on heartbeats
                start = (_step(swarm), activation_bytes(swarm.status() or {}),
                         link_bytes(net, DRIVER))
            if start is not None and step >= steps:
                time.sleep(args.heartbeat_wait)
                end = (_step(swarm), activation_bytes(swarm.status() or {}),
                       link_bytes(net, DRIVER))
                break
            if all(p.poll() is not None for p in swarm.peers):
                arm.note = "every peer exited"
                break
        rows = read_metrics(swarm.logs)
    finally:
        swarm.stop(grace=5.0)
        net.destroy()
    if start is None or end is None:
        arm.note = arm.note or f"did not reach step {steps} in {args.max_seconds:.0f} s"
        return arm
    window = [r for r in rows if start[0] < r["step"] <= end[0]]
    arm.steps = len(window)
    arm.microbatches = sum(r["completed"] for r in window)
    arm.dropped = sum(r["microbatches"] - r["completed"] for r in window)
    timed = [r["seconds"] for r in rows if args.warmup < r["step"] <= steps]
    arm.seconds_per_step = statistics.median(timed) if timed else None
    if arm.microbatches:
        arm.activation_bytes_per_mb = (end[1] - start[1]) / arm.microbatches
        arm.driver_link_bytes_per_mb = (end[2] - start[2]) / arm.microbatches
    return arm


def _step(swarm) -> int:
    from shoal.local import read_metrics

    return max((r["step"] for r in read_metrics(swarm.logs)), default=0)


def _ratio(hub: float | None, p2p: float | None) -> float | None:
    return hub / p2p if hub and p2p else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.hops", description=__doc__.split("\n")[0])
    ap.add_argument("--mbit", type=float, default=25.0)
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--steps", type=int, default=40, help="steps measured, after the warm-up")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=420.0, help="per arm, start-up included")
    ap.add_argument("--heartbeat-wait", type=float, default=2.5,
                    help="seconds to let the peers' counters reach the coordinator")
    ap.add_argument("--out", help="keep the runs' logs here")
    args = ap.parse_args(argv)
    why = netns_available()
    if why:
        print(f"bench.hops: {why}", file=sys.stderr)
        return 2
    work = fresh_out(args.out, "bench.hops")
    arms: dict[str, Arm] = {}
    for hops in ("hub", "p2p"):
        t, load0 = time.monotonic(), os.getloadavg()[0]
        arms[hops] = run_arm(hops, args, work)
        print(f"{hops}: {time.monotonic() - t:.0f} s wall; load average {load0:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end {arms[hops].note}", flush=True)
    print(f"\nbench.hops: driver on {DRIVER}, stages {STAGES}, {args.mbit:g} Mbit/s each way, "
          f"+{args.delay_ms:g} ms each way, steps {args.warmup + 1}..{args.warmup + args.steps}; "
          f"{machine()}; logs: {work}")
    print(f"{'hops':<5} {'activation kB/mb':>17} {'driver link kB/mb':>18} {'s/step':>7} "
          f"{'steps':>6} {'microbatches':>13} {'dropped':>8}")
    for a in arms.values():
        print(f"{a.hops:<5} {_kb(a.activation_bytes_per_mb):>17} "
              f"{_kb(a.driver_link_bytes_per_mb):>18} "
              f"{'-' if a.seconds_per_step is None else f'{a.seconds_per_step:.3f}':>7} "
              f"{a.steps:>6} {a.microbatches:>13} {a.dropped:>8}")
    hub, p2p = arms["hub"], arms["p2p"]
    by_bytes = _ratio(hub.activation_bytes_per_mb, p2p.activation_bytes_per_mb)
    by_link = _ratio(hub.driver_link_bytes_per_mb, p2p.driver_link_bytes_per_mb)
    by_time = _ratio(hub.seconds_per_step, p2p.seconds_per_step)
    if by_link is not None:
        print(f"the driver's link: hub/p2p bytes = {by_link:.2f}")
    pairs = [(TARGETS[k], v) for k, v in (("bytes", by_bytes), ("time", by_time))
             if v is not None]
    if pairs:
        print(targets_line(pairs))
    a = "n/a" if by_bytes is None else TARGETS["bytes"].figure(by_bytes)
    b = "n/a" if by_time is None else TARGETS["time"].figure(by_time)
    print(f"hops: hub/p2p bytes = {a}, hub/p2p step time = {b}")
    return 0


def _kb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e3:.1f}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
