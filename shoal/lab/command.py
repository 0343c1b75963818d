"""`shoal lab`: a swarm on a namespace test network — many hosts on one machine, thin links,
added latency and faults on command (root only).

    shoal lab --hosts 4 --mbit 25 --delay-ms 40 --steps 50            a scripted run
    shoal lab --hosts 8 --chaos 7 --out DIR                           seeded chaos, report kept
    shoal lab --hosts 4 --fault 'at step 10 kill peer2 respawn=20' --fault 'at 60s restart'
    shoal lab --hosts 4 --scenario faults.txt --interactive            + commands typed on stdin
    shoal lab --hosts 4 --nat peer3,peer4 --place peer4=1             two peers behind NAT
    shoal lab --hosts 4 --nat peer3,peer4 --relay peer2 --fault 'at step 8 kill peer2'
                                                                      a relay peer, lost mid-run
    shoal lab --clean                                                 remove labs left by dead runs

Design. Three layers, one file each, so each can be used alone (tests and bench.wan do):
- shoal/lab/network.py — the network: a switch namespace with a bridge, one namespace per host with
  an address in 198.18.0.0/15, tbf caps both ways per host (ingress through ifb), an iptables
  REDIRECT that sends the TCP connections a host opens to its own delay relay, partitions by
  switch port; with `--nat peer3,peer4` those hosts sit behind routers of their own
  (shoal/lab/nat.py: masquerade out, nothing in).
- shoal/lab/relay.py — the delay relay (asyncio): holds each chunk `--delay-ms` in each direction.
- shoal/lab/swarm.py — processes inside the hosts: the real `shoal coordinator` on host `coord`,
  one real `shoal peer` on each host `peerN` (with `--mdns` they find the coordinator by
  zeroconf across the bridge instead of being told its address), the relays, and the faults
  (kill -9, SIGTERM with grace, SIGSTOP/SIGCONT, link down/up, coordinator restart, respawn).
- Links are mTLS as in a real deployment (the coordinator issues each peer its certificate;
  peers verify the coordinator by the fingerprint in the token file); `--plaintext` turns TLS
  off on every link.
- shoal/lab/scenario.py — the fault language, the seeded chaos generator and the runner.
This module ties them into a run: build the network, start the swarm, follow the steps, fire
faults when due, export the model at the end (from inside `coord`, over the capped links), load
it back, and write `summary.json`: the demo's summary plus the lab's settings, every fault fired,
dropped microbatches (count and share of those planned) and rebuilt stages, and how each peer
was reached (`peers_reach`, `relayed_bytes`, `direct_bytes`: shoal/lab/reach.py; with
`--relay HOSTS`, peers started with --relay, also `relay_track` and `peer_relay_bytes`:
LabSwarm.note_relays). `--nat` without a `--place` for any NAT'd host starts the last one at
stage 1 (nat_default_place).

Everything this run made — processes, namespaces (and with them veths, ifbs, qdiscs, iptables
rules) — is removed on exit, on error, on Ctrl-C and on SIGTERM; names carry a per-run prefix so
parallel or leftover labs never collide and cleanup touches only its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from protocols.runspec import RunSpec, RunSpecError
from shoal.lab.nat import NatError, parse_nat
from shoal.lab.network import LabError, LabNetwork, check_root, clean_stale
from shoal.lab.reach import reach_summary
from shoal.lab.scenario import ScenarioError, ScenarioRunner, chaos, parse, parse_line
from shoal.lab.swarm import COORD_HOST, LabSwarm
from shoal.local import (
    DEMO_DEFAULTS,
    out_dir,
    progress_line,
    settle,
    summarize,
    tokens_per_s,
)
from shoal.swarm import read_metrics

# The demo's small model, with leases long enough for a machine whose cores are shared by many
# hosts (a lab of 8 peers on 2 cores starves heartbeats for seconds while torch starts).
LAB_DEFAULTS = {**DEMO_DEFAULTS, "membership.lease_s": 15.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=4, help="peer hosts (default 4), plus `coord`")
    p.add_argument("--mbit", type=float, default=25.0,
                   help="cap per host and direction, Mbit/s (default 25; 0 = none)")
    p.add_argument("--delay-ms", type=float, default=40.0,
                   help="added one-way latency per connection, ms (default 40; 0 = none)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the config's, else 50)")
    p.add_argument("--stages", type=int, help="block stages (default: the config's, else 2)")
    p.add_argument("--sync", help="allreduce | demo | diloco | spsa (default: the config's, "
                   "else allreduce)")
    p.add_argument("--config", help="a run spec TOML to start from (explicit flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run spec key, e.g. --set model.d_model=64 (TOML values)")
    p.add_argument("--scenario", help="a file of fault commands (see shoal/lab/scenario.py)")
    p.add_argument("--fault", action="append", default=[], metavar="CMD",
                   help="one fault command, e.g. 'at step 10 kill random respawn=20'")
    p.add_argument("--chaos", type=int, metavar="SEED",
                   help="add the seeded chaos scenario (a third of the peers killed or "
                        "preempted, a partition, a freeze, a coordinator restart)")
    p.add_argument("--interactive", action="store_true",
                   help="also read fault commands from stdin while the run goes")
    p.add_argument("--mdns", action="store_true",
                   help="peers find the coordinator by mDNS instead of --coordinator")
    p.add_argument("--grace", type=float, default=10.0, help="peers' drain grace, s")
    p.add_argument("--plaintext", action="store_true",
                   help="no TLS on any link (default: mTLS with certificates from the "
                   "coordinator on every link, as in a real deployment)")
    p.add_argument("--data", help="text files or directory for stage 0 (default: stdlib)")
    p.add_argument("--out", help="keep summary.json, the model and the logs here")
    p.add_argument("--seed", type=int, help="run seed (default: the config's, else 0)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="give up after this many seconds (default: 600 + 10 s per step)")
    p.add_argument("--no-export", action="store_true", help="skip the export at the end")
    p.add_argument("--nat", metavar="HOSTS",
                   help="put these peer hosts behind their own NAT, e.g. --nat peer3,peer4: "
                   "they dial out, nothing dials in (shoal/lab/nat.py)")
    p.add_argument("--place", action="append", default=[], metavar="HOST=STAGE",
                   help="start HOST's peer with --stage STAGE, e.g. --place peer3=0 (default: "
                   "the coordinator places every peer)")
    p.add_argument("--relay", metavar="HOSTS",
                   help="start these peer hosts' peers with --relay (they offer to relay for "
                   "the NAT'd ones; the coordinator spreads relayed peers over the relays on "
                   "offer), e.g. --relay peer2; not hosts behind --nat")
    p.add_argument("--clean", action="store_true",
                   help="only remove namespaces left by lab runs whose process is gone")


#: flag -> (run spec key, the lab's default when neither the flag nor --config sets it)
LAB_FLAG_KEYS = {"stages": ("pipeline.stages", 2), "steps": ("run.steps", 50),
                 "sync": ("sync.mode", "allreduce"), "seed": ("run.seed", 0)}


def lab_spec(args: argparse.Namespace) -> RunSpec:
    """The lab's run spec: explicit flags > the --config file > the lab's defaults; then --set.

    The resolved stages, steps, sync mode and seed are written back to `args` (the chaos
    schedule and the scenario runner read them)."""
    try:
        base = RunSpec.load(args.config) if args.config else RunSpec().replace(**LAB_DEFAULTS)
    except (RunSpecError, OSError) as exc:
        raise SystemExit(f"shoal lab: --config: {exc}") from None
    from_file = {"stages": base.pipeline.stages, "steps": base.run.steps,
                 "sync": base.sync.mode, "seed": base.run.seed} if args.config else {}
    for flag, (_, default) in LAB_FLAG_KEYS.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, from_file.get(flag, default))
    values: dict[str, Any] = {key: getattr(args, flag) for flag, (key, _) in LAB_FLAG_KEYS.items()}
    if not args.config:
        values["run.name"] = f"lab-{args.sync}"
    spec = base.replace(**values)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. model.d_model=64")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value  # a bare word: a string
    try:
        spec = spec.replace(**overrides) if overrides else spec
    except RunSpecError as exc:
        raise SystemExit(f"--set: {exc}") from None
    if args.hosts < spec.pipeline.stages + 1:
        raise SystemExit(f"--hosts {args.hosts} cannot cover {spec.pipeline.stages} block stages "
                         f"plus stage 0: use at least {spec.pipeline.stages + 1} hosts")
    return spec


def _faults(args: argparse.Namespace) -> list:
    text = ""
    if args.scenario:
        text += Path(args.scenario).read_text() + "\n"
    if args.chaos is not None:
        text += chaos(args.hosts, args.steps, args.chaos, grace_s=args.grace) + "\n"
    text += "\n".join(args.fault)
    try:
        return parse(text)
    except ScenarioError as exc:
        raise SystemExit(f"scenario: {exc}") from None


def _places(items: list[str], peer_names: list[str], stages: int) -> dict[str, int]:
    """`--place peer3=0` as {host: stage}, checked against this lab's hosts and stages."""
    out: dict[str, int] = {}
    for item in items:
        host, eq, stage = item.partition("=")
        host = host.strip()
        if not eq or host not in peer_names or not stage.strip().isdigit() \
                or int(stage) > stages:
            raise SystemExit(f"shoal lab: --place {item!r}: write HOST=STAGE with HOST one of "
                             f"{', '.join(peer_names)} and STAGE 0..{stages}")
        out[host] = int(stage)
    return out


def parse_relay(value: str | None, peer_names: list[str], nat_hosts: list[str]) -> list[str]:
    """The hosts of `--relay peer1,peer2`, checked: each a peer host of this lab, once, and not
    behind the lab's NAT (nobody could dial in to the relay). SystemExit naming the bad one."""
    out: list[str] = []
    for item in (value.split(",") if value else []):
        host = item.strip()
        if host not in peer_names:
            raise SystemExit(f"shoal lab: --relay {value!r}: {host!r} is not a peer host of this "
                             f"lab; use some of {', '.join(peer_names)}")
        if host in nat_hosts:
            raise SystemExit(f"shoal lab: --relay {value!r}: {host} is behind the lab's NAT "
                             "(--nat), so nobody can dial in to relay through it; pick a host "
                             "not named in --nat")
        if host in out:
            raise SystemExit(f"shoal lab: --relay {value!r}: {host} is named twice")
        out.append(host)
    return out


def nat_default_place(nat_hosts: list[str], places: dict[str, int], stages: int
                      ) -> tuple[dict[str, int], str]:
    """When `--nat` names hosts and no `--place` names any of them, the last NAT'd host starts
    at stage 1, a block stage, so that calls *into* a relayed replica are part of the run (a
    stage-0 driver only dials out). Returns (places, the line to print; "" when unchanged)."""
    if not nat_hosts or stages < 1 or any(h in places for h in nat_hosts):
        return places, ""
    host = nat_hosts[-1]
    return ({**places, host: 1},
            f"--nat: {host} starts at stage 1 (a block replica: calls into it go through a "
            f"relay); --place {host}=STAGE overrides")


def _stdin_commands(into: queue.Queue) -> None:
    for line in sys.stdin:
        into.put(line)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    try:
        check_root()
    except LabError as exc:
        print(f"shoal lab: {exc}", file=sys.stderr)
        return 2
    if args.clean:
        gone = clean_stale()
        print(f"removed {len(gone)} namespaces of finished labs" + (
            ": " + ", ".join(gone) if gone else ""))
        return 0
    spec = lab_spec(args)
    faults = _faults(args)
    peer_names = [f"peer{i}" for i in range(1, args.hosts + 1)]
    try:
        nat_hosts = parse_nat(getattr(args, "nat", None), peer_names, COORD_HOST)
    except NatError as exc:
        raise SystemExit(f"shoal lab: {exc}") from None
    relay_hosts = parse_relay(getattr(args, "relay", None), peer_names, nat_hosts)
    places, note = nat_default_place(
        nat_hosts, _places(getattr(args, "place", []), peer_names, spec.pipeline.stages),
        spec.pipeline.stages)
    if note:
        print(note)
    work = out_dir(args.out, "lab")
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    net = LabNetwork([COORD_HOST, *peer_names], mbit=args.mbit, nat=nat_hosts)
    swarm: LabSwarm | None = None
    try:
        net.create()
        if relay_hosts and not net.transparent:  # peers then listen on 127.0.0.1 only
            raise LabError("--relay needs iptables in the lab's hosts (every connection "
                           "through the delay relay); without it a relay peer's relayed ports "
                           "would listen on loopback, where no other host reaches them")
        swarm = LabSwarm(work, spec, net, delay_ms=args.delay_ms, mdns=args.mdns,
                         data=args.data, grace_s=args.grace,
                         plaintext=getattr(args, "plaintext", False), relay_hosts=relay_hosts)
        print(f"shoal lab {net.prefix}: {args.hosts} peer hosts + coord on 198.18.0.0/15, "
              f"{args.mbit:g} Mbit/s each way, +{args.delay_ms:g} ms each way "
              f"({'every TCP connection' if net.transparent else 'peer ports only'}), "
              f"{len(faults)} faults scheduled; "
              f"{'plaintext links' if swarm.plaintext else 'mTLS on every link'}; "
              + (f"behind NAT: {', '.join(nat_hosts)}; " if nat_hosts else "")
              + (f"relays: {', '.join(relay_hosts)}; " if relay_hosts else "")
              + f"logs: {swarm.logs}")
        swarm.start(stages=places)
        summary = follow(swarm, spec, faults, args)
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"loss {summary['initial_loss']} -> {summary['final_loss']} over "
              f"{summary['steps']} steps; dropped {summary['dropped_microbatches']} of "
              f"{summary['planned_microbatches']} microbatches "
              f"({100 * summary['dropped_ratio']:.1f} %); {summary['rebuilt_stages']} stages "
              f"rebuilt; {len(summary['faults'])} faults; summary: {work / 'summary.json'}")
        return 0 if summary["completed"] else 1
    except KeyboardInterrupt:
        print("\ninterrupted: removing the lab")
        return 130
    except (LabError, ScenarioError) as exc:
        print(f"shoal lab: {exc}", file=sys.stderr)
        return 1
    finally:
        if swarm is not None:
            with contextlib.suppress(Exception):
                swarm.stop(grace=5.0)
        net.destroy()
        signal.signal(signal.SIGTERM, old_term)


def microbatch_counts(swarm: LabSwarm) -> tuple[int, int]:
    """(planned, completed) microbatches over the run, from the stage-0 drivers' step rows.

    A microbatch is dropped when its gradient never reached the step: planned - completed. A
    stage-0 peer killed mid-step writes no row for that step, so each killed driver adds its
    last step's microbatches as planned and none completed (an upper bound for what it lost).
    The coordinator's `dropped_microbatches` total is a different count, kept as
    `discarded_graphs`: every stage adds the graphs it threw away, so a microbatch dropped
    after two hops counts up to three times, and a hop that was retried elsewhere (the
    microbatch completed) still leaves a discarded graph on the slow replica.
    """
    planned = completed = 0
    for f in sorted(swarm.logs.glob("peer*.metrics.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        planned += sum(int(r.get("microbatches", 0)) for r in rows)
        completed += sum(int(r.get("completed", 0)) for r in rows)
        if rows and f.name.removesuffix(".metrics.jsonl") in swarm.killed:
            planned += int(rows[-1].get("microbatches", 0))
    return planned, completed


def follow(swarm: LabSwarm, spec: RunSpec, faults: list, args: argparse.Namespace) -> dict:
    """Run to `spec.run.steps`, firing faults; export; return the summary."""
    runner = ScenarioRunner(swarm, faults, seed=args.seed)
    typed: queue.Queue = queue.Queue()
    if args.interactive:
        threading.Thread(target=_stdin_commands, args=(typed,), daemon=True).start()
    tty = sys.stdout.isatty()
    t_start = time.monotonic()
    t_train: float | None = None
    deadline = t_start + (args.timeout or 600.0 + 10.0 * spec.run.steps)
    status: dict | None = None
    rebuilds: set[tuple] = set()
    last_print = 0.0
    step = 0
    while True:
        time.sleep(0.5)
        status = swarm.status() or status
        swarm.note_relays(status, time.monotonic() - (t_train or time.monotonic()), step)
        for e in (status or {}).get("events", []):
            if e.get("kind") == "rebuild":
                rebuilds.add((e.get("t"), e.get("peer_id"), e.get("stage")))
        rows = read_metrics(swarm.logs)
        step = max((r["step"] for r in rows), default=0)
        if step > 0 and t_train is None:
            t_train = time.monotonic()
        t = time.monotonic() - (t_train or time.monotonic())
        while not typed.empty():
            with contextlib.suppress(ScenarioError):
                f = parse_line(typed.get())
                if f is not None:
                    runner.add(f)
        if t_train is not None or any(f.at_step is None and f.at_s is None
                                      for f in runner.pending):
            for rec in runner.poll(step, t):
                print(f"\n[{rec.t:7.1f} s, step {rec.step}] {rec.action} {rec.target} "
                      f"{rec.detail}", flush=True)
        recent = [r for r in rows if r["step"] >= step - 2 and r.get("loss") is not None]
        loss = sum(r["loss"] for r in recent) / len(recent) if recent else None
        if tty or time.monotonic() - last_print > 10:
            print(progress_line(step, spec.run.steps, loss, tokens_per_s(rows), None, tty),
                  end="" if tty else "\n", flush=True)
            last_print = time.monotonic()
        if step >= spec.run.steps or time.monotonic() > deadline:
            break
    if tty:
        print()
    seconds = time.monotonic() - (t_train or t_start)
    time.sleep(spec.membership.heartbeat_s * 2.5)  # let the last stats reach the coordinator
    status = settle(swarm.status, status, 12 * spec.membership.heartbeat_s + 20.0,
                    spec.membership.heartbeat_s)
    for e in (status or {}).get("events", []):
        if e.get("kind") == "rebuild":
            rebuilds.add((e.get("t"), e.get("peer_id"), e.get("stage")))
    rows = read_metrics(swarm.logs)
    summary = summarize(spec, args.hosts, rows, status, seconds)
    planned, completed = microbatch_counts(swarm)
    coord_dropped = int(((status or {}).get("totals") or {}).get("dropped_microbatches") or 0)
    dropped = planned - completed
    summary.update({
        "lab": {"prefix": swarm.net.prefix, "hosts": args.hosts, "mbit": args.mbit,
                "delay_ms": args.delay_ms, "transparent_relay": swarm.net.transparent,
                "mdns": args.mdns, "tls": not swarm.plaintext, "nat": swarm.net.nat,
                "relay": swarm.relay_hosts},
        "completed": summary["steps"] >= spec.run.steps,
        "planned_microbatches": planned, "completed_microbatches": completed,
        "dropped_microbatches": dropped, "discarded_graphs": coord_dropped,
        "dropped_ratio": dropped / planned if planned else 0.0,
        "rebuilt_stages": len(rebuilds),
        "coordinator_restarts": ((status or {}).get("coordinator") or {}).get("restarts"),
        "faults": [vars(r) for r in runner.log],
        "faults_not_fired": [f.line for f in runner.pending],
        **reach_summary(swarm, status, summary.get("bytes_sent") or 0),
        "relay_track": swarm.relay_track, "peer_relay_bytes": swarm.peer_relay_bytes(),
    })
    relays = {p.get("peer_id"): p for p in (status or {}).get("peers") or []}
    for row in summary["peers_reach"]:  # which relay carried each peer at the end
        info = relays.get(row["peer_id"]) or {}
        row["relayed_by"] = swarm.relay_name(info.get("relayed_by") or "")
        row["relay"] = bool(info.get("relay"))
    if summary["completed"] and not args.no_export:
        from peer.pipeline.checkpoint import load_model

        model_dir = swarm.work / "model"
        swarm.export(model_dir)
        model = load_model(model_dir)
        summary["model_dir"] = str(model_dir)
        summary["export_parameters"] = sum(p.numel() for p in model.parameters())
    return summary
