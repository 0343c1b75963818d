"""Churn: the same `shoal lab` run with and without faults, and what the faults cost.

Two runs of the namespace lab (root), same hosts, links, model, sync mode and steps: one without
faults, one with the lab's seeded chaos scenario (`--chaos SEED`: a third of the peers killed or
preempted and respawned, a partition that heals, a freeze, a coordinator restart) or a scenario
file (`--scenario FILE`). Goodput G = training seconds without faults / training seconds with
faults (summary.json's `seconds`: from the first step to the last). Also printed: the dropped
microbatches of the faulted run, and whether every stage's replicas ended on one state hash.

Last line: `churn: goodput = G, dropped = D%, replicas equal = yes|no` (target G >= 0.7 with the
replicas equal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.report import Target, fresh_out, machine, targets_line
from shoal.lab.network import netns_available

GOODPUT = Target("goodput", 0.7)


def lab_run(args: argparse.Namespace, out: Path, extra: list[str],
            bench: str = "bench.churn") -> dict:
    """One `shoal lab` run as a user types it (`extra`: its further flags); its summary.json
    with `wall_s` added. bench.nat runs its labs through this too."""
    cmd = [sys.executable, "-m", "shoal.cli", "lab", "--hosts", str(args.hosts), "--stages",
           str(args.stages), "--steps", str(args.steps),
           *(["--sync", args.sync] if args.sync else []), "--mbit", f"{args.mbit:g}",
           "--delay-ms", f"{args.delay_ms:g}", "--seed", str(args.seed), "--out", str(out),
           "--no-export", *extra]
    for kv in args.set:
        cmd += ["--set", kv]
    t = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.monotonic() - t
    summary_file = out / "summary.json"
    if not summary_file.exists():
        raise SystemExit(f"{bench}: the lab run wrote no summary (exit {p.returncode}):\n"
                         f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    s = json.loads(summary_file.read_text())
    s["wall_s"] = wall
    return s


def describe(name: str, s: dict) -> str:
    differ = s.get("stages_differ")
    equal = "yes" if not differ else f"no (stages {','.join(differ)})"
    return (f"{name:<10} {s.get('steps', 0):>5} {s.get('seconds', 0.0):>9.1f} "
            f"{s.get('wall_s', 0.0):>7.0f} {s.get('tokens_per_s', 0.0):>9.0f} "
            f"{100 * s.get('dropped_ratio', 0.0):>8.1f} {len(s.get('faults', [])):>7} "
            f"{'yes' if s.get('completed') else 'no':>9}  {equal}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.churn", description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=6)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sync", default="demo")
    ap.add_argument("--mbit", type=float, default=25.0)
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (both runs)")
    ap.add_argument("--chaos", type=int, default=1, metavar="SEED",
                    help="the lab's seeded chaos scenario (default 1)")
    ap.add_argument("--scenario", help="a scenario file instead of --chaos")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run spec overrides for both runs")
    ap.add_argument("--timeout", type=float, default=1500.0, help="per run, seconds")
    ap.add_argument("--out", help="keep both runs here")
    args = ap.parse_args(argv)
    why = netns_available()
    if why:
        print(f"bench.churn: {why}", file=sys.stderr)
        return 2
    work = fresh_out(args.out, "bench.churn")
    faults = ["--scenario", args.scenario] if args.scenario else ["--chaos", str(args.chaos)]
    calm = lab_run(args, work / "calm", [])
    stormy = lab_run(args, work / "faults", faults)
    print(f"bench.churn: {args.hosts} hosts, {args.stages} block stages, sync {args.sync}, "
          f"{args.steps} steps, {args.mbit:g} Mbit/s and +{args.delay_ms:g} ms each way; faults: "
          f"{' '.join(faults)}; {machine()}; runs: {work}")
    print(f"{'run':<10} {'steps':>5} {'train s':>9} {'wall s':>7} {'tok/s':>9} {'dropped%':>8} "
          f"{'faults':>7} {'completed':>9}  replicas equal")
    print(describe("no faults", calm))
    print(describe("faults", stormy))
    for f in stormy.get("faults", []):
        print(f"  {f['t']:7.1f} s  step {f['step']:>3}  {f['action']} {f['target']} {f['detail']}")
    if not (calm.get("completed") and stormy.get("completed")):
        print("churn: goodput = n/a (a run did not complete), dropped = n/a, replicas equal = no")
        return 1
    goodput = calm["seconds"] / stormy["seconds"] if stormy["seconds"] > 0 else float("nan")
    equal = not stormy.get("stages_differ") and not calm.get("stages_differ")
    print(targets_line([(GOODPUT, goodput)]) + f"; replicas equal: {'yes' if equal else 'NO'}")
    print(f"churn: goodput = {GOODPUT.figure(goodput)}, dropped = "
          f"{100 * stormy.get('dropped_ratio', 0.0):.1f}%, replicas equal = "
          f"{'yes' if equal else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
