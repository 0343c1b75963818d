"""The lab's processes: a real coordinator and real peers inside the lab's hosts, and the faults.

`LabSwarm` is shoal/local.py's `Swarm` moved onto the lab network: the same programs
(`python -m shoal.cli coordinator|peer ...`), logs, token and metrics files, and the same `stop`,
but each process is started with `ip netns exec HOST` (which execs, so the recorded pid is the
program itself and signals reach it directly). Host `coord` (198.18.0.1) runs the coordinator
and nothing else; hosts `peer1..peerN` run one peer each at a time, and a delay relay each
(shoal/lab/relay.py) when the lab adds latency. A peer on a host behind the lab's NAT
(LabNetwork.nat) gets neither --host nor --advertise, as on a volunteer's machine.

Peers on `relay_hosts` are started with `--relay` (respawned ones too), before the others: the
others start once the coordinator lists them as reached directly and offering to relay, so that
the NAT'd peers' relays are spread over them and the coordinator. `note_relays` records, per
peer, each change of the relay that carries it (`relay_track`, in summary.json).

Every link is mTLS (the coordinator, bound to 0.0.0.0, serves TLS with the swarm CA; peers
advertise 198.18.x addresses, so their servers require client certificates from it), unless
`plaintext=True` passes `--plaintext` to every program.

Peers either get `--coordinator 198.18.0.1:7000` or, with `mdns=True`, no address at all: they
find the coordinator by zeroconf across the bridge, as on a LAN.

Faults act on recorded pids and on the network only: `kill` (SIGKILL), `preempt` (SIGTERM; the
peer drains within its grace, then SIGKILL if it is still there), `freeze`/`thaw`
(SIGSTOP/SIGCONT: a peer that holds its connections but answers nothing), `partition`/`heal`
(the host's switch port down/up), `restart_coordinator` (SIGTERM, then the same command and state
directory again: peers reconnect), `spawn` (a fresh peer with a new identity on a host whose peer
is gone — a replacement spot instance). The orchestrator itself stays in the machine's own
namespace and reaches the coordinator's HTTP API through a socket made inside `coord`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from protocols.runspec import RunSpec
from shoal.lab.network import RELAY_PORT, LabError, LabNetwork, in_netns
from shoal.swarm import Swarm

COORD_HOST = "coord"
GRPC_PORT = 7000
HTTP_PORT = 8080
PEER_PORT = 7100
RELAY_OFFER_S = 180.0  # how long start() waits for the --relay peers to be offered as relays


class LabSwarm(Swarm):
    """A coordinator and peers on a LabNetwork; `stop` ends exactly what it started."""

    def __init__(self, work: Path, spec: RunSpec, net: LabNetwork, *, delay_ms: float = 0.0,
                 mdns: bool = False, data: str | None = None, peer_args: list[str] | None = None,
                 grace_s: float = 10.0, plaintext: bool = False,
                 relay_hosts: list[str] | None = None) -> None:
        peer_hosts = [n for n in net.names if n != COORD_HOST]
        super().__init__(work, spec, len(peer_hosts), data, "cpu")
        self.net = net
        self.peer_hosts = peer_hosts
        self.delay_ms = delay_ms
        self.mdns = mdns
        self.peer_args = peer_args or []
        self.grace_s = grace_s
        self.plaintext = plaintext  # --plaintext on every program: no TLS on any link
        self.port = GRPC_PORT
        self.http_port = HTTP_PORT
        self.on_host: dict[str, subprocess.Popen] = {}
        self.generation: dict[str, int] = {}
        self.relays: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []
        self.frozen: set[str] = set()
        self.killed: list[str] = []  # "host-generation" of every peer killed with SIGKILL
        self.relay_hosts = list(relay_hosts or [])  # their peers offer to relay (--relay)
        self.relay_track: dict[str, list[dict]] = {}  # "host-gen" -> relay changes (note_relays)
        self._ids: dict[str, str] = {}  # peer id -> "host-gen", from the identity files

    @property
    def coordinator_address(self) -> str:
        return f"{self.net.hosts[COORD_HOST].address}:{GRPC_PORT}"

    # ------------------------------------------------------------------ processes

    def spawn(self, host: str, argv: list[str], log_name: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` inside `host`, output appended to logs/`log_name`."""
        import os

        with open(self.logs / log_name, "ab") as log:
            return subprocess.Popen([*self.net.exec_prefix(host), *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)

    def _cli(self, host: str, args: list[str], log_name: str,
             env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.spawn(host, [sys.executable, "-m", "shoal.cli", *args], log_name, env)

    def start(self, http_port: int = 0, stages: dict[str, int] | None = None) -> None:
        """Coordinator, relays and one peer per host (`stages`: host -> --stage; by default the
        coordinator assigns them). The lab's ports are fixed per host: `http_port` is unused."""
        (self.work / "run.toml").write_text(self.spec.to_toml())
        if not self.token_file.exists():
            from protocols.auth import new_token

            self.token_file.write_text(new_token() + "\n")
            self.token_file.chmod(0o600)
        if self.delay_ms > 0 or self.net.transparent:  # the REDIRECT sends every link there
            self._start_relays()
        self.start_coordinator()
        # --relay peers first, and only once the coordinator offers them as relays the others:
        # a NAT'd peer is told its relay when its dial-back fails (in about a second here) and
        # keeps it (sticky), so a relay offered later would carry nobody
        first = [h for h in self.peer_hosts if h in self.relay_hosts]
        for host in [*first, *[h for h in self.peer_hosts if h not in first]]:
            stage = (stages or {}).get(host)
            self.spawn_peer(host, None if stage is None else ["--stage", str(stage)])
            if host == (first or [None])[-1]:
                self.wait_relays_offered(first, RELAY_OFFER_S)

    def wait_relays_offered(self, hosts: list[str], timeout: float) -> None:
        """Until the coordinator lists the peer of each of `hosts` as live, reached directly
        and offering to relay (/api/status: reach "direct", relay true). LabError after
        `timeout` seconds or when one of those peers exits."""
        deadline = time.monotonic() + timeout
        waiting = set(hosts)
        while waiting:
            for host in waiting:
                if self.on_host[host].poll() is not None:
                    raise LabError(f"the --relay peer on {host} exited with code "
                                   f"{self.on_host[host].returncode}; see {self.logs}/{host}.log")
            for p in (self.status() or {}).get("peers") or []:
                host = self.peer_name(p.get("peer_id") or "").rpartition("-")[0]
                if p.get("live") and p.get("relay") and p.get("reach") == "direct":
                    waiting.discard(host)
            if waiting and time.monotonic() > deadline:
                raise LabError(f"the coordinator did not offer {', '.join(sorted(waiting))} as "
                               f"relays within {timeout:.0f} s (reached directly, --relay); see "
                               f"{self.logs}")
            if waiting:
                time.sleep(0.5)

    def _start_relays(self) -> None:
        for name, h in self.net.hosts.items():
            if self.net.transparent:
                listen, target = f"0.0.0.0:{RELAY_PORT}", []
            elif name == COORD_HOST:
                continue  # without iptables only the peers' advertised ports are relayed
            else:
                listen, target = f"{h.address}:{PEER_PORT}", ["--to", f"127.0.0.1:{PEER_PORT}"]
            self.relays.append(self.spawn(
                name, [sys.executable, "-m", "shoal.lab.relay", "--listen", listen, *target,
                       "--delay-ms", str(self.delay_ms), "--stats",
                       str(self.logs / f"{name}.relay.json")], f"{name}.relay.log"))

    def start_coordinator(self) -> None:
        args = ["coordinator", "--config", str(self.work / "run.toml"), "--host", "0.0.0.0",
                "--port", str(GRPC_PORT), "--http-port", str(HTTP_PORT), "--state-dir",
                str(self.work / "coordinator"), "--token-file", str(self.token_file),
                "--trust-stage-hints"]  # the lab's operator places peers with --stage
        if not self.mdns:
            args.append("--no-mdns")
        args += self._tls_args()
        self.coordinator = self._cli(COORD_HOST, args, "coordinator.log")
        self.wait_port(COORD_HOST, GRPC_PORT, 60, self.coordinator)
        self.wait_port(COORD_HOST, HTTP_PORT, 30, self.coordinator)

    def spawn_peer(self, host: str, extra: list[str] | None = None) -> subprocess.Popen:
        """A fresh peer (new identity) on `host`; the host's previous one must be gone."""
        old = self.on_host.get(host)
        if old is not None and old.poll() is None:
            raise ValueError(f"{host} still runs peer pid {old.pid}; kill or preempt it first")
        gen = self.generation[host] = self.generation.get(host, 0) + 1
        keys = self.work / "keys"
        keys.mkdir(exist_ok=True)
        addr = self.net.hosts[host].address
        listen = "127.0.0.1" if (self.delay_ms > 0 and not self.net.transparent) else "0.0.0.0"
        # Behind the lab's NAT a peer is started as the README's several-machines recipe says:
        # no --host, no --advertise (it advertises what the coordinator observes: its router).
        where = ([] if host in self.net.nat else ["--host", listen, "--advertise", addr])
        args = ["peer", "--identity", str(keys / f"{host}-{gen}.key"), "--token-file",
                str(self.token_file), *where, "--port",
                str(PEER_PORT), "--grace", str(self.grace_s), "--metrics-file",
                str(self.logs / f"{host}-{gen}.metrics.jsonl"), *self.peer_args, *(extra or [])]
        if host in self.relay_hosts:  # a respawned peer on a relay host offers to relay too
            args.append("--relay")
        if not self.mdns:
            args += ["--coordinator", self.coordinator_address]
        args += self._tls_args()
        if self.data:
            args += ["--data", self.data]
        if self.init_model:
            args += ["--init-model", self.init_model]
        p = self._cli(host, args, f"{host}.log", env={"SHOAL_TORCH_THREADS": "1"})
        self.peers.append(p)
        self.on_host[host] = p
        return p

    def _tls_args(self) -> list[str]:
        return ["--plaintext"] if self.plaintext else []

    def live_peer_hosts(self) -> list[str]:
        return [h for h in self.peer_hosts
                if h in self.on_host and self.on_host[h].poll() is None]

    # ------------------------------------------------------------------ relays

    def relay_name(self, address: str) -> str:
        """The lab host a relay `address` (HOST:PORT) is on: `coord` for the coordinator's own
        relay, `peerN` for a peer started with --relay; the address itself if no host has it;
        "" for "" (not relayed)."""
        host = address.rpartition(":")[0]
        for name, h in self.net.hosts.items():
            if host and h.address == host:
                return name
        return address

    def peer_name(self, peer_id: str) -> str:
        """`host-generation` of the lab peer with `peer_id` (from the identity files the lab
        wrote), or "" if none of them has it."""
        if peer_id not in self._ids:
            from protocols.identity import Identity

            for key in sorted((self.work / "keys").glob("peer*-*.key")):
                if key.stem not in self._ids.values():
                    with contextlib.suppress(Exception):
                        self._ids[Identity.load(key).peer_id] = key.stem
        return self._ids.get(peer_id, "")

    def note_relays(self, status: dict | None, t: float, step: int) -> None:
        """Record, per lab peer, each change of (relay, reach) the coordinator reports:
        `relay_track[host-gen]` gains {t, step, relay, reach, address, stage} when the peer's
        `relayed_by` (as a lab host name: relay_name) or `reach` changed since the last
        status. t and step are the lab's training clock (as in the fault records)."""
        for p in (status or {}).get("peers") or []:
            if not p.get("live"):
                continue
            name = self.peer_name(p.get("peer_id") or "")
            if not name:
                continue
            row = {"t": round(max(0.0, t), 2), "step": step,
                   "relay": self.relay_name(p.get("relayed_by") or ""),
                   "reach": p.get("reach") or "", "address": p.get("address") or "",
                   "stage": p.get("stage")}
            track = self.relay_track.setdefault(name, [])
            if not track or (track[-1]["relay"], track[-1]["reach"]) != (row["relay"],
                                                                          row["reach"]):
                track.append(row)

    def peer_relay_bytes(self) -> int:
        """Bytes the lab's hosts sent to and received from ports that --relay peers opened for
        relayed peers (their relayed addresses, as recorded by note_relays), from the delay
        relays' per-port counters (logs/HOST.relay.json; 0 without delay relays). An estimate:
        the counters are per destination port only, so another host's connection to the
        same port number would be counted too."""
        ports = {row["address"].rpartition(":")[2] for track in self.relay_track.values()
                 for row in track if row["relay"] in self.relay_hosts and row["address"]}
        total = 0
        for f in self.logs.glob("*.relay.json"):
            with contextlib.suppress(OSError, ValueError):
                by_port = json.loads(f.read_text()).get("bytes_by_port") or {}
                total += sum(sum(v) for k, v in by_port.items() if k in ports)
        return total

    # ------------------------------------------------------------------ faults

    def _signal(self, host: str, sig: signal.Signals) -> int:
        p = self.coordinator if host == COORD_HOST else self.on_host.get(host)
        if p is None or p.poll() is not None:
            raise ValueError(f"{host} runs no live process to send {sig.name} to")
        p.send_signal(sig)
        return p.pid

    def kill(self, host: str) -> int:
        self.frozen.discard(host)
        pid = self._signal(host, signal.SIGKILL)
        if host != COORD_HOST:
            self.killed.append(f"{host}-{self.generation[host]}")
        return pid

    def preempt(self, host: str, grace_s: float) -> int:
        """SIGTERM now; SIGKILL after `grace_s` if the peer has not left by then."""
        if host in self.frozen:
            self.thaw(host)
        pid = self._signal(host, signal.SIGTERM)
        p = self.on_host[host]
        deadline = time.monotonic() + grace_s

        def reaper() -> None:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

        import threading

        threading.Thread(target=reaper, daemon=True, name=f"reap-{host}").start()
        return pid

    def freeze(self, host: str) -> int:
        self.frozen.add(host)
        return self._signal(host, signal.SIGSTOP)

    def thaw(self, host: str) -> int:
        self.frozen.discard(host)
        return self._signal(host, signal.SIGCONT)

    def partition(self, host: str) -> None:
        self.net.set_link(host, False)

    def heal(self, host: str) -> None:
        self.net.set_link(host, True)

    def restart_coordinator(self) -> None:
        c = self.coordinator
        if c is not None and c.poll() is None:
            c.send_signal(signal.SIGTERM)
            try:
                c.wait(20)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        self.start_coordinator()

    def stop(self, grace: float = 15.0) -> None:
        for host in list(self.frozen):  # a stopped process cannot drain
            with contextlib.suppress(ValueError, ProcessLookupError):
                self.thaw(host)
        for name, h in self.net.hosts.items():
            if not h.up:
                with contextlib.suppress(Exception):
                    self.heal(name)
        super().stop(grace)
        for p in [*self.others, *self.relays]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.others, *self.relays]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------ reaching the hosts

    def connect(self, host: str, address: str, port: int, timeout: float = 5.0
                ) -> socket.socket:
        """A TCP connection made from inside `host`."""
        return in_netns(self.net.hosts[host].netns,
                        lambda: socket.create_connection((address, port), timeout=timeout))

    def wait_port(self, host: str, port: int, timeout: float,
                  proc: subprocess.Popen | None = None) -> None:
        addr = self.net.hosts[host].address
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the process on {host} exited with code {proc.returncode} at "
                                 f"start; see its log in {self.logs}")
            with contextlib.suppress(OSError):
                self.connect(host, addr, port, 1.0).close()
                return
            time.sleep(0.2)
        raise SystemExit(f"nothing listens on {host} {addr}:{port} after {timeout:.0f} s")

    def http_get(self, path: str) -> bytes | None:
        """GET `path` from the coordinator's HTTP port, from inside `coord`; None on any
        failure (unreachable, not 200)."""
        addr = self.net.hosts[COORD_HOST].address
        try:
            conn = http.client.HTTPConnection(addr, HTTP_PORT, timeout=5)
            conn.sock = self.connect(COORD_HOST, addr, HTTP_PORT)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            return body if r.status == 200 else None
        except (OSError, http.client.HTTPException):
            return None

    def status(self) -> dict | None:
        """The coordinator's /api/status, fetched from inside `coord`; None if unreachable."""
        body = self.http_get("/api/status")
        try:
            return json.loads(body) if body is not None else None
        except ValueError:
            return None

    def export(self, out: Path, timeout: float = 300) -> None:
        """`shoal export` from inside `coord`, as a user on that host would run it."""
        p = self._cli(COORD_HOST, ["export", "--coordinator", self.coordinator_address,
                                   "--identity", str(self.work / "keys" / "export.key"),
                                   "--token-file", str(self.token_file), "--out", str(out),
                                   *self._tls_args()],
                      "export.log")
        self.others.append(p)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise SystemExit(f"shoal export did not finish in {timeout:.0f} s; see "
                             f"{self.logs / 'export.log'}") from None
        if rc != 0:
            raise SystemExit(f"shoal export failed ({rc}); see {self.logs / 'export.log'}")
