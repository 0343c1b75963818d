"""The coordinator's data check at join, against a real `coordinator.main` process and light
clients (no torch): without data.fingerprint in the spec, the first peer's is the run's, kept
across a restart; a peer with other data is refused (FAILED_PRECONDITION, naming both); a peer
that reports none, and an observer, are let in. tests/shoal/test_data_demo.py refuses a real
`shoal peer` against a spec's fingerprint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from protocols.coordinator_client import (
    OBSERVER_STAGE,
    Benchmark,
    CoordinatorClient,
    CoordinatorRefused,
)
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.sim_peer import CoordinatorProcess

FIRST, OTHER = "a" * 64, "b" * 64


async def join(coord: CoordinatorProcess, fingerprint: str, port: int,
               stage_hint: int = -1) -> CoordinatorClient:
    client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
    client.data_fingerprint = fingerprint
    await client.join(Benchmark(samples_per_s=10.0, device="sim"), f"127.0.0.1:{port}",
                      stage_hint=stage_hint, retry_s=10.0)
    return client


def test_the_first_peers_data_are_the_runs_across_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(RunSpec().replace(**{"pipeline.stages": 1,
                                           "membership.lease_s": 60.0}).to_toml())
    coord = CoordinatorProcess(tmp_path / "state", config=config).start()
    try:
        asyncio.run(join(coord, FIRST, 21_001))
        with pytest.raises(CoordinatorRefused) as refused:
            asyncio.run(join(coord, OTHER, 21_002))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (f"this peer's data fingerprint {OTHER} differs from the data of the run's "
                f"first peer {FIRST}") in str(refused.value)
        asyncio.run(join(coord, "", 21_003))  # reports none: not checked
        asyncio.run(join(coord, OTHER, 0, stage_hint=OBSERVER_STAGE))  # observers hold no data
        assert coord.stop() == 0
        coord = CoordinatorProcess(tmp_path / "state", config=config).start()  # same state
        with pytest.raises(CoordinatorRefused, match=f"first peer {FIRST}"):
            asyncio.run(join(coord, OTHER, 21_004))
        asyncio.run(join(coord, FIRST, 21_005))
    finally:
        coord.kill()


def test_the_run_specs_fingerprint_wins_and_bad_ones_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(RunSpec().replace(**{"pipeline.stages": 1,
                                           "data.fingerprint": FIRST}).to_toml())
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        with pytest.raises(CoordinatorRefused, match=f"{OTHER} differs from the run spec's "
                                                     f"data.fingerprint {FIRST}"):
            asyncio.run(join(coord, OTHER, 21_011))
        with pytest.raises(CoordinatorRefused) as refused:
            asyncio.run(join(coord, "x" * 500, 21_012))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        asyncio.run(join(coord, FIRST, 21_013))


def test_a_peer_that_read_the_spec_as_an_observer_leaves_as_a_member(tmp_path: Path) -> None:
    """Every peer joins as an observer first (to read the spec), then as a member with the same
    key: its Leave (a SIGTERM drain) must end the membership, not only the observer entry (the
    docker smoke's scale-down waited for a leave that never came, and the peer lapsed)."""
    import json
    import urllib.request

    config = tmp_path / "run.toml"
    config.write_text(RunSpec().replace(**{"pipeline.stages": 1,
                                           "membership.lease_s": 60.0}).to_toml())

    async def observe_join_leave(coord: CoordinatorProcess) -> str:
        identity = Identity.generate()
        client = CoordinatorClient(coord.grpc_address, identity, coord.token)
        try:
            await client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE)
            await client.join(Benchmark(samples_per_s=10.0, device="sim"), "127.0.0.1:21021",
                              retry_s=10.0)
            await client.leave("SIGTERM")
            return identity.peer_id
        finally:
            await client.close()

    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        peer_id = asyncio.run(observe_join_leave(coord))
        with urllib.request.urlopen(f"{coord.http_url.rstrip('/')}/api/status",
                                    timeout=10) as reply:
            status = json.load(reply)
    live = [p for p in status["peers"] if p["peer_id"] == peer_id and p.get("state") != "left"]
    assert not live, live
    leaves = [e for e in status["events"] if e["kind"] == "leave" and e.get("peer_id") == peer_id]
    assert leaves and "SIGTERM" in leaves[-1]["detail"], status["events"]
