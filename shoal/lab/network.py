"""The lab's network: N hosts as Linux network namespaces on one bridge, with capped links.

Topology of one lab instance (every name carries the instance's unique prefix, e.g. `sl3f9a1c`):

    netns PREFIX-sw        the switch: bridge br0, one port pN per host (nothing else)
    netns PREFIX-h0..hN    the hosts: lo + eth0 (the veth to the switch), ifb0 for ingress shaping
                           eth0 has 198.18.0.(i+1)/15 — RFC 2544's benchmarking range, never routed

Nothing is added to the machine's own namespace: both ends of each veth are created directly in
their namespaces, so the host's interfaces and routes are untouched and traffic cannot leave.
Two labs (or a leftover one) never collide because every name is prefixed, and `destroy` removes
only the namespaces this instance made. Each instance records itself in RUN_DIR; `clean_stale`
removes the labs whose owning process is gone (`shoal lab --clean`).

Per host and direction the link is a token bucket (tc tbf): egress on eth0, ingress redirected to
ifb0 (ingress qdisc + u32 match-all + mirred) and shaped there. These are the qdiscs this kernel
has; netem, fq, fq_codel, cake, red and the police action are not available, so latency comes
from the delay relay (shoal/lab/relay.py): an iptables REDIRECT (nat OUTPUT) in each host sends
every TCP connection the host opens to another host to the host's own relay, which dials the
original destination (its socket marked so it is not redirected again) and holds each chunk for
the one-way delay in both directions. Each connection thus crosses exactly one relay, on the
dialling side, so RTT grows by twice the delay and the far end still sees the dialler's address
as the source (a coordinator observes its peers' addresses). Without iptables (nat table) the lab
falls back to relaying the peers' advertised ports only (LabNetwork.transparent is then False).

Partitions take the switch-side port down (the host keeps its configuration), heals bring it up.

Hosts named in `nat` sit behind their own router namespace PREFIX-rI (shoal/lab/nat.py): the
router holds the host's public address on the switch port, the host a private one behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shoal.lab.nat import NatError, build_router, check_iptables
from shoal.lab.relay import RELAY_MARK

RUN_DIR = Path("/run/shoal-lab")
NETNS_DIR = Path("/var/run/netns")
SUBNET_BITS = 15
RELAY_PORT = 7999  # the transparent relay's port inside every host
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class LabError(RuntimeError):
    """The lab cannot be built or changed here; the message says which command failed and why."""


def check_root() -> None:
    """Raise LabError unless this process can create namespaces and shape links."""
    if os.geteuid() != 0:
        raise LabError("shoal lab needs root (it creates network namespaces, veths and tc "
                       "qdiscs): run it with sudo, or as root in a container with NET_ADMIN")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed: install iproute2 "
                           "(apt-get install iproute2)")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({p.returncode}): "
                       f"{(p.stderr or p.stdout).strip()}")
    return p


def host_address(i: int) -> str:
    """The address of host `i` (0-based): 198.18.0.1, 198.18.0.2, ... across 198.18.0.0/15."""
    n = i + 1
    return f"198.{18 + n // 65536}.{(n // 256) % 256}.{n % 256}"


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread that has joined `netns`; sockets it makes stay in `netns`.

    setns(2) changes only the calling thread's namespace, so the caller is never moved; a socket
    keeps the namespace it was created in, so it can be used from any thread afterwards.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class LabHost:
    """One host: its namespace, its address on the bridge and its switch port."""

    index: int
    name: str  # "coord", "peer1", ...
    netns: str
    address: str
    port: str  # the veth end in the switch namespace
    mbit: float = 0.0
    up: bool = True
    router: str = ""  # behind a NAT (shoal/lab/nat.py): the router's netns, else ""
    private: str = ""  # behind a NAT: the host's own (private) address on its router's link


@dataclass
class LabNetwork:
    """Namespaces, bridge, caps and relays' redirects of one lab instance."""

    names: list[str]
    mbit: float = 0.0  # per-host cap each way; 0 = uncapped
    prefix: str = field(default_factory=lambda: "sl" + secrets.token_hex(3))
    hosts: dict[str, LabHost] = field(default_factory=dict)
    transparent: bool = False
    made: list[str] = field(default_factory=list)
    nat: list[str] = field(default_factory=list)  # hosts behind their own NAT (shoal/lab/nat.py)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def create(self) -> None:
        """Build everything; on failure removes what was made and raises LabError."""
        check_root()
        unknown = [n for n in self.nat if n not in self.names]
        if unknown:
            raise LabError(f"--nat {','.join(unknown)}: no such host in this lab")
        if self.nat:
            try:
                check_iptables()
            except NatError as exc:
                raise LabError(str(exc)) from None
        self._record()
        try:
            self._netns_add(self.switch)
            run("ip", "-n", self.switch, "link", "set", "lo", "up")
            run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge",
                "mcast_snooping", "0")
            run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                self._add_host(i, name)
            self.transparent = self._redirect_all()
        except BaseException:
            self.destroy()
            raise

    def _netns_add(self, ns: str) -> None:
        run("ip", "netns", "add", ns)
        self.made.append(ns)
        self._record()

    def _add_host(self, i: int, name: str) -> None:
        ns, port = f"{self.prefix}-h{i}", f"p{i}"
        self._netns_add(ns)
        addr = host_address(i)
        host = LabHost(i, name, ns, addr, port)
        if name in self.nat:  # eth0 leads to the host's router, whose uplink is the port
            host.router = f"{self.prefix}-r{i}"
            self._netns_add(host.router)
            host.private = build_router(run, host.router, ns, self.switch, port, addr,
                                        SUBNET_BITS, i)
        else:
            run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                "netns", self.switch)
            run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{addr}/{SUBNET_BITS}", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = host
        if self.mbit > 0:
            self.shape(name, self.mbit)

    def _redirect_all(self) -> bool:
        """Send every TCP connection a host opens to another host through its own relay (all
        but the relay's own, which carry RELAY_MARK); False if iptables cannot."""
        if shutil.which("iptables") is None:
            return False
        for h in self.hosts.values():
            p = run("ip", "netns", "exec", h.netns, "iptables", "-t", "nat", "-A", "OUTPUT",
                    "-p", "tcp", "-m", "addrtype", "!", "--dst-type", "LOCAL", "-m", "mark",
                    "!", "--mark", str(RELAY_MARK), "-j", "REDIRECT", "--to-ports",
                    str(RELAY_PORT), check=False)
            if p.returncode != 0:
                return False
        return True

    # ------------------------------------------------------------------ changes while running

    def shape(self, name: str, mbit: float) -> None:
        """Cap host `name` to `mbit` Mbit/s each way (tbf egress, ifb + tbf ingress)."""
        h = self.hosts[name]
        rate = f"{mbit}mbit"
        burst = str(max(16 * 1024, int(mbit * 1e6 / 8 * 0.004)))  # >= 4 ms of the rate
        tbf = ["tbf", "rate", rate, "burst", burst, "latency", "50ms"]
        run("tc", "-n", h.netns, "qdisc", "replace", "dev", "eth0", "root", *tbf)
        if h.mbit == 0:
            run("ip", "-n", h.netns, "link", "add", "ifb0", "type", "ifb")
            run("ip", "-n", h.netns, "link", "set", "ifb0", "up")
            run("tc", "-n", h.netns, "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress")
            run("tc", "-n", h.netns, "filter", "add", "dev", "eth0", "parent", "ffff:",
                "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred",
                "egress", "redirect", "dev", "ifb0")
        run("tc", "-n", h.netns, "qdisc", "replace", "dev", "ifb0", "root", *tbf)
        h.mbit = mbit

    def set_link(self, name: str, up: bool) -> None:
        """Partition host `name` from the bridge (up=False) or heal it."""
        h = self.hosts[name]
        run("ip", "-n", self.switch, "link", "set", h.port, "up" if up else "down")
        h.up = up

    def exec_prefix(self, name: str) -> list[str]:
        """The argv prefix that runs a command inside host `name`."""
        return ["ip", "netns", "exec", self.hosts[name].netns]

    def netns_pids(self, ns: str) -> list[int]:
        p = run("ip", "netns", "pids", ns, check=False)
        return [int(x) for x in p.stdout.split() if x.isdigit()]

    # ------------------------------------------------------------------ teardown

    def destroy(self) -> None:
        """Kill whatever still runs in this lab's namespaces, delete them, forget the record."""
        for ns in reversed(self.made):
            for pid in self.netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            run("ip", "netns", "del", ns, check=False)
        self.made.clear()
        with contextlib.suppress(FileNotFoundError):
            (RUN_DIR / f"{self.prefix}.json").unlink()

    def _record(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        (RUN_DIR / f"{self.prefix}.json").write_text(json.dumps(
            {"pid": os.getpid(), "netns": self.made}))


def clean_stale() -> list[str]:
    """Remove the namespaces of labs whose owner process has exited; returns what was removed."""
    removed: list[str] = []
    if not RUN_DIR.is_dir():
        return removed
    for rec in RUN_DIR.glob("sl*.json"):
        try:
            info = json.loads(rec.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if _alive(pid):
            continue
        net = LabNetwork([], prefix=rec.stem)
        net.made = [ns for ns in info.get("netns", []) if ns.startswith(rec.stem + "-")]
        removed += net.made
        net.destroy()
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_available() -> str | None:
    """None if namespaces can be made here, else why not (tests skip with this reason)."""
    try:
        check_root()
    except LabError as exc:
        return str(exc)
    ns = f"slprobe{os.getpid()}"
    p = run("ip", "netns", "add", ns, check=False)
    if p.returncode != 0:
        return f"`ip netns add` fails here: {p.stderr.strip()}"
    run("ip", "netns", "del", ns, check=False)
    return None
