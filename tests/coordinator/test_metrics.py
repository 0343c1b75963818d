"""The coordinator's /metrics through prometheus_client: a real coordinator process with a known
membership (simulated peers), scraped over HTTP and parsed by prometheus_client's own parser;
and two coordinators in one process, each showing its own swarm (a registry per app)."""

from __future__ import annotations

import asyncio
import math
import urllib.request
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from protocols.coordinator_client import PEER_STATES, PeerStats
from protocols.runspec import RunSpec
from tests.sim_peer import CoordinatorProcess, SimSwarm

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type."""
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:  # a bound for a loaded machine
        return r.headers.get("Content-Type", ""), r.read().decode()


def test_swarm_metrics_match_a_known_membership(tmp_path: Path) -> None:
    """Four peers join (two per stage of a 1-block-stage run), each heartbeats twice with known
    stats, one leaves: /metrics says exactly that, plus the process metrics."""
    config = tmp_path / "run.toml"
    config.write_text(RunSpec().replace(**{
        "run.name": "metrics-test", "pipeline.stages": 1, "sync.mode": "diloco",
        "membership.lease_s": 60.0}).to_toml())
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        async def populate() -> tuple[list[str], str]:
            swarm = SimSwarm(coord.grpc_address, coord.token, 4)
            await swarm.join_all(beat=False)
            for _ in range(2):
                for p in swarm.peers:
                    await p.client.heartbeat(PeerStats(
                        state="training", step=3, state_hash="3", samples_per_s=10.0 + p.index,
                        bytes_sent=1000 * (p.index + 1), bytes_received=500,
                        loss=2.5 if p.client.stage == 0 else math.nan))
            await swarm.peers[3].client.leave("test")
            ids = [p.peer_id for p in swarm.peers]
            await swarm.stop()
            return ids[:3], ids[3]

        live, gone = asyncio.run(populate())
        kind, body = scrape(coord.http_url + "metrics")
        assert kind.startswith("text/plain") and "version=0.0.4" in kind
        s, types = parse(body)

        def one(name: str, **labels: str) -> float:
            return s[(name, tuple(sorted(labels.items())))]

        assert one("shoal_peers") == 3
        assert one("shoal_peers_by_state", state="training") == 3
        assert sum(one("shoal_peers_by_state", state=st) for st in PEER_STATES) == 3
        assert one("shoal_joins_total") == 4 and one("shoal_leaves_total") == 1
        assert one("shoal_heartbeats_total") == 8
        assert one("shoal_heartbeat_duration_seconds_count") == 8
        assert one("shoal_heartbeat_duration_seconds_bucket", le="+Inf") == 8
        assert one("shoal_stage_replicas", stage="0") + one("shoal_stage_replicas",
                                                            stage="1") == 3
        assert one("shoal_stage_step", stage="0") == 3
        for i, pid in enumerate(live):
            assert one("shoal_peer_bytes_sent_total", peer=pid) == 1000 * (i + 1)
            assert one("shoal_peer_samples_per_second", peer=pid) == 10.0 + i
        assert ("shoal_peer_bytes_sent_total", (("peer", gone),)) not in s  # live peers only
        # the whole run's bytes count the peer that left too
        assert one("shoal_network_sent_bytes_total") == 1000 + 2000 + 3000 + 4000
        assert one("shoal_loss") == 2.5
        assert one("shoal_step") == 3
        info = [k for k in s if k[0] == "shoal_build_info"]
        assert len(info) == 1 and ("run", "metrics-test") in info[0][1] \
            and ("sync_mode", "diloco") in info[0][1]
        assert types["shoal_heartbeats"] == "counter" and types["shoal_peers"] == "gauge"
        assert types["shoal_heartbeat_duration_seconds"] == "histogram"
        # process, platform and GC collectors on the same registry
        assert one("process_cpu_seconds_total") > 0
        assert one("process_resident_memory_bytes") > 0
        assert any(k[0] == "python_gc_objects_collected_total" for k in s)
        assert any(k[0] == "python_info" for k in s)

        kind, body = scrape(coord.http_url + "metrics",
                            accept="application/openmetrics-text; version=1.0.0")
        assert kind.startswith("application/openmetrics-text") and body.endswith("# EOF\n")


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    """Two coordinators in one process: each /metrics shows its own swarm id (and the second
    start does not fail on the process collectors' names), and the HTTP token guards /metrics."""
    from coordinator.main import serve

    token_file = tmp_path / "http.token"
    token_file.write_text("s3cret-token-for-metrics\n")

    async def scenario() -> None:
        a = await serve(RunSpec(), 0, 0, tmp_path / "a", None, None, False, "127.0.0.1")
        b = await serve(RunSpec(), 0, 0, tmp_path / "b", None, None, False, "127.0.0.1",
                        http_token_file=str(token_file))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{a.http_port}/metrics") as r:
                    assert r.status == 200
                    sa, _ = parse(await r.text())
                url_b = f"http://127.0.0.1:{b.http_port}/metrics"
                async with http.get(url_b) as r:
                    assert r.status == 401
                async with http.get(url_b, headers={
                        "Authorization": "Bearer s3cret-token-for-metrics"}) as r:
                    assert r.status == 200
                    sb, _ = parse(await r.text())
        finally:
            await a.stop()
            await b.stop()

        def swarm_id(s: Samples) -> str:
            (key,) = [k for k in s if k[0] == "shoal_build_info"]
            return dict(key[1])["swarm_id"]

        assert swarm_id(sa) == a.swarm_id and swarm_id(sb) == b.swarm_id
        assert a.swarm_id != b.swarm_id
        for s in (sa, sb):
            assert s[("shoal_peers", ())] == 0
            assert s[("process_cpu_seconds_total", ())] > 0

    asyncio.run(scenario())
