"""The coordinator's HTTP side against a real process: /api/status keeps the shape the dashboard
is built on, /metrics is valid Prometheus text, /api/events streams, / serves the dashboard."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols.coordinator_client import PeerStats
from protocols.runspec import RunSpec
from tests.sim_peer import CoordinatorProcess, SimSwarm

STATUS_KEYS = {"run", "epoch", "now", "coordinator", "stages", "peers", "history", "events",
               "totals", "bytes_per_step_by_mode", "banned", "join"}
RUN_KEYS = {"name", "swarm_id", "sync_mode", "stages", "spec"}
COORDINATOR_KEYS = {"started_at", "uptime_s", "grpc_address", "version", "restarts"}
STAGE_KEYS = {"stage", "replicas", "throughput", "grad_norm", "step", "rebuild", "state",
              "attested_hash", "attested_step"}
PEER_KEYS = {"peer_id", "address", "stage", "state", "samples_per_s", "queue", "bytes_sent",
             "bytes_received", "loss", "step", "tokens_per_s", "dropped_microbatches",
             "lease_expires", "joined_at", "device", "bytes_by_kind"}
HISTORY_KEYS = {"t", "step", "loss", "tokens_per_s", "bytes_per_step"}
EVENT_KEYS = {"t", "kind", "peer_id", "stage", "detail"}
TOTAL_KEYS = {"peers", "live_peers", "bytes_sent", "bytes_received", "dropped_microbatches",
              "step"}


def fetch(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """A coordinator with six peers that have heartbeated a few times (stage 0 reports loss)."""
    tmp = tmp_path_factory.mktemp("http")
    config = tmp / "run.toml"
    config.write_text(RunSpec().replace(**{
        "run.name": "http-test", "pipeline.stages": 2, "sync.mode": "diloco",
        "membership.heartbeat_s": 0.5, "membership.lease_s": 30.0}).to_toml())
    with CoordinatorProcess(tmp / "state", config=config) as c:
        async def populate() -> None:
            swarm = SimSwarm(c.grpc_address, c.token, 6)
            await swarm.join_all(beat=False)
            for _ in range(3):
                for p in swarm.peers:
                    await p.client.heartbeat(p.stats())
                await asyncio.sleep(1.1)  # the curve takes at most a point a second
            await swarm.stop()

        asyncio.run(populate())
        yield c


def test_status_has_the_promised_shape(coord: CoordinatorProcess) -> None:
    kind, body = fetch(coord.http_url + "api/status")
    assert kind.startswith("application/json")
    st = json.loads(body, parse_constant=lambda c: pytest.fail(f"status contains {c}"))
    assert set(st) == STATUS_KEYS
    assert set(st["run"]) == RUN_KEYS
    assert st["run"]["name"] == "http-test" and st["run"]["sync_mode"] == "diloco"
    assert st["run"]["stages"] == 3 and st["run"]["spec"]["pipeline"]["stages"] == 2
    assert set(st["coordinator"]) >= COORDINATOR_KEYS
    assert st["coordinator"]["grpc_address"] == coord.grpc_address
    assert set(st["totals"]) == TOTAL_KEYS and st["totals"]["live_peers"] == 6
    assert len(st["stages"]) == 3 and all(set(s) >= STAGE_KEYS for s in st["stages"])
    assert sum(len(s["replicas"]) for s in st["stages"]) == 6
    assert {s["state"] for s in st["stages"]} <= {"ok", "empty", "degraded"}
    assert len(st["peers"]) == 6 and all(set(p) >= PEER_KEYS for p in st["peers"])
    for p in st["peers"]:
        assert (p["loss"] is None) == (p["stage"] != 0)  # NaN travels as null
        assert p["bytes_by_kind"]["sync:diloco"] > 0 and p["device"] == "sim"
    assert st["history"] and all(set(h) == HISTORY_KEYS for h in st["history"])
    assert st["history"][-1]["loss"] > 0
    assert st["events"] and all(set(e) == EVENT_KEYS for e in st["events"])
    assert {"start", "join", "state"} <= {e["kind"] for e in st["events"]}
    assert st["bytes_per_step_by_mode"]["diloco"] > 0  # what the sim peers counted
    assert st["now"] == pytest.approx(time.time(), abs=5)


def test_metrics_are_valid_prometheus_text(coord: CoordinatorProcess) -> None:
    kind, body = fetch(coord.http_url + "metrics")
    assert kind.startswith("text/plain") and "version=0.0.4" in kind
    helps, types, samples = set(), {}, {}
    sample = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? (\S+)$')
    for line in body.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind_ = line.split()
            types[name] = kind_
        else:
            m = sample.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            float(m.group(5))  # NaN is allowed and parses
            samples.setdefault(m.group(1), []).append(line)
    for name in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in helps and family in types, f"{name} lacks # HELP / # TYPE"
    for name, kind_ in types.items():
        assert kind_ in ("gauge", "counter", "histogram")
        assert (kind_ == "counter") == name.endswith("_total"), name
    for required in ("shoal_peers", "shoal_peers_by_state", "shoal_epoch",
                     "shoal_heartbeats_total", "shoal_joins_total", "shoal_expired_total",
                     "shoal_stage_replicas", "shoal_stage_throughput_samples_per_second",
                     "shoal_peer_bytes_sent_total", "shoal_loss", "shoal_step"):
        assert required in samples, required
    assert samples["shoal_peers"] == ["shoal_peers 6.0"]  # prometheus_client writes floats
    assert len(samples["shoal_peer_bytes_sent_total"]) == 6
    assert 'shoal_peers_by_state{state="training"} 6.0' in samples["shoal_peers_by_state"]
    heartbeats = float(samples["shoal_heartbeats_total"][0].split()[-1])
    assert heartbeats >= 18 and not math.isnan(heartbeats)


def test_events_stream_pushes_status(coord: CoordinatorProcess) -> None:
    with urllib.request.urlopen(coord.http_url + "api/events", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        documents = []
        deadline = time.monotonic() + 5
        while len(documents) < 2 and time.monotonic() < deadline:
            line = r.readline().decode()
            if line.startswith("data: "):
                documents.append(json.loads(line[6:]))
    assert len(documents) == 2 and all(set(d) == STATUS_KEYS for d in documents)
    assert documents[1]["now"] > documents[0]["now"]


def test_dashboard_and_static_files_are_served(coord: CoordinatorProcess) -> None:
    kind, body = fetch(coord.http_url)
    assert kind.startswith("text/html") and "<html" in body.lower()
    static = Path(__file__).resolve().parents[2] / "coordinator" / "static"
    for f in sorted(static.glob("*.js"))[:1]:
        kind, body = fetch(coord.http_url + "static/" + f.name)
        assert body == f.read_text()
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(coord.http_url + "static/../store.py")
    assert info.value.code in (403, 404)


def test_placeholder_page_without_dashboard_files(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from coordinator.main import serve

    async def scenario() -> None:
        handle = await serve(RunSpec(), 0, 0, tmp_path / "state", None, None, False,
                             "127.0.0.1")
        try:
            from coordinator.http import make_app

            app = make_app(handle.service, time.time, static_dir=tmp_path / "no-static")
            async with TestClient(TestServer(app)) as client:
                resp = await client.get("/")
                assert resp.status == 200
                assert "dashboard files are not installed" in await resp.text()
                assert (await client.get("/api/status")).status == 200
        finally:
            await handle.stop()

    asyncio.run(scenario())


def test_restart_keeps_history_and_totals(tmp_path: Path) -> None:
    """The curve and the swarm byte totals survive a graceful restart."""
    with CoordinatorProcess(tmp_path / "state") as coord:
        async def feed() -> None:
            swarm = SimSwarm(coord.grpc_address, coord.token, 1)
            await swarm.join_all(beat=False)
            p = swarm.peers[0]
            for step in (1, 2):
                await p.client.heartbeat(PeerStats(state="training", step=step, loss=3.0,
                                                   bytes_sent=1000 * step))
                await asyncio.sleep(1.2)
            await swarm.stop()

        asyncio.run(feed())
        before = json.loads(fetch(coord.http_url + "api/status")[1])
        assert coord.stop() == 0
    with CoordinatorProcess(tmp_path / "state") as again:
        after = json.loads(fetch(again.http_url + "api/status")[1])
    assert after["totals"]["bytes_sent"] == before["totals"]["bytes_sent"] == 2000
    assert [h["step"] for h in after["history"]] == [h["step"] for h in before["history"]]
    assert after["epoch"] > before["epoch"]
