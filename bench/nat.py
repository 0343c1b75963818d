"""NAT: the same `shoal lab` run with every peer reachable and with two peers behind NAT.

Two runs of the namespace lab (root), same hosts, links, model, sync mode and steps: one with no
host behind NAT, one with `--nat peer3,peer4`. In both, peer3 is pinned to stage 0 (`--place`:
where the coordinator's placement puts a relayed peer anyway; it also keeps the lab from pinning
a NAT'd host to a block stage) and the coordinator places everyone else as it would in a real
swarm: a relayed peer that lands on a block stage trades places with a reachable driver
(coordinator/placement.py), so the runs differ only in the NAT and what the swarm makes of it.

`--pinned` adds a third run, the worst case: peer4 pinned to stage 1 behind NAT (`--place
peer4=1`: an operator's choice the coordinator never overrides), so every call into it goes
through the coordinator's relay. Its ratio is printed; the last line stays the default's.

Time per step, two ways:
- steady: from the drivers' metrics files (`logs/peer*.metrics.jsonl`, one row per finished step
  with its wall time `t`), the time from the end of step `--warmup` to the end of the last step,
  per step; a step ends when its last driver wrote it. This leaves out the start-up steps, in the
  NAT'd run those before the coordinator's dial-back moved the NAT'd peers to its relay.
- whole: summary.json's `seconds` (first step to last) / its `steps`.
R = the NAT'd run's steady time per step / the direct run's (whole when steady is missing).

Also printed: each run's `relayed_bytes` and `direct_bytes`, and per NAT'd peer its stage, last
step and how the coordinator reached it (`peers_reach`).

Last line: `nat: relayed/direct step time = R` (target R <= 1.3), R of the default placement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.churn import lab_run as churn_lab_run
from bench.report import Target, fresh_out, machine, targets_line

RATIO = Target("relayed/direct step time", 1.3, at_least=False)
NAT_HOSTS = ("peer3", "peer4")


def step_ends(logs: Path) -> dict[int, float]:
    """{step: wall time its last driver finished it} from the drivers' metrics files."""
    ends: dict[int, float] = {}
    for f in sorted(logs.glob("peer*.metrics.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
                step, t = int(row["step"]), float(row["t"])
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line
            ends[step] = max(t, ends.get(step, t))
    return ends


def steady_step_s(ends: dict[int, float], warmup: int) -> tuple[float, int, int] | None:
    """(seconds per step, first step, last step) from the end of step `warmup` to the last."""
    last = max(ends, default=0)
    first = min((s for s in ends if s >= warmup), default=None)
    if first is None or last <= first:
        return None
    return (ends[last] - ends[first]) / (last - first), first, last


def lab_run(args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    """One `shoal lab` run (bench.churn's), with `steady` added."""
    s = churn_lab_run(args, out, extra, bench="bench.nat")
    s["steady"] = steady_step_s(step_ends(out / "logs"), args.warmup)
    return s


def per_step(s: dict) -> float:
    """The run's steady seconds per step, else its whole-run seconds / steps (nan without)."""
    if s.get("steady"):
        return s["steady"][0]
    steps = s.get("steps") or 0
    return s.get("seconds", 0.0) / steps if steps else float("nan")


def describe(name: str, s: dict) -> str:
    steps = s.get("steps") or 0
    whole = s.get("seconds", 0.0) / steps if steps else float("nan")
    steady = s.get("steady")
    span = f"{steady[0]:>8.2f} ({steady[1]}-{steady[2]})" if steady else f"{'n/a':>8}"
    return (f"{name:<8} {steps:>5} {s.get('seconds', 0.0):>8.1f} {whole:>7.2f} {span:<17} "
            f"{s.get('relayed_bytes', 0) / 1e6:>10.1f} {s.get('direct_bytes', 0) / 1e6:>9.1f} "
            f"{'yes' if s.get('completed') else 'no':>9}")


def nat_peers(s: dict, hosts: tuple[str, ...] = NAT_HOSTS) -> tuple[list[str], bool]:
    """(a line per NAT'd host's peers, whether each host had a live peer that was relayed and
    reached the run's last step)."""
    lines, ok = [], True
    target = s.get("steps") or 0
    for host in hosts:
        rows = [r for r in s.get("peers_reach") or [] if r.get("host") == host]
        good = [r for r in rows if r.get("reachable") == "relayed" and r.get("live")
                and (r.get("step") or 0) >= target > 0]
        ok = ok and bool(good)
        seen = "; ".join(f"stage {r.get('stage')}, step {r.get('step')}, "
                         f"{r.get('reachable') or 'reach unknown'}"
                         f"{'' if r.get('live') else ', not live'}" for r in rows) or "no peer"
        lines.append(f"  {host}: {seen}: {'relayed to the last step' if good else 'NOT'}"
                     f"{'' if good else ' relayed to the last step'}")
    return lines, ok


def verdict(direct: dict, natted: dict) -> tuple[list[str], int]:
    """The lines after the table, the last one `nat: relayed/direct step time = R`; exit code."""
    lines, reached = nat_peers(natted)
    if not (direct.get("completed") and natted.get("completed")):
        return [*lines, "nat: relayed/direct step time = n/a (a run did not complete)"], 1
    r = per_step(natted) / per_step(direct)
    lines.append(targets_line([(RATIO, r)]) + f"; both NAT'd peers relayed to the last step: "
                 f"{'yes' if reached else 'NO'}")
    lines.append(f"nat: relayed/direct step time = {RATIO.figure(r)}")
    return lines, 0 if reached else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.nat", description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10,
                    help="steady time per step from the end of this step (default 10)")
    ap.add_argument("--sync", default=None, help="the lab's default unless given")
    ap.add_argument("--mbit", type=float, default=25.0)
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (both runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run spec overrides for both runs")
    ap.add_argument("--timeout", type=float, default=1500.0, help="per run, seconds")
    ap.add_argument("--out", help="keep the runs here (a new or empty folder)")
    ap.add_argument("--pinned", action="store_true",
                    help="also run the worst case: peer4 pinned to stage 1 behind NAT")
    args = ap.parse_args(argv)
    if args.hosts < 4:
        raise SystemExit("bench.nat: --hosts must be at least 4 (peer3 and peer4 go behind NAT)")
    from shoal.lab.network import netns_available

    why = netns_available()
    if why:
        print(f"bench.nat: {why}", file=sys.stderr)
        return 2
    work = fresh_out(args.out, "bench.nat")
    place = ["--place", "peer3=0"]
    nat = ["--nat", ",".join(NAT_HOSTS)]
    direct = lab_run(args, work / "direct", place)
    natted = lab_run(args, work / "nat", [*nat, *place])
    pinned = (lab_run(args, work / "nat-pinned", [*nat, *place, "--place", "peer4=1"])
              if args.pinned else None)
    print(f"bench.nat: {args.hosts} hosts, {args.stages} block stages, sync "
          f"{args.sync or 'lab default'}, {args.steps} steps, {args.mbit:g} Mbit/s and "
          f"+{args.delay_ms:g} ms each way; peer3 at stage 0, the rest placed by the "
          f"coordinator; NAT'd runs: --nat {','.join(NAT_HOSTS)}; steady s/step after step "
          f"{args.warmup}; {machine()}; runs: {work}")
    print(f"{'run':<8} {'steps':>5} {'train s':>8} {'s/step':>7} {'steady s/step':<17} "
          f"{'relayed MB':>10} {'direct MB':>9} {'completed':>9}")
    print(describe("direct", direct))
    print(describe("2 NAT'd", natted))
    if pinned is not None:
        print(describe("pinned", pinned))
    for name, s in (("2 NAT'd", natted), ("pinned", pinned)):
        if s is not None:
            print(f"{name}: " + "; ".join(f"{r.get('host')} stage {r.get('stage')}"
                                          for r in s.get("peers_reach") or [] if r.get("live")))
    if pinned is not None:
        lines, _ = verdict(direct, pinned)
        print(f"worst case (peer4 pinned to stage 1 behind NAT): {lines[-1].split(' = ')[-1]}")
    lines, code = verdict(direct, natted)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
