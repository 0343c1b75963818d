"""A real coordinator process and 50 simulated peers: join, heartbeat, expiry, a SIGKILL and a
restart that keeps the run, the epoch and the members, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

from protocols.runspec import RunSpec
from tests.sim_peer import CoordinatorProcess, SimSwarm

HEARTBEAT_S, LEASE_S = 0.5, 2.0
SPEC = RunSpec().replace(**{
    "run.name": "swarm-test", "pipeline.stages": 3, "sync.mode": "demo",
    "membership.heartbeat_s": HEARTBEAT_S, "membership.lease_s": LEASE_S,
    "membership.certificate_s": 60.0})


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read(), parse_constant=_no_constants)


def _no_constants(name: str) -> float:
    raise AssertionError(f"/api/status contains {name}: JSON has no NaN or Infinity")


async def status(coord: CoordinatorProcess) -> dict:
    return await asyncio.to_thread(get_json, coord.http_url + "api/status")


async def wait_for(predicate, coord: CoordinatorProcess, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = await status(coord)
        if predicate(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last totals {st['totals']}, "
                                 f"epoch {st['epoch']}")
        await asyncio.sleep(0.25)


def test_swarm_expiry_and_restart_after_sigkill(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(SPEC.to_toml())
    coord = CoordinatorProcess(tmp_path / "state", config=config).start()
    try:
        asyncio.run(_scenario(coord))
    finally:
        coord.kill()


async def _scenario(coord: CoordinatorProcess) -> None:
    swarm = SimSwarm(coord.grpc_address, coord.token, 50)
    second: CoordinatorProcess | None = None
    try:
        await swarm.join_all()
        st = await wait_for(lambda s: s["totals"]["live_peers"] == 50, coord, 10, "50 peers")
        assert st["epoch"] >= 50
        assert {p["stage"] for p in st["peers"]} == {0, 1, 2, 3}
        await wait_for(lambda s: all(p["state"] == "training" for p in s["peers"]), coord, 5,
                       "every peer training")

        # ten peers fall silent: their leases lapse and the epoch grows
        epoch_before = (await status(coord))["epoch"]
        silent = {p.peer_id for p in swarm.silence(10)}
        st = await wait_for(lambda s: s["totals"]["live_peers"] == 40, coord, LEASE_S + 4,
                            "10 expiries")
        assert st["epoch"] >= epoch_before + 10
        expired = {e["peer_id"] for e in st["events"] if e["kind"] == "expire"}
        assert expired == silent
        lost = {p["peer_id"] for p in st["peers"] if p["state"] == "lost"}
        assert lost == silent
        view = await swarm.live()[0].client.view()
        assert silent <= set(view.revoked) and len(view.peers) == 40

        # SIGKILL the coordinator; restart it on the same ports from its state directory
        await asyncio.sleep(HEARTBEAT_S * 2)  # let one more flush of leases happen
        before = await status(coord)
        await asyncio.to_thread(coord.kill)
        await asyncio.sleep(1.0)  # peers' heartbeats fail meanwhile and are retried
        second = CoordinatorProcess(coord.state_dir, port=coord.grpc_port,
                                    http_port=coord.http_port)  # no --config: the stored run
        await asyncio.to_thread(second.start)
        # every live peer heard from after the restart (last_seen and started_at are both the
        # restarted coordinator's clock; last_seen of before the kill comes back from its store)
        st = await wait_for(
            lambda s: s["totals"]["live_peers"] == 40 and all(
                p["last_seen"] > s["coordinator"]["started_at"] for p in s["peers"] if p["live"]),
            second, 15, "the 40 live peers heartbeating the restarted coordinator")
        assert st["run"]["swarm_id"] == before["run"]["swarm_id"]
        assert st["run"]["spec"] == before["run"]["spec"]
        assert st["run"]["sync_mode"] == "demo" and st["run"]["stages"] == 4
        assert st["epoch"] > before["epoch"]
        assert st["coordinator"]["restarts"] == 1
        assert any(e["kind"] == "restart" for e in st["events"])
        assert {p["peer_id"] for p in st["peers"] if p["state"] == "lost"} == silent
        live = swarm.live()
        assert sum(p.client.rejoins for p in live) == 0, "live peers had to re-join"
        assert all(p.client.epoch >= before["epoch"] for p in live)
        hb = {p.peer_id: p.heartbeats for p in live}
        deadline = time.monotonic() + 15
        while not all(p.heartbeats > hb[p.peer_id] for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(HEARTBEAT_S)
        assert all(p.heartbeats > hb[p.peer_id] for p in live), "a live peer stopped heartbeating"

        # the restarted coordinator still expires peers and admits new ones
        swarm.silence(5)
        await wait_for(lambda s: s["totals"]["live_peers"] == 35, second, LEASE_S + 10,
                       "5 more expiries after the restart")
        newcomer = SimSwarm(second.grpc_address, second.token, 1, port_base=21_000)
        await newcomer.join_all()
        await wait_for(lambda s: s["totals"]["live_peers"] == 36, second, 5, "a new member")
        await newcomer.stop()
    finally:
        await swarm.stop()
        if second is not None:
            code = await asyncio.to_thread(second.stop)  # SIGTERM: graceful, exit code 0
            second.kill()
            assert code == 0, "".join(second.lines)
            assert any("stopping" in line for line in second.lines)


def test_second_coordinator_on_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    with CoordinatorProcess(tmp_path / "a") as first:
        second = CoordinatorProcess(tmp_path / "b", port=first.grpc_port)
        with pytest.raises(RuntimeError, match="cannot serve gRPC"):
            second.start()
        second.kill()


def test_bad_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[pipeline]\nstages = 0\n")
    coord = CoordinatorProcess(tmp_path / "state", config=config)
    with pytest.raises(RuntimeError, match=r"pipeline\.stages must be an integer >= 1"):
        coord.start()
    coord.kill()
