"""Simulated peers and a coordinator process launcher, for the coordinator tests and the bench.

A simulated peer is a real `CoordinatorClient` with its own Ed25519 identity and its own
channel, signing every call, that reports plausible stats and serves nothing: hundreds fit in
one process. `SimSwarm` runs many of them on one event loop; a peer can be silenced (it stops
heartbeating, as a SIGKILLed peer would) or made to leave.

Heartbeats follow a fixed schedule, so that a slow coordinator cannot hide its slowness from the
measurement (coordinated omission): beat k of a peer is due at its start + k * period. A peer has
one heartbeat in flight at a time, as a real one; a beat that falls due while the previous one
is still out is sent the moment that one returns, and overdue beats go out back to back until the
peer is on schedule again; none is skipped. Each beat's latency is measured from when it was
*due*, so lateness (a saturated coordinator, or this process's own stalled event loop) counts.
The bench restarts the schedules once every peer of every process has joined
(`restart_schedules`): what the join storm left owed is not part of the steady state it measures.

`CoordinatorProcess` starts `python -m coordinator.main` as a real process on 127.0.0.1 (port 0
unless told otherwise), reads its addresses from the lines it prints, and kills only the process
it started.

Command line (used by bench/coordinator.py, one or a few of these processes):

    python -m tests.sim_peer --coordinator HOST:PORT --token-file F --peers 500 \\
        --heartbeat 1.0 --out result.json

joins all peers, prints `joined N` and heartbeats at the given rate (default: the period the
coordinator tells each peer) until a line `stop` (or EOF)
arrives on stdin (a line `restart` restarts every peer's schedule from now), then writes to --out
every answered heartbeat's (due time, latency from due, how late it was sent), the due times of
the failed ones, the beats due but not yet sent when the stop came (due time, lower bound of
their latency), the error counts, each peer's Join times (first sent, answered) and last told
period and lease, and every SwarmView received (time, serialized bytes); it prints `done`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.main import tune_interpreter
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    CoordinatorError,
    PeerStats,
)
from protocols.identity import Identity

REPO = Path(__file__).resolve().parents[1]


@dataclass
class SimPeer:
    """One simulated peer: a client plus what it pretends to be doing."""

    index: int
    client: CoordinatorClient
    samples_per_s: float
    silent: bool = False
    left: bool = False
    step: int = 0
    bytes_sent: int = 0
    heartbeats: int = 0
    errors: int = 0
    moves: int = 0
    # (due wall time, seconds from due to the answer, seconds from due to the send)
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)  # due wall times of failed beats
    unsent: list[tuple[float, float]] = field(default_factory=list)  # (due, >= latency) at stop
    views: list[tuple[float, int]] = field(default_factory=list)  # (wall time, SwarmView bytes)
    joined: tuple[float, float] | None = None  # wall times: first Join sent, Join answered

    @property
    def peer_id(self) -> str:
        return self.client.identity.peer_id

    def stats(self) -> PeerStats:
        self.step += 1
        self.bytes_sent += 4096
        stage0 = self.client.stage == 0
        return PeerStats(
            state="training", samples_per_s=self.samples_per_s, queue=self.index % 3,
            bytes_sent=self.bytes_sent, bytes_received=self.bytes_sent // 2,
            loss=5.0 / math.log(self.step + 2) if stage0 else math.nan, step=self.step,
            tokens_per_s=self.samples_per_s * 64 if stage0 else 0.0, grad_norm=1.0,
            state_hash=format(self.step, "x"),  # replicas at one step agree, as real ones do
            bytes_by_kind={"activations": self.bytes_sent // 2, f"sync:{self.sync_mode}":
                           self.bytes_sent // 2})

    @property
    def sync_mode(self) -> str:
        spec = getattr(self.client, "spec", None)  # a test's stand-in client may have none
        return spec.sync.mode if spec is not None else "allreduce"


class SimSwarm:
    """Many simulated peers on one event loop."""

    def __init__(self, address: str, token: str | None, n: int, *,
                 heartbeat_s: float | None = None, seed: int = 0, port_base: int = 20_000,
                 identities: list[Identity] | None = None) -> None:
        rng = random.Random(seed)
        ids = identities or [Identity.generate() for _ in range(n)]
        self.peers = [SimPeer(i, CoordinatorClient(address, ids[i], token),
                              round(rng.uniform(2.0, 40.0), 2)) for i in range(n)]
        self.heartbeat_s = heartbeat_s
        self.port_base = port_base
        self._stop = asyncio.Event()
        self._stopped_at: float | None = None  # monotonic
        self._schedule = 0  # bumped by restart_schedules
        self._tasks: list[asyncio.Task] = []

    async def join_all(self, concurrency: int = 32, beat: bool = True,
                       join_retry_s: float = 300.0) -> None:
        """Join every peer, at most `concurrency` Joins in flight at once (0: all at once, a
        join storm); with `beat`, each starts heartbeating as soon as it has joined (a swarm of
        thousands takes longer to join than one lease lasts)."""
        sem = asyncio.Semaphore(concurrency if concurrency > 0 else len(self.peers) or 1)

        async def one(p: SimPeer) -> None:
            async with sem:
                t0 = time.time()
                joined = await p.client.join(
                    Benchmark(samples_per_s=p.samples_per_s, device="sim"),
                    f"127.0.0.1:{self.port_base + p.index}", retry_s=join_retry_s)
                p.joined = (t0, time.time())
                p.views.append((time.time(), joined.view_proto.ByteSize()))
            if beat:
                self._tasks.append(asyncio.create_task(self._beat(p)))

        await asyncio.gather(*(one(p) for p in self.peers))

    def start(self) -> None:
        """Start the heartbeat loops of peers joined with `beat=False`."""
        for p in self.peers:
            self._tasks.append(asyncio.create_task(self._beat(p)))

    def restart_schedules(self) -> None:
        """Start every peer's schedule afresh, each at a random phase within one period from now;
        beats still owed from before are dropped. For a bench, once, after `join_all` and before
        it measures: it measures the steady state, and the backlog a join storm leaves behind on
        a saturated machine is not that. Nothing is dropped after this call."""
        self._schedule += 1

    def _period(self, p: SimPeer) -> float:
        """The forced period, or the one the coordinator told `p` last (coordinator/pacing.py)."""
        return self.heartbeat_s or p.client.heartbeat_s

    async def _beat(self, p: SimPeer) -> None:
        """Heartbeat `p` on its fixed schedule until stop (see the module docstring). The
        schedule follows the period the coordinator tells: each beat is due one period (as told
        by the last answer) after the previous one was due."""
        period = self._period(p)
        schedule = self._schedule
        # spread the swarm over one period; `due` is monotonic, `wall_due` the same instant
        due = time.monotonic() + period * random.random()
        wall_due = time.time() + due - time.monotonic()
        while not self._stop.is_set():
            if schedule != self._schedule:
                schedule = self._schedule
                period = self._period(p)
                due = time.monotonic() + period * random.random()
                wall_due = time.time() + due - time.monotonic()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # not wait_for(stop): that costs a task per beat
                continue
            this_due, this_wall = due, wall_due
            if p.silent or p.left:
                due, wall_due = due + period, wall_due + period
                continue
            sent = time.monotonic() - this_due
            try:
                result = await p.client.heartbeat(p.stats())
            except CoordinatorError:
                p.errors += 1
                p.failed.append(this_wall)
            else:
                p.samples.append((this_wall, time.monotonic() - this_due, sent))
                p.heartbeats += 1
                p.moves += result.action == "move"
                # the proto, not `.view`, which would decode it; a stand-in reply may have none
                view = getattr(result, "view_proto", None)
                if view is not None:
                    p.views.append((time.time(), view.ByteSize()))
            period = self._period(p)  # the answer may have told a new one
            due, wall_due = this_due + period, this_wall + period
        stopped = self._stopped_at or time.monotonic()
        if not (p.silent or p.left):
            while due < stopped:  # due before the stop, never sent
                p.unsent.append((wall_due, stopped - due))
                due, wall_due = due + period, wall_due + period

    def silence(self, k: int) -> list[SimPeer]:
        """Make the last k talking peers stop heartbeating (as if SIGKILLed)."""
        chosen = [p for p in self.peers if not (p.silent or p.left)][-k:]
        for p in chosen:
            p.silent = True
        return chosen

    async def stop(self) -> None:
        self._stopped_at = time.monotonic()
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(p.client.close() for p in self.peers), return_exceptions=True)

    def live(self) -> list[SimPeer]:
        return [p for p in self.peers if not (p.silent or p.left)]


# ---------------------------------------------------------------------- coordinator process


class CoordinatorProcess:
    """A real `python -m coordinator.main` process on 127.0.0.1; `kill()` and `stop()` only
    touch the process id this object started."""

    def __init__(self, state_dir: Path, *, config: Path | None = None, port: int = 0,
                 http_port: int = 0, extra: list[str] | None = None, mdns: bool = False,
                 log_level: str = "WARNING") -> None:
        self.state_dir = Path(state_dir)
        self.cmd = [sys.executable, "-m", "coordinator.main", "--host", "127.0.0.1",
                    "--port", str(port), "--http-port", str(http_port),
                    "--state-dir", str(state_dir), "--log-level", log_level]
        if config is not None:
            self.cmd += ["--config", str(config)]
        if not mdns:
            self.cmd.append("--no-mdns")
        self.cmd += extra or []
        self.proc: subprocess.Popen[str] | None = None
        self.grpc_address = ""
        self.http_url = ""
        self.token_file: Path | None = None
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_address.rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.http_url.rstrip("/").rsplit(":", 1)[1])

    def start(self, timeout: float = 30.0) -> CoordinatorProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"coordinator exited with {self.proc.wait()}:\n"
                                   + "".join(self.lines))
            self.lines.append(line)
            if m := re.search(r"gRPC listening on (\S+)", line):
                self.grpc_address = m.group(1)
            elif m := re.search(r"dashboard (http://\S+/)", line):
                self.http_url = m.group(1)
            elif m := re.search(r"join token in (\S+)", line):
                self.token_file = Path(m.group(1))
            if self.grpc_address and self.http_url and (
                    self.token_file is not None or "--allow-file" in self.cmd):
                self._drain()
                return self
        self.kill()
        raise TimeoutError(f"coordinator did not start within {timeout} s:\n" + "".join(self.lines))

    def _drain(self) -> None:
        """Keep reading its output in the background so a full pipe never blocks it."""
        import threading

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)

        threading.Thread(target=pump, daemon=True).start()

    @property
    def token(self) -> str | None:
        return self.token_file.read_text().strip() if self.token_file else None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the graceful stop; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> CoordinatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ---------------------------------------------------------------------- command line


async def _main(args: argparse.Namespace) -> None:
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    swarm = SimSwarm(args.coordinator, token, args.peers, heartbeat_s=args.heartbeat,
                     seed=args.seed, port_base=args.port_base)
    t0 = time.time()
    await swarm.join_all(args.concurrency, join_retry_s=args.join_retry)
    print(f"joined {len(swarm.peers)} in {time.time() - t0:.1f} s", flush=True)
    tune_interpreter()  # the same GIL and GC settings as the coordinator process
    lags: list[tuple[float, float]] = []
    watcher = asyncio.create_task(_watch_lag(lags))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _read_commands, loop, swarm)
    watcher.cancel()
    await swarm.stop()
    result = {"peers": len(swarm.peers), "errors": sum(p.errors for p in swarm.peers),
              "loop_lags": lags,
              "rejoins": sum(p.client.rejoins for p in swarm.peers),
              "heartbeat_s": args.heartbeat,
              "periods": [p.client.heartbeat_s for p in swarm.peers],  # as last told
              "leases": [p.client.lease_s for p in swarm.peers],
              "joins": [p.joined for p in swarm.peers],
              "views": [v for p in swarm.peers for v in p.views],
              "samples": [s for p in swarm.peers for s in p.samples],
              "failed": [t for p in swarm.peers for t in p.failed],
              "unsent": [u for p in swarm.peers for u in p.unsent]}
    Path(args.out).write_text(json.dumps(result))
    print("done", flush=True)


async def _watch_lag(lags: list[tuple[float, float]], period_s: float = 0.05) -> None:
    """Record (time, delay) whenever this process's own event loop wakes up late (> 20 ms):
    latency a simulated peer measures during such a stall is the simulator's, not the
    coordinator's."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        lag = loop.time() - t0 - period_s
        if lag > 0.02:
            lags.append((time.time(), lag))


def _read_commands(loop: asyncio.AbstractEventLoop, swarm: SimSwarm) -> None:
    """Until `stop` (or EOF) on stdin; `restart` restarts the heartbeat schedules."""
    for line in sys.stdin:
        if line.strip() == "restart":
            loop.call_soon_threadsafe(swarm.restart_schedules)
        elif line.strip() == "stop":
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--token-file")
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--heartbeat", type=float, default=None,
                    help="seconds between heartbeats (default: the run spec's)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="joins in flight (0: every peer at once, a join storm)")
    ap.add_argument("--join-retry", type=float, default=300.0,
                    help="seconds a peer keeps trying to join (CoordinatorClient.join's retry_s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port-base", type=int, default=20_000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(_main(args))


if __name__ == "__main__":
    main()
