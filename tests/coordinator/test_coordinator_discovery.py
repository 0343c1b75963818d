"""mDNS: a coordinator process announces itself and a peer on this host finds it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from protocols.coordinator_client import Benchmark, CoordinatorClient
from protocols.discovery import discover
from protocols.identity import Identity
from tests.sim_peer import CoordinatorProcess

IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000  # linux/if.h


def multicast_interfaces() -> list[str]:
    """The interfaces that are up, not loopback, and multicast-capable (Linux sysfs)."""
    found = []
    for iface in sorted(Path("/sys/class/net").glob("*")):
        try:
            flags = int((iface / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_UP and flags & IFF_MULTICAST and not flags & IFF_LOOPBACK:
            found.append(iface.name)
    return found


@pytest.mark.mdns
def test_peer_discovers_the_coordinator_over_mdns(tmp_path: Path) -> None:
    # The one condition that excuses this test: no interface mDNS could use. Anything else that
    # goes wrong (announce raising, nothing discovered) is a failure, not a skip: an interface
    # that is up with multicast delivers a host's own announcements back to it.
    if not multicast_interfaces():
        pytest.skip("no network interface here is up and multicast-capable (mDNS needs one); "
                    "under CI=true this skip fails the run")
    with CoordinatorProcess(tmp_path / "state", mdns=True) as coord:
        with urllib.request.urlopen(coord.http_url + "api/status", timeout=5) as r:
            swarm_id = json.loads(r.read())["run"]["swarm_id"]
        key = Identity.load(coord.state_dir / "coordinator.key")

        async def scenario() -> None:
            found = await discover(5.0, swarm_id=swarm_id)
            assert len(found) == 1, found
            host, port, props = found[0]
            assert port == coord.grpc_port
            assert props["fingerprint"] == key.peer_id and props["version"] == "0.1.0"
            client = CoordinatorClient(f"{host}:{port}", Identity.generate(), coord.token,
                                       expect_coordinator_key=bytes.fromhex(props["key"]))
            result = await client.join(Benchmark(samples_per_s=1.0), "127.0.0.1:9000")
            assert result.swarm_id == swarm_id
            await client.close()

        asyncio.run(scenario())
        assert coord.stop() == 0  # a graceful stop withdraws the announcement
        assert asyncio.run(discover(1.5, swarm_id=swarm_id)) == []
