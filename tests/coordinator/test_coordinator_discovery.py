"""mDNS: a coordinator process announces itself and a peer on this host finds it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from protocols.coordinator_client import Benchmark, CoordinatorClient
from protocols.discovery import announce, discover
from protocols.identity import Identity
from tests.sim_peer import CoordinatorProcess


def multicast_works() -> str | None:
    """None when an in-process announcement can be discovered here, else why not."""
    async def probe() -> str | None:
        try:
            a = await announce(1, swarm_id="probe-swarm", version="0", public_key=bytes(32),
                               host="127.0.0.1", name="shoal-probe")
        except Exception as exc:
            return f"cannot announce over mDNS here: {exc}"
        try:
            found = await discover(3.0, swarm_id="probe-swarm")
        finally:
            await a.close()
        return None if found else "multicast is not delivered on this host (nothing discovered)"

    return asyncio.run(probe())


def test_peer_discovers_the_coordinator_over_mdns(tmp_path: Path) -> None:
    reason = multicast_works()
    if reason is not None:
        pytest.skip(reason)
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
