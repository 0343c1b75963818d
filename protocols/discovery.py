"""Finding a coordinator on the LAN with mDNS / DNS-SD (zeroconf), `_shoal._tcp.local.`.

A convenience, never a requirement: an explicit `--coordinator HOST:PORT` always works, and
multicast does not cross Docker overlay networks, most Kubernetes CNIs or the host/VM boundary
of Docker Desktop. The coordinator announces its gRPC port with TXT properties:

    swarm_id     the run's swarm id
    version      the coordinator's shoal version
    fingerprint  peer id of the coordinator's Ed25519 key (sha256(key)[:16] hex)
    key          the coordinator's raw public key, hex
    tls_fp       the coordinator's fingerprint (protocols.tls.fingerprint: its key and its CA)

TXT data is unauthenticated, so it only narrows the search: a peer must already know the
fingerprint (its token file carries it, or --coordinator-fingerprint), keeps only announcements
with that `tls_fp` (`matching`), and CoordinatorClient then checks the coordinator's CA and key
against it before trusting anything it says. A peer without a fingerprint does not use mDNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from protocols.identity import peer_id_of

log = logging.getLogger("shoal.discovery")

SERVICE_TYPE = "_shoal._tcp.local."


class DiscoveryError(RuntimeError):
    """mDNS could not be used here (no multicast-capable interface, or the port is taken)."""


def local_ipv4_addresses(include_loopback: bool = True) -> list[str]:
    """IPv4 addresses of this host's interfaces (the announcement lists them all)."""
    found: list[str] = []
    try:
        import ifaddr  # a dependency of zeroconf

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str) and ip.ip not in found:
                    found.append(ip.ip)
    except Exception:  # ifaddr missing or failing: the default route's address will do
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this only picks a source address
            found.append(s.getsockname()[0])
    if not include_loopback:
        found = [a for a in found if not a.startswith("127.")]
    return found or ["127.0.0.1"]


@dataclass
class Announcement:
    """A registered announcement; `close()` withdraws it (goodbye packets) and frees the socket."""

    zeroconf: AsyncZeroconf
    info: AsyncServiceInfo

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.zeroconf.async_unregister_service(self.info)
        await self.zeroconf.async_close()


async def announce(port: int, *, swarm_id: str, version: str, public_key: bytes,
                   host: str = "0.0.0.0", name: str | None = None,
                   tls_fingerprint: str = "") -> Announcement:
    """Announce a coordinator listening on `port` (on `host`, or on every interface).

    Raises:
        DiscoveryError: zeroconf cannot run here; the caller should log and carry on.
    """
    addresses = local_ipv4_addresses() if host in ("0.0.0.0", "", "::") else [host]
    fingerprint = peer_id_of(public_key)
    label = name or f"shoal-{swarm_id[:20]}-{fingerprint[:8]}"
    properties = {"swarm_id": swarm_id, "version": version, "fingerprint": fingerprint,
                  "key": public_key.hex()}
    if tls_fingerprint:
        properties["tls_fp"] = tls_fingerprint
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port, properties=properties,
        addresses=[socket.inet_aton(a) for a in addresses],
        server=f"{label}.local.")
    try:
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise DiscoveryError(f"mDNS is unavailable here ({exc}); peers need an explicit "
                             f"--coordinator HOST:PORT") from exc
    try:
        await zc.async_register_service(info, allow_name_change=True)
    except Exception as exc:
        await zc.async_close()
        raise DiscoveryError(f"mDNS announcement failed ({exc}); peers need an explicit "
                             f"--coordinator HOST:PORT") from exc
    log.info("announced %s on %s port %d over mDNS", info.name, ", ".join(addresses), port)
    return Announcement(zc, info)


async def discover(timeout: float = 3.0, *, swarm_id: str | None = None
                   ) -> list[tuple[str, int, dict[str, str]]]:
    """Coordinators answering on the LAN within `timeout` seconds: (host, port, properties).

    Hosts are IPv4 addresses, loopback last (a coordinator on this host is also reachable on
    its LAN address). Filter by `swarm_id` to find one run. Returns [] when multicast is not
    available; never raises for that.
    """
    try:
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    except OSError as exc:
        log.warning("mDNS discovery unavailable here: %s", exc)
        return []
    names: set[str] = set()

    def on_change(zeroconf: object, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    found: dict[str, tuple[str, int, dict[str, str]]] = {}
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    try:
        while loop.time() < deadline:
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
            for name in list(names - found.keys()):
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if not await info.async_request(zc.zeroconf, 1000):
                    continue
                props = {_s(k): _s(v) for k, v in info.properties.items() if v is not None}
                if swarm_id is not None and props.get("swarm_id") != swarm_id:
                    names.discard(name)
                    continue
                hosts = sorted(info.parsed_addresses(IPVersion.V4Only),
                               key=lambda a: (a.startswith("127."), a))
                if hosts and info.port:
                    found[name] = (hosts[0], int(info.port), props)
            if found and not (names - found.keys()) and loop.time() - started >= 1.0:
                break  # everything seen within a second is resolved: stop waiting
    finally:
        with contextlib.suppress(Exception):
            await browser.async_cancel()
        await zc.async_close()
    return list(found.values())


def _s(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


class DiscoveryRefused(RuntimeError):
    """mDNS found no coordinator this peer may trust; the message says what to pass instead."""


def matching(found: list[tuple[str, int, dict[str, str]]], fingerprint: str | None
             ) -> tuple[str, int, dict[str, str]]:
    """The first announcement with `fingerprint`; DiscoveryRefused when there is none (or when
    the peer has no fingerprint: whatever answers first on a LAN is not a coordinator to trust).
    """
    if not fingerprint:
        raise DiscoveryRefused(
            "finding the coordinator by mDNS needs its fingerprint, or any host on the LAN could "
            "pose as it: use the token file the coordinator wrote (it carries the fingerprint), "
            "pass --coordinator-fingerprint sha256:... (printed by `shoal coordinator`), or "
            "pass --coordinator HOST:PORT")
    if not found:
        raise DiscoveryRefused("no coordinator found by mDNS on this LAN: pass --coordinator "
                               "HOST:PORT or set SHOAL_COORDINATOR")
    for entry in found:
        if entry[2].get("tls_fp", "").lower() == fingerprint:
            return entry
    others = ", ".join(sorted({e[2].get("tls_fp", "(none)")[:23] + "..." for e in found}))
    raise DiscoveryRefused(
        f"mDNS found {len(found)} coordinator(s), none with fingerprint {fingerprint} (they "
        f"announce {others}): refusing to join another coordinator. Check the token file, or "
        f"pass --coordinator HOST:PORT")
