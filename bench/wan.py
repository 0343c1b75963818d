"""Time to a target loss over thin, slow links: Shoal's sync modes against PyTorch DDP (gloo).

    python3 -m bench.wan [--target-loss 2.8] [--mbit 25] [--delay-ms 40] [--modes ...]

Every run uses the same lab (shoal/lab/network.py): 4 hosts on one bridge, each capped at `--mbit`
Mbit/s both ways (tbf, ifb for ingress), with `--delay-ms` added one way to every TCP connection by
the lab's delay relay (so 2x that to each round trip), the same model (a byte-level Llama-style
decoder, d_model 192, 4 layers), the same corpus and the same global batch (32 sequences of 64
bytes per optimizer step). For each Shoal mode (allreduce, demo, diloco; spsa where the peer
supports it) the real coordinator runs on host `coord` and one real peer on each of 4 hosts (2
replicas of stage 0, 2 of the one block stage). The outside baseline is torch.distributed DDP
with the gloo backend, one process per host, ranks meeting over the same capped, delayed links
(gloo's sockets go through the same relays: the lab's iptables REDIRECT catches every incoming
TCP connection). Each rank trains on its own shard with batch 32 / 4, AdamW at the same lr.

Every run, DDP included, is watched the same way: bench.wan reads the loss rows each process
writes locally (Shoal's metrics files, the DDP ranks' own files: bench/wan_ddp.py adds no
collective for logging or stopping) and stops the processes once the target is reached.

Measured for each: seconds from the first optimizer step to the first step whose loss (mean
over the stage-0 replicas or ranks, smoothed over 3 steps) is at or below the target, the steps
that took, and bytes on the wire. Bytes are the lab hosts' own interface counters (tx bytes of
every host's eth0, coordinator included: Ethernet frames with their TCP/IP headers, acks and
retransmissions), read once a second while the run trains: "wire MB/step" is the bytes between
the first and the last reading after step 1 over the steps between them (start-up excluded),
"wire MB" everything the run sent from the lab's creation to its stop. For Shoal's modes the
peers' own counters (sync and activation payloads, /api/status) are shown beside them, as the
figure earlier versions printed: their total at the end over the steps run, start-up included.

The last line is `wan: ddp/demo = A, ddp/diloco = B` (time of DDP over time of the mode; > 1
means the mode gets there sooner), rounded down (bench/report.py). Root only; minutes of runtime.
When the hosts share a few CPUs, compute is slower than on real machines and the ratios
understate what the links alone would give; the header prints what the machine has.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Target, fresh_out, machine, rounded, targets_line
from shoal.lab.network import LabNetwork, netns_available

HOSTS = ("coord", "peer1", "peer2", "peer3", "peer4")
MODEL = {"model.d_model": 192, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 64,
         "pipeline.microbatch": 8, "pipeline.target_batch": 32, "pipeline.stages": 1,
         "optim.lr": 3e-3, "sync.timeout_s": 30.0, "membership.heartbeat_s": 1.0,
         "membership.lease_s": 20.0,
         "diloco.inner_steps": 10, "diloco.inner_lr": 3e-3, "diloco.inner_weight_decay": 0.0,
         # The paper's outer momentum 0.9 is for H = 500; for 10-step rounds it overshoots
         # (python -m bench.diloco_outer measures the steps to the target for both).
         "diloco.outer_momentum": 0.5}
SMOOTH = 3
STAGES = {"peer1": 1, "peer2": 1, "peer3": 0, "peer4": 0}  # 2 drivers, 2 block replicas
# issue #15's targets (issue #3's were 3 and 3)
TARGETS = {"demo": Target("ddp/demo", 6.0), "diloco": Target("ddp/diloco", 10.0)}


def wire_bytes(net: LabNetwork) -> int:
    """Bytes every lab host has sent on its link so far: the sum of the hosts' eth0 tx counters
    (what the tbf let out: Ethernet frames, headers, acks and retransmissions included)."""
    total = 0
    for h in net.hosts.values():
        p = subprocess.run(["ip", "-n", h.netns, "-s", "-j", "link", "show", "dev", "eth0"],
                           capture_output=True, text=True, check=True)
        total += int(json.loads(p.stdout)[0]["stats64"]["tx"]["bytes"])
    return total


@dataclass
class WireMeter:
    """Readings of the lab's byte counters during one run.

    `base` is read right after the lab is made, `end` right before it is destroyed; `samples`
    are (step reached, bytes) pairs read while it trains, from the first step on.
    """

    base: int = 0
    end: int | None = None
    samples: list[tuple[int, int]] = field(default_factory=list)

    def sample(self, step: int, total: int) -> None:
        if step >= 1:
            self.samples.append((step, total))

    @property
    def window(self) -> tuple[int, int] | None:
        """(first, last) step of the readings that `per_step` spans."""
        if len(self.samples) < 2 or self.samples[-1][0] <= self.samples[0][0]:
            return None
        return self.samples[0][0], self.samples[-1][0]

    @property
    def per_step(self) -> float | None:
        """Bytes per step between the first and the last reading (start-up excluded)."""
        if self.window is None:
            return None
        (s0, b0), (s1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (s1 - s0)

    @property
    def total(self) -> int | None:
        return None if self.end is None else self.end - self.base


@dataclass
class Result:
    name: str
    seconds: float | None  # to the target; None = not reached
    steps: int | None
    steps_run: int
    last_loss: float | None
    wire: WireMeter
    peer_bytes_per_step: float | None = None  # Shoal's peers' own counters; None for DDP
    note: str = ""


def spec_for(mode: str, steps: int, overrides: dict[str, str] | None = None):
    """The run spec of a Shoal mode: MODEL, then `--set` overrides (e.g. pipeline.activations)."""
    from protocols.runspec import RunSpec

    sections = {k.replace("diloco.", "sync.diloco."): v for k, v in MODEL.items()}
    spec = RunSpec().replace(**sections, **{"sync.mode": mode, "run.steps": steps,
                                            "run.name": f"wan-{mode}"})
    return spec.replace(**overrides) if overrides else spec


def parse_sets(items: list[str]) -> dict[str, object]:
    """`--set key=value` pairs; a value is read as JSON when it parses (numbers, true/false),
    else kept as text; RunSpec.replace then checks the key and the value."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--set wants key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def crossing(rows: list[dict], target: float) -> tuple[float | None, int | None, float | None]:
    """(seconds from the first step's start, step) where the smoothed loss reaches `target`."""
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("loss") is not None and math.isfinite(r["loss"]):
            by_step.setdefault(int(r["step"]), []).append(r)
    if not by_step:
        return None, None, None
    steps = sorted(by_step)
    t0 = min(r["t"] - r.get("seconds", 0.0) for r in by_step[steps[0]])
    losses = [sum(r["loss"] for r in by_step[s]) / len(by_step[s]) for s in steps]
    i = first_smoothed_below(losses, target)
    if i is None:
        return None, None, losses[-1]
    return max(r["t"] for r in by_step[steps[i]]) - t0, steps[i], losses[i]


def first_smoothed_below(losses: list[float], target: float) -> int | None:
    """Index of the first loss whose mean with the SMOOTH - 1 before it is <= `target`."""
    for i in range(SMOOTH - 1, len(losses)):
        if sum(losses[i - SMOOTH + 1: i + 1]) / SMOOTH <= target:
            return i
    return None


def _lab(mbit: float) -> tuple[LabNetwork, WireMeter]:
    net = LabNetwork(list(HOSTS), mbit=mbit)
    net.create()
    return net, WireMeter(base=wire_bytes(net))


def shoal_run(mode: str, args: argparse.Namespace, work: Path) -> Result:
    from shoal.lab.swarm import LabSwarm
    from shoal.local import read_metrics

    spec = spec_for(mode, args.max_steps, parse_sets(args.set))
    net, wire = _lab(args.mbit)
    swarm = LabSwarm(work / mode, spec, net, delay_ms=args.delay_ms)
    try:
        # Pinned: left to the coordinator's assignment (from self-benchmarks on shared cores),
        # one allreduce run got 3 drivers and 1 block replica, a different workload.
        swarm.start(stages=STAGES)
        deadline = time.monotonic() + args.max_seconds + 180  # + start-up
        started: float | None = None
        while time.monotonic() < deadline:
            time.sleep(1.0)
            rows = read_metrics(swarm.logs)
            if rows and started is None:
                started = time.monotonic()
                deadline = started + args.max_seconds
            reached = max((r["step"] for r in rows), default=0)
            wire.sample(reached, wire_bytes(net))
            seconds, step, _ = crossing(rows, args.target_loss)
            if step is not None or reached >= args.max_steps:
                break
            if all(p.poll() is not None for p in swarm.peers):
                break
        rows = read_metrics(swarm.logs)
        status = swarm.status() or {}
    finally:
        swarm.stop(grace=5.0)
        with contextlib.suppress(OSError, ValueError, subprocess.CalledProcessError):
            wire.end = wire_bytes(net)
        net.destroy()
    seconds, step, last = crossing(rows, args.target_loss)
    steps_run = max((r["step"] for r in rows), default=0)
    sent = (status.get("totals") or {}).get("bytes_sent")
    return Result(mode, seconds, step, steps_run, last, wire,
                  sent / steps_run if sent and steps_run else None)


def ddp_rows(logs: Path, world: int) -> list[dict]:
    """Every rank's rows, only for the steps all `world` ranks have logged (a half-written last
    line is skipped: the ranks are still writing)."""
    rows: list[dict] = []
    for f in sorted(logs.glob("ddp*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    count: dict[int, int] = {}
    for r in rows:
        count[r["step"]] = count.get(r["step"], 0) + 1
    return [r for r in rows if count[r["step"]] == world]


def ddp_run(args: argparse.Namespace, work: Path) -> Result:
    """DDP ranks on the 4 peer hosts; stopped by this process, like the Shoal runs."""
    from shoal.lab.swarm import LabSwarm

    out = work / "ddp"
    spec = spec_for("allreduce", args.max_steps)
    net, wire = _lab(args.mbit)
    swarm = LabSwarm(out, spec, net, delay_ms=args.delay_ms)
    swarm.peer_hosts = []
    master = f"{net.hosts['peer1'].address}:29500"
    ranks = HOSTS[1:]
    try:
        if args.delay_ms > 0:
            swarm._start_relays()
        for rank, host in enumerate(ranks):
            swarm.others.append(swarm.spawn(
                host, [sys.executable, "-m", "bench.wan_ddp", "--rank", str(rank), "--world",
                       str(len(ranks)), "--master", master, "--steps", str(args.max_steps),
                       "--spec", spec.to_toml(), "--out", str(swarm.logs / f"ddp{rank}.jsonl")],
                f"ddp{rank}.log", env={"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}))
        deadline = time.monotonic() + args.max_seconds + 240  # + start-up
        started: float | None = None
        while time.monotonic() < deadline and any(p.poll() is None for p in swarm.others):
            time.sleep(1.0)
            rows = ddp_rows(swarm.logs, len(ranks))
            if rows and started is None:
                started = time.monotonic()
                deadline = started + args.max_seconds
            reached = max((r["step"] for r in rows), default=0)
            wire.sample(reached, wire_bytes(net))
            if crossing(rows, args.target_loss)[1] is not None or reached >= args.max_steps:
                break
        rows = ddp_rows(swarm.logs, len(ranks))
    finally:
        swarm.stop(grace=5.0)
        with contextlib.suppress(OSError, ValueError, subprocess.CalledProcessError):
            wire.end = wire_bytes(net)
        net.destroy()
    seconds, step, last = crossing(rows, args.target_loss)
    steps_run = max((r["step"] for r in rows), default=0)
    note = "" if rows else f"no DDP rows; see {out / 'logs'}"
    return Result("ddp (gloo)", seconds, step, steps_run, last, wire, None, note)


def spsa_available() -> str | None:
    """None if the peer can run sync = spsa, else why not."""
    from peer.sync.registry import make_sync_mode

    try:
        make_sync_mode(spec_for("spsa", 1))
    except NotImplementedError as exc:
        return str(exc)
    except Exception:
        return None  # it exists; it may want a stage host to be built
    return None


def _fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".")[0].rstrip("df") or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.wan", description=__doc__.split("\n")[0])
    ap.add_argument("--target-loss", type=float, default=2.8)
    ap.add_argument("--mbit", type=float, default=25.0)
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="training time allowed per run before it counts as not reached")
    ap.add_argument("--modes", nargs="+", default=["ddp", "allreduce", "demo", "diloco", "spsa"])
    ap.add_argument("--out", help="keep the runs' logs here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-spec override for every Shoal mode, e.g. "
                         "pipeline.activations=int8 (repeatable)")
    args = ap.parse_args(argv)
    try:
        spec_for("demo", args.max_steps, parse_sets(args.set))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        ap.error(str(exc))
    why = netns_available()
    if why:
        print(f"bench.wan: {why}", file=sys.stderr)
        return 2
    work = fresh_out(args.out, "bench.wan")
    results: dict[str, Result] = {}
    for mode in args.modes:
        if mode == "spsa" and (why := spsa_available()):
            print(f"spsa: skipped — {why}")
            continue
        t, load0 = time.monotonic(), os.getloadavg()[0]
        r = ddp_run(args, work) if mode == "ddp" else shoal_run(mode, args, work)
        results[mode] = r
        print(f"{r.name}: target {'reached' if r.seconds is not None else 'NOT reached'} "
              f"({time.monotonic() - t:.0f} s wall; load average {load0:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end) {r.note}", flush=True)
    print(f"\nbench.wan: 4 hosts, {args.mbit:g} Mbit/s each way, +{args.delay_ms:g} ms each way, "
          f"target loss {args.target_loss:g} (smoothed over {SMOOTH} steps); "
          f"{'spec overrides ' + ' '.join(args.set) + '; ' if args.set else ''}{machine()}; "
          f"logs: {work}")
    print(f"{'run':<12} {'s to target':>12} {'steps':>6} {'s/step':>7} {'steps run':>10} "
          f"{'last loss':>10} {'wire MB/step':>13} {'over steps':>11} {'wire MB':>8} "
          f"{'peers MB/step':>14}")
    for r in results.values():
        per = r.seconds / r.steps if r.seconds is not None and r.steps else None
        window = f"{r.wire.window[0]}..{r.wire.window[1]}" if r.wire.window else "-"
        print(f"{r.name:<12} {_fmt(r.seconds, '12.1f')} {_fmt(r.steps, '6d')} "
              f"{_fmt(per, '7.2f')} {r.steps_run:>10} {_fmt(r.last_loss, '10.3f')} "
              f"{_fmt(_mb(r.wire.per_step), '13.2f')} {window:>11} "
              f"{_fmt(_mb(r.wire.total), '8.1f')} {_fmt(_mb(r.peer_bytes_per_step), '14.2f')}")
    print("(wire: measured, the lab hosts' eth0 tx counters, every host, headers and acks "
          "included; peers: the Shoal peers' own payload counters over the whole run, start-up "
          "included; none for DDP)")

    def ratio(mode: str) -> tuple[str, float | None]:
        d, m = results.get("ddp"), results.get(mode)
        if d is None or m is None or m.seconds is None:
            return "n/a", None
        if d.seconds is None:
            bound = rounded(args.max_seconds / m.seconds, 2, down=True)
            return f">{bound} (ddp did not reach the target)", None
        value = d.seconds / m.seconds
        return TARGETS[mode].figure(value), value

    measured = {mode: ratio(mode) for mode in TARGETS}
    pairs = [(TARGETS[m], v) for m, (_, v) in measured.items() if v is not None]
    if pairs:
        print(targets_line(pairs))
    print(f"wan: ddp/demo = {measured['demo'][0]}, ddp/diloco = {measured['diloco'][0]}")
    return 0


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 1e6


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
