"""The lab's NAT: a host behind its own home router, which it can dial out of and nobody into.

`shoal lab --nat peer3,peer4` builds, for each named host, a router namespace between the host
and the switch (names carry the lab's prefix; host i's router is PREFIX-rI):

    switch pI ── eth0 [PREFIX-rI] lan0 ── eth0 [PREFIX-hI]
                 198.18.0.(i+1)/15         198.19.I.2/30, default via 198.19.I.1
                 (the host's public         (private, still inside 198.18.0.0/15, so
                  lab address)               nothing of the lab ever leaves that range)

The router forwards (net.ipv4.ip_forward=1 in its namespace only), MASQUERADEs what the host
sends out of eth0 (nat POSTROUTING), and forwards back in only what conntrack knows as an
answer (filter FORWARD: policy DROP, lan0→eth0 accepted, eth0→lan0 only ESTABLISHED,RELATED).
There is no DNAT and no port forward: a connection to the router's public address finds nothing
listening there (refused), and a packet for the host's private address is dropped even when the
sender routes it at the router. So the host can dial any lab host, which sees the router's
public address as the source, and no lab host can dial the host: the case Shoal's relay is for.

Everything else of the lab applies unchanged, because it acts where the host's traffic passes:
the tbf caps sit on the host's own eth0 (the link to its router), a partition takes the
switch port down (now the router's uplink), and latency is added by the delay relay of the host
that dials (for a NAT'd host's connections its own relay, before the router; see
shoal/lab/network.py). Rules live in the router's namespace and go with it on `destroy`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable

PRIVATE_BITS = 30


class NatError(ValueError):
    """`--nat` names a host this lab cannot put behind a NAT; the message says which and why."""


def parse_nat(value: str | Iterable[str] | None, peer_hosts: list[str], coordinator: str
              ) -> list[str]:
    """The hosts of `--nat peer3,peer4`, checked: each a peer host of this lab, once.

    Raises NatError naming the bad entry (an unknown host, the coordinator's host)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name == coordinator:
            raise NatError(f"--nat {name}: the coordinator's host cannot be behind a NAT (peers "
                           f"must reach it); name peer hosts, e.g. --nat peer3,peer4")
        if name not in peer_hosts:
            raise NatError(f"--nat {name}: no such host in this lab (its peer hosts are "
                           f"{', '.join(peer_hosts)})")
        if name not in out:
            out.append(name)
    return out


def private_addresses(i: int) -> tuple[str, str]:
    """(router, host) addresses on the private link of host `i`: 198.19.i.1 and 198.19.i.2.

    198.19.0.0/16 is inside the lab's 198.18.0.0/15; public host addresses reach it only past
    65 535 hosts, which the lab never builds."""
    if not 0 <= i < 256:
        raise NatError(f"host index {i}: the lab's private NAT links number 0..255")
    return f"198.19.{i}.1", f"198.19.{i}.2"


def check_iptables() -> None:
    """Raise NatError unless iptables exists: the NAT is made of its rules, there is no other."""
    if shutil.which("iptables") is None:
        raise NatError("--nat needs iptables (the routers masquerade and filter with it): "
                       "install it (apt-get install iptables) or run without --nat")


def build_router(run: Callable[..., object], router_ns: str, host_ns: str, switch_ns: str,
                 port: str, public: str, public_bits: int, i: int) -> str:
    """Make host `i`'s router and private link; the router netns and host netns must exist.

    Args:
        run: shoal.lab.network.run (raises LabError on failure).
        router_ns, host_ns, switch_ns: the namespaces (already created, all the lab's).
        port: the switch-side veth end for this host (the router's uplink).
        public: the host's public lab address, given to the router's eth0.
    Returns the host's private address. Both veth pairs are created directly in their
    namespaces, so nothing touches the machine's own namespace.
    """
    r_addr, h_addr = private_addresses(i)
    ipr = ("ip", "-n", router_ns)
    run("ip", "link", "add", "eth0", "netns", router_ns, "type", "veth", "peer", "name", port,
        "netns", switch_ns)
    run("ip", "-n", switch_ns, "link", "set", port, "master", "br0", "up")
    run(*ipr, "addr", "add", f"{public}/{public_bits}", "dev", "eth0")
    run("ip", "link", "add", "lan0", "netns", router_ns, "type", "veth", "peer", "name", "eth0",
        "netns", host_ns)
    run(*ipr, "addr", "add", f"{r_addr}/{PRIVATE_BITS}", "dev", "lan0")
    for dev in ("lo", "eth0", "lan0"):
        run(*ipr, "link", "set", dev, "up")
    run("ip", "-n", host_ns, "addr", "add", f"{h_addr}/{PRIVATE_BITS}", "dev", "eth0")
    run("ip", "-n", host_ns, "link", "set", "lo", "up")
    run("ip", "-n", host_ns, "link", "set", "eth0", "up")
    run("ip", "-n", host_ns, "route", "add", "default", "via", r_addr)
    inside = ("ip", "netns", "exec", router_ns)
    run(*inside, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ipt = (*inside, "iptables", "-w")
    run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-s", f"{h_addr}/{PRIVATE_BITS}", "-o", "eth0",
        "-j", "MASQUERADE")
    run(*ipt, "-P", "FORWARD", "DROP")
    run(*ipt, "-A", "FORWARD", "-i", "lan0", "-o", "eth0", "-j", "ACCEPT")
    run(*ipt, "-A", "FORWARD", "-i", "eth0", "-o", "lan0", "-m", "conntrack", "--ctstate",
        "ESTABLISHED,RELATED", "-j", "ACCEPT")
    return h_addr
