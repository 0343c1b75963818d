"""The lab's NAT at the network level, without Shoal (root only).

A host behind `--nat` dials out to any lab host, which sees its router's public address as the
source; nothing dials in, neither to the host's private address (even when the sender routes it
at the router) nor to the router's public address on any port; a partition cuts the host off
and a heal restores it; the host's link is still capped; and `destroy` leaves no namespace,
interface or iptables rule behind.

Connections are made both ways the lab makes them: through the delay relays (every TCP
connection a lab host opens goes through its own relay, shoal/lab/relay.py) and, with the
relay's mark set on the socket, straight onto the network, where a refusal or a drop shows as
the error it is.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.lab import nat
from shoal.lab.network import RELAY_PORT, LabError, LabNetwork, in_netns, netns_available
from shoal.lab.relay import RELAY_MARK
from tests.polling import poll_until

pytestmark = pytest.mark.root
CAP_MBIT = 4.0


def machine_state() -> tuple[str, str]:
    """The machine's own iptables rules and links: what a lab must leave as it found."""
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    rules = "\n".join(x for x in rules.splitlines() if not x.startswith("#"))
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    links = "\n".join(sorted(x.split(":")[1].strip() for x in links.splitlines()))
    return rules, links


def namespaces_of(net: LabNetwork) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [n for n in names.split() if n.startswith(net.prefix)]


def dial(netns: str, address: str, port: int, *, marked: bool, timeout: float = 3.0
         ) -> socket.socket:
    """A TCP connection from inside `netns`; `marked` bypasses the host's delay relay."""
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if marked:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, RELAY_MARK)
        s.settimeout(timeout)
        try:
            s.connect((address, port))
        except BaseException:
            s.close()
            raise
        return s
    return in_netns(netns, connect)


def listen(netns: str, port: int) -> socket.socket:
    srv = in_netns(netns, lambda: socket.create_server(("0.0.0.0", port)))
    srv.settimeout(5.0)
    return srv


@contextlib.contextmanager
def lab(names: list[str], nat_hosts: list[str], mbit: float, relays: bool, tmp: Path):
    before = machine_state()
    net = LabNetwork(names, mbit=mbit, nat=nat_hosts)
    procs: list[subprocess.Popen] = []
    try:
        net.create()
        for h in net.hosts.values() if relays else []:
            procs.append(subprocess.Popen(
                [*net.exec_prefix(h.name), sys.executable, "-m", "shoal.lab.relay", "--listen",
                 f"0.0.0.0:{RELAY_PORT}", "--delay-ms", "20", "--stats",
                 str(tmp / f"{h.name}.relay.json")], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        for h in net.hosts.values() if relays else []:
            assert poll_until(lambda h=h: (tmp / f"{h.name}.relay.json").exists(), 20), \
                f"the relay on {h.name} did not start"
        yield net
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        net.destroy()
    after = machine_state()
    assert not namespaces_of(net), f"lab namespaces left behind: {namespaces_of(net)}"
    assert after[1] == before[1], "the machine's own links changed"
    assert after[0] == before[0], "the machine's own iptables rules changed"


@pytest.fixture
def netns_ok() -> None:
    why = netns_available()
    if why:
        pytest.skip(why)


def test_nat_host_dials_out_and_nobody_dials_in(netns_ok, tmp_path):
    with lab(["coord", "peer1", "peer2"], ["peer2"], 0.0, True, tmp_path) as net:
        p1, p2 = net.hosts["peer1"], net.hosts["peer2"]
        assert p2.router and p2.private.startswith("198.19.") and p2.address == "198.18.0.3"
        assert not p1.router and not p1.private
        # out: through peer2's delay relay, then its router's masquerade
        srv = listen(p1.netns, 9000)
        c = dial(p2.netns, p1.address, 9000, marked=False)
        a, seen = srv.accept()
        c.sendall(b"ping")
        assert a.recv(4) == b"ping"
        a.sendall(b"pong")
        assert c.recv(4) == b"pong"
        assert seen[0] == p2.address, "the far end should see the router's public address"
        c.close()
        a.close()
        stats = tmp_path / "peer2.relay.json"
        assert poll_until(lambda: json.loads(stats.read_text())["connections"] >= 1, 10), \
            "peer2's connection out should cross peer2's delay relay (the added latency)"
        # out, straight (marked): still the router's address
        c = dial(p2.netns, p1.address, 9000, marked=True)
        a, seen = srv.accept()
        assert seen[0] == p2.address
        c.close()
        a.close()

        # in: a server listens on every port the test tries, on peer2 itself
        inner = [listen(p2.netns, port) for port in (9001, 7100)]
        for port in (9001, 7100, 22):
            with pytest.raises(ConnectionRefusedError):  # nothing listens on the router
                dial(p1.netns, p2.address, port, marked=True).close()
        with pytest.raises(OSError):  # not on the bridge: no one answers ARP for it
            dial(p1.netns, p2.private, 9001, marked=True, timeout=5).close()
        # through peer1's relay the dial is accepted locally and closed once the relay fails
        for target in (p2.private, p2.address):
            c = dial(p1.netns, target, 9001, marked=False)
            c.settimeout(15)
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(1) == b""
            c.close()
        subprocess.run(["ip", "-n", p1.netns, "route", "add", f"{p2.private}/32", "via",
                        p2.address], check=True)
        with pytest.raises(OSError):  # routed at the router, which forwards no new connection
            dial(p1.netns, p2.private, 9001, marked=True, timeout=3).close()
        for s in inner:
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.accept()
            s.close()
        # a partition of the NAT'd host cuts its router's uplink; a heal restores it
        net.set_link("peer2", False)
        with pytest.raises(OSError):
            dial(p2.netns, p1.address, 9000, marked=True, timeout=2).close()
        net.set_link("peer2", True)
        c = dial(p2.netns, p1.address, 9000, marked=True, timeout=10)
        a, seen = srv.accept()
        assert seen[0] == p2.address
        c.close()
        a.close()
        srv.close()


def transfer_mbit(net: LabNetwork, dialer: str, server: str, nbytes: int, upload: bool
                  ) -> float:
    """Mbit/s of one `nbytes` TCP transfer on a connection `dialer` opens to `server` (not
    through the relays); `upload`: the dialer sends, else the server does."""
    srv = listen(net.hosts[server].netns, 9100)
    srv.settimeout(30)
    got: list[int] = []

    def drain(s: socket.socket) -> None:
        n = 0
        while data := s.recv(1 << 16):
            n += len(data)
        got.append(n)

    def serve() -> None:
        a, _ = srv.accept()
        a.settimeout(60)
        if upload:
            drain(a)
        else:
            a.sendall(b"\0" * nbytes)
            a.shutdown(socket.SHUT_WR)
            drain(a)
        a.close()

    t = threading.Thread(target=serve)
    t.start()
    start = time.monotonic()
    c = dial(net.hosts[dialer].netns, net.hosts[server].address, 9100, marked=True)
    c.settimeout(60)
    if upload:
        c.sendall(b"\0" * nbytes)
        c.shutdown(socket.SHUT_WR)
        t.join(60)
    else:
        drain(c)
        c.shutdown(socket.SHUT_WR)
        t.join(60)
    seconds = time.monotonic() - start
    c.close()
    srv.close()
    assert got[0] == nbytes, got
    return nbytes * 8 / seconds / 1e6


def test_nat_host_is_still_shaped(netns_ok, tmp_path):
    """A generous bound, not a timing: an unshaped veth moves hundreds of Mbit/s or more."""
    with lab(["peer1", "peer2"], ["peer2"], CAP_MBIT, False, tmp_path) as net:
        up = transfer_mbit(net, "peer2", "peer1", 1_000_000, upload=True)
        down = transfer_mbit(net, "peer2", "peer1", 1_000_000, upload=False)
        print(f"NAT'd host on a {CAP_MBIT:g} Mbit/s cap: {up:.2f} up, {down:.2f} down (Mbit/s)")
        assert up < 3 * CAP_MBIT and down < 3 * CAP_MBIT, (up, down)


def test_nat_needs_iptables_and_peer_hosts(netns_ok, monkeypatch):
    hosts = ["peer1", "peer2"]
    assert nat.parse_nat("peer2, peer1,peer2", hosts, "coord") == ["peer2", "peer1"]
    with pytest.raises(nat.NatError, match="coordinator"):
        nat.parse_nat("coord", hosts, "coord")
    with pytest.raises(nat.NatError, match=r"peer9.*peer1, peer2"):
        nat.parse_nat("peer9", hosts, "coord")
    before = machine_state()
    real_which = nat.shutil.which
    monkeypatch.setattr(nat.shutil, "which",
                        lambda tool: None if tool == "iptables" else real_which(tool))
    net = LabNetwork(["coord", "peer1"], nat=["peer1"])
    with pytest.raises(LabError, match="--nat needs iptables"):
        net.create()
    assert machine_state() == before and not namespaces_of(net)


def test_relayed_bytes_reads_the_coordinators_total():
    from shoal.lab.reach import RELAYED_METRIC, relayed_bytes

    text = (f"# TYPE {RELAYED_METRIC} counter\n{RELAYED_METRIC} 1234.0\n"
            'shoal_peer_relayed_bytes_total{peer="ab"} 1234.0\n')
    assert relayed_bytes(text) == (1234, RELAYED_METRIC)  # the per-peer split is not added
    n, why = relayed_bytes("# TYPE shoal_x gauge\nshoal_x 1\n")
    assert n == 0 and RELAYED_METRIC in why
    assert relayed_bytes(None)[0] == 0


def test_clean_stale_removes_a_dead_labs_routers(netns_ok):
    from shoal.lab.network import RUN_DIR, clean_stale

    before = machine_state()
    net = LabNetwork(["coord", "peer1"], nat=["peer1"])
    try:
        net.create()
        router = net.hosts["peer1"].router
        dead = subprocess.Popen(["true"])
        dead.wait()
        rec = RUN_DIR / f"{net.prefix}.json"
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "pid": dead.pid}))
        assert router in clean_stale()
        assert not rec.exists()
    finally:
        net.destroy()
    assert machine_state() == before and not namespaces_of(net)
