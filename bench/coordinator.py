"""How many peers one coordinator holds: join storm, heartbeat latency, coordinator cost, views.

    python -m bench.coordinator [--peers 1000 --seconds 30 --procs 2 --heartbeat 1.0]

Starts a real coordinator process (`python -m coordinator.main`, state in a temporary
directory), then `--procs` simulated-peer processes (tests/sim_peer.py, started fresh, never
forked) that join `--peers` peers in all, each with its own Ed25519 key, channel and
certificate, and heartbeat with signed calls at the period the coordinator tells them (the run
spec's `--heartbeat`, 1 s, in a small swarm; slower in a large one: coordinator/pacing.py), on a
fixed schedule (tests/sim_peer.py: a beat that falls due while the peer's previous one is still
out is sent as soon as that returns, never skipped; the schedules start afresh once all have
joined, so that the join storm's backlog is not measured). All peers of a process send their
Join at once (a join storm, as after a coordinator restart in front of a large swarm); the join
storm time runs from the first Join sent to the last one answered, over all processes, and no
peer may give up (the coordinator turns Joins away with a retry-after while it is busy; the
clients wait and retry). After a warm-up it measures for `--seconds`, over the beats *due* in
that window: the latency of each from the moment it was due to its answer (waiting to be sent,
signing, gRPC both ways, authentication, handling), so a coordinator that falls behind shows as
latency rather than as beats quietly not sent (coordinated omission); beats still unsent at the
stop count with the lower bound of their latency. It also reports the heartbeat rate achieved
(answers that came back within the window, per second) against the rate intended (the sum of 1 /
told period), the coordinator's CPU time from /proc/<pid>/stat (% of one core) and its resident
memory, and the swarm-view bytes the coordinator sent (in Join, Heartbeat and GetSwarmView
replies: whole views, and deltas to clients that apply them; its /metrics counter) per peer per
minute, from the first Join to the end of the window. Target
(DESIGN.md, "Scale, on paper"): p99 < 50 ms for 1000 peers on 2 cores, with the simulated peers
sharing those cores.

The last line reads `coordinator: peers = N, p50 = A ms, p99 = X ms (target < 50 ms: met),
cpu = C %, join storm = S s, view = V kB/peer/min` (issue #19's format); p99 is rounded up
against its target (bench/report.py). The line above it gives the heartbeat rate achieved and
the period told.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Target, machine
from tests.sim_peer import REPO, CoordinatorProcess

P99 = Target("p99", 50.0, at_least=False, strict=True, unit="ms")
LATE_S = 0.010  # a beat sent this long after it was due counts as sent late


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine spent busy (from /proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _memory_mib(pid: int) -> tuple[float, float]:
    info = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":" in line)
    return (int(info["VmRSS"].split()[0]) / 1024, int(info["VmHWM"].split()[0]) / 1024)


def _wait_until_settled(http_url: str, quiet_s: float = 2.0, limit_s: float = 60.0) -> float:
    """Wait until the epoch stopped moving (every join and first heartbeat bumps it) for
    `quiet_s`; returns how long that took. The join storm is not the steady state measured."""
    t0 = time.time()
    last, since = -1, time.time()
    while time.time() - t0 < limit_s:
        with urllib.request.urlopen(http_url + "healthz", timeout=10) as r:
            epoch = json.loads(r.read())["epoch"]
        if epoch != last:
            last, since = epoch, time.time()
        elif time.time() - since >= quiet_s:
            break
        time.sleep(0.25)
    return time.time() - t0


def _metric(text: str, name: str, default: float = 0.0) -> float:
    """One sample of the coordinator's /metrics text (`name` with its labels, if any)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else default


def _metrics(http_url: str) -> str:
    return urllib.request.urlopen(http_url + "metrics", timeout=10).read().decode()


def _handler_totals(text: str) -> tuple[float, int]:
    """(seconds, count) the coordinator's heartbeat handler has spent, from /metrics."""
    return (_metric(text, "shoal_heartbeat_duration_seconds_sum"),
            int(_metric(text, "shoal_heartbeat_duration_seconds_count")))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class Window:
    """The heartbeats of the measured window [t0, t1), from the simulated peers' results."""

    seconds: float
    latencies: list[float] = field(default_factory=list)  # s from due to answer; unsent: >=
    answered_in: int = 0  # answers that arrived inside the window
    sent_late: int = 0  # answered beats sent more than LATE_S after they were due
    answered: int = 0
    failed: int = 0
    unsent: int = 0

    @property
    def due(self) -> int:
        return self.answered + self.failed + self.unsent

    @property
    def achieved_per_s(self) -> float:
        return self.answered_in / self.seconds


def window_of(results: list[dict], t0: float, t1: float) -> Window:
    """Count the beats due in [t0, t1) and the answers that arrived in it (wall times)."""
    w = Window(t1 - t0)
    for result in results:
        for due, latency, sent in result["samples"]:
            w.answered_in += t0 <= due + latency < t1
            if t0 <= due < t1:
                w.answered += 1
                w.latencies.append(latency)
                w.sent_late += sent > LATE_S
        w.failed += sum(t0 <= due < t1 for due in result["failed"])
        for due, at_least in result["unsent"]:
            if t0 <= due < t1:
                w.unsent += 1
                w.latencies.append(at_least)
    return w


def run(peers: int, seconds: float, procs: int, heartbeat_s: float, warmup_s: float,
        join_retry_s: float = 300.0) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-coordinator-"))
    config = tmp / "run.toml"
    config.write_text(f"[run]\nname = 'bench-coordinator'\n[membership]\n"
                      f"heartbeat_s = {heartbeat_s}\nlease_s = {max(5.0, 5 * heartbeat_s)}\n")
    coord = CoordinatorProcess(tmp / "state", config=config).start()
    sims: list[subprocess.Popen[str]] = []
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        per = [peers // procs + (i < peers % procs) for i in range(procs)]
        t_join = time.time()
        for i, n in enumerate(per):
            sims.append(subprocess.Popen(
                [sys.executable, "-m", "tests.sim_peer", "--coordinator", coord.grpc_address,
                 "--token-file", str(coord.token_file), "--peers", str(n),
                 "--concurrency", "0", "--join-retry", str(join_retry_s), "--seed", str(i),
                 "--port-base",
                 str(20_000 + sum(per[:i])), "--out", str(tmp / f"sim{i}.json")],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for sim in sims:
            assert sim.stdout is not None
            line = sim.stdout.readline()
            if not line.startswith("joined"):
                raise RuntimeError(f"a simulated-peer process failed: {line!r}")
        join_s = time.time() - t_join
        storm_view_bytes = _metric(_metrics(coord.http_url), "shoal_view_bytes_sent_total")
        for sim in sims:  # every peer has joined: the schedules start afresh from here
            assert sim.stdin is not None
            sim.stdin.write("restart\n")
            sim.stdin.flush()
        print(f"{peers} peers joined in {join_s:.1f} s from {procs} processes (all at once); "
              f"waiting for the "
              f"epoch to settle, warming up {warmup_s:.0f} s, then measuring {seconds:.0f} s",
              flush=True)
        settle_s = _wait_until_settled(coord.http_url)
        time.sleep(warmup_s)
        metrics0 = _metrics(coord.http_url)
        handled0 = _handler_totals(metrics0)
        t0, cpu0 = time.time(), _cpu_seconds(coord.pid)
        sim0, busy0 = sum(_cpu_seconds(s.pid) for s in sims), _machine_busy_seconds()
        time.sleep(seconds)
        t1, cpu1 = time.time(), _cpu_seconds(coord.pid)
        sim_cpu = 100 * (sum(_cpu_seconds(s.pid) for s in sims) - sim0) / (t1 - t0)
        busy = 100 * (_machine_busy_seconds() - busy0) / (t1 - t0)
        rss, peak = _memory_mib(coord.pid)
        metrics = _metrics(coord.http_url)
        handled1 = _handler_totals(metrics)
        coord_lag = float(re.search(r"^shoal_event_loop_lag_seconds (\S+)$", metrics,
                                    re.M).group(1))
        status = json.loads(urllib.request.urlopen(coord.http_url + "api/status", timeout=10)
                            .read())
        for sim in sims:
            assert sim.stdin is not None and sim.stdout is not None
            sim.stdin.write("stop\n")
            sim.stdin.flush()
        for sim in sims:
            assert sim.stdout is not None
            sim.stdout.readline()
            sim.wait(60)
        joins_refused = int(_metric(metrics, 'shoal_rejected_calls_total{method="Join"}'))
        gc_pause_s = _metric(metrics, "shoal_gc_pause_max_seconds", math.nan)
        view_bytes = _metric(metrics, "shoal_view_bytes_sent_total")
        window_bytes = view_bytes - _metric(metrics0, "shoal_view_bytes_sent_total")
        whole = _metric(metrics, 'shoal_views_sent_total{kind="whole"}')
        deltas = _metric(metrics, 'shoal_views_sent_total{kind="delta"}')
        results, errors, rejoins, sim_lag = [], 0, 0, 0.0
        for i in range(procs):
            result = json.loads((tmp / f"sim{i}.json").read_text())
            results.append(result)
            sim_lag = max([sim_lag] + [lag for t, lag in result["loop_lags"] if t0 <= t < t1])
            errors += result["errors"]
            rejoins += result["rejoins"]
    finally:
        for sim in sims:
            if sim.poll() is None:
                sim.kill()
        coord.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # state, token, results: nothing is left behind
    window = window_of(results, t0, t1)
    joins = [j for r in results for j in r["joins"] if j is not None]
    storm_s = max(j[1] for j in joins) - min(j[0] for j in joins)
    periods = sorted(x for r in results for x in r["periods"])
    leases = sorted(x for r in results for x in r["leases"])
    first_join = min(j[0] for j in joins)
    view_minutes = (t1 - first_join) / 60
    view_kb = view_bytes / 1000 / peers / view_minutes
    lat_ms = sorted(x * 1000 for x in window.latencies)
    p50, p90, p99 = (_percentile(lat_ms, q) for q in (0.5, 0.9, 0.99))
    cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
    intended = sum(1 / x for x in periods)
    achieved = window.achieved_per_s
    print(f"coordinator bench: {machine()}")
    print(f"{'peers':>8} {'hb/s':>8} {'intended':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'cpu %':>7} {'rss MiB':>8} {'peak MiB':>9} {'errors':>7} "
          f"{'rejoins':>8}")
    print(f"{peers:>8} {achieved:>8.1f} {intended:>9.1f} {p50:>8.2f} {p90:>8.2f} "
          f"{P99.figure(p99):>8} {(lat_ms[-1] if lat_ms else float('nan')):>8.2f} "
          f"{cpu:>7.1f} {rss:>8.1f} {peak:>9.1f} {errors:>7} {rejoins:>8}")
    late = 100 * window.sent_late / window.answered if window.answered else float("nan")
    print(f"heartbeats due in the {t1 - t0:.1f} s window: {window.due} "
          f"({window.due / (t1 - t0):.1f}/s); answered {window.answered}, failed "
          f"{window.failed}, not sent by the stop {window.unsent}; {late:.1f} % sent more "
          f"than {LATE_S * 1000:.0f} ms after they were due (latency counts from the due time)")
    handled = handled1[1] - handled0[1]
    handler_ms = 1000 * (handled1[0] - handled0[0]) / handled if handled else float("nan")
    print(f"the epoch settled {settle_s:.1f} s after the last join (views delivered)")
    per_beat_ms = 1000 * (cpu1 - cpu0) / handled if handled else float("nan")
    print(f"inside the coordinator the heartbeat handler took {handler_ms:.3f} ms on average "
          f"({handled} handled); the process spent {per_beat_ms:.2f} ms of CPU per heartbeat "
          f"(gRPC, authentication, the handler); the rest of the latency is waiting to be sent, "
          f"signing, gRPC on the peer's side and waiting for a core")
    print(f"worst event-loop stall: coordinator {coord_lag * 1000:.0f} ms (last 10 s), "
          f"simulated peers {sim_lag * 1000:.0f} ms (whole window); worst garbage-collector "
          f"pause in the coordinator {gc_pause_s * 1000:.0f} ms (last minute)")
    other = busy - cpu - sim_cpu
    print(f"coordinator saw {status['totals']['live_peers']} live peers at epoch "
          f"{status['epoch']}; {os.cpu_count()} cores shared with the simulated peers, which "
          f"used {sim_cpu:.0f} % of one core in all; other processes on this machine used "
          f"{max(0.0, other):.0f} %" + ("  (a noisy machine: timings are not clean)"
                                        if other > 25 else ""))
    print(f"join storm: {len(joins)} of {peers} peers joined, {storm_s:.1f} s from the first "
          f"Join sent to the last answered; Joins turned away meanwhile (retried by the "
          f"clients): {joins_refused}")
    print(f"pace told: heartbeat {periods[0]:g}-{periods[-1]:g} s (spec {heartbeat_s:g} s), "
          f"lease {leases[0]:g}-{leases[-1]:g} s")
    print(f"views sent (the coordinator's count of view bytes in replies): "
          f"{view_bytes / 1e6:.1f} MB in all from the first Join to the end of the window "
          f"({view_minutes:.1f} min): {storm_view_bytes / 1e6:.1f} MB during the join storm, "
          f"{window_bytes / 1e6:.1f} MB in the measured window; {whole:.0f} whole views and "
          f"{deltas:.0f} deltas; {view_kb:.1f} kB/peer/min")
    print(f"coordinator: peers = {peers}, heartbeats = {achieved:.1f}/s of {intended:.1f}/s "
          f"intended at the told period")
    print(f"coordinator: peers = {peers}, p50 = {p50:.2f} ms, {P99.verdict(p99)}, "
          f"cpu = {cpu:.1f} %, join storm = {storm_s:.1f} s, view = {view_kb:.1f} kB/peer/min")
    return 0 if P99.met(p99) and not errors and len(joins) == peers else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--procs", type=int, default=2, help="simulated-peer processes")
    ap.add_argument("--heartbeat", type=float, default=1.0,
                    help="the run spec's membership.heartbeat_s (the coordinator may tell a "
                         "large swarm a slower period)")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--join-retry", type=float, default=300.0,
                    help="seconds each peer keeps trying to join before it gives up (the "
                         "bench fails if one does); default CoordinatorClient.join's own")
    args = ap.parse_args()
    return run(args.peers, args.seconds, args.procs, args.heartbeat, args.warmup,
               args.join_retry)


if __name__ == "__main__":
    raise SystemExit(main())
