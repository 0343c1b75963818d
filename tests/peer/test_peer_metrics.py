"""peer/metrics.py without a swarm: the step-time histogram's rule (one step on observes, a jump
only moves the mark), what the collector reads off a peer holding a real StageHost, and the
server's start, answer, refusal of a taken port and stop. The real swarm is
tests/swarm/test_metrics_swarm.py."""

from __future__ import annotations

import asyncio
import math
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.metrics import PeerMetrics
from peer.pipeline.stage_host import StageHost
from peer.progress import peer_stats
from protocols.coordinator_client import PEER_STATES, PeerStats
from protocols.runspec import RunSpec
from tests.fakes import FakePeer

SPEC = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 4,
                            "model.seq_len": 32, "pipeline.stages": 2})


class Source(FakePeer):
    """FakePeer plus what the collector reads of a daemon: the driver and the heartbeat stats."""

    driver = None

    def stats(self) -> PeerStats:
        return peer_stats(self.state, 12.5, 2, self.counter, self.host, None, "", None)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_step_seconds_observe_single_steps_only() -> None:
    m = PeerMetrics(Source(SPEC))
    for step, t in ((1, 0.0), (2, 1.5), (5, 3.0), (6, 3.25), (6, 4.0), (7, 4.5)):
        m.note_step(step, now=t)
    body, _ = asyncio.run(m.scrape())
    s = samples(body.decode())
    # 1->2 (1.5 s), 5->6 (0.25 s), 6->7 (1.25 s from the first note of step 6); the jump 2->5
    # and the repeated 6 observe nothing
    assert s[("shoal_peer_step_seconds_count", ())] == 3
    assert s[("shoal_peer_step_seconds_sum", ())] == pytest.approx(3.0)
    assert s[("shoal_peer_step_seconds_bucket", (("le", "0.25"),))] == 1


def test_collector_reads_the_live_peer() -> None:
    host = StageHost(SPEC, 1)
    try:
        src = Source(SPEC, host, state="draining")
        src.counter.add("activations", sent=1000, received=800)
        src.counter.add("sync:allreduce", sent=300)
        m = PeerMetrics(src)
        s = samples(asyncio.run(m.scrape())[0].decode())
        info = [k for k in s if k[0] == "shoal_peer_info"]
        assert dict(info[0][1]) == {"peer_id": "ab" * 8, "stage": "1", "device": "cpu",
                                    "run": SPEC.run.name, "sync_mode": SPEC.sync.mode}
        assert s[("shoal_peer_stage", ())] == 1 and s[("shoal_peer_step", ())] == host.step
        assert {st: s[("shoal_peer_state", (("state", st),))] for st in PEER_STATES} == \
            {st: int(st == "draining") for st in PEER_STATES}
        assert s[("shoal_wire_sent_bytes_total", (("kind", "activations"),))] == 1000
        assert s[("shoal_wire_sent_bytes_total", (("kind", "sync:allreduce"),))] == 300
        assert s[("shoal_wire_received_bytes_total", (("kind", "activations"),))] == 800
        assert s[("shoal_peer_queue", ())] == 2
        assert s[("shoal_peer_compute_samples_per_second", ())] == 12.5
        assert s[("shoal_peer_pending_microbatches", ())] == 0
        assert s[("shoal_peer_device_memory_bytes", (("device", "cpu"), ("kind", "rss")))] > 0
        assert not any(k[0].startswith("shoal_peer_hop_") for k in s)  # no driver: no router
        assert ("shoal_peer_loss", ()) not in s  # stage 0 only
        assert s[("process_cpu_seconds_total", ())] > 0

        src.state = "something-new"  # a state this version does not list still shows
        s = samples(asyncio.run(m.scrape())[0].decode())
        assert s[("shoal_peer_state", (("state", "something-new"),))] == 1
        assert sum(v for (n, _), v in s.items() if n == "shoal_peer_state") == 1
    finally:
        host.close()


def test_server_serves_refuses_a_taken_port_and_stops() -> None:
    async def scenario() -> None:
        m = PeerMetrics(Source(SPEC))
        port = await m.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200
                    assert "version=0.0.4" in r.headers["Content-Type"]
                    s = samples(await r.text())
                    assert s[("shoal_peer_stage", ())] == -1  # no stage yet
                    assert math.isfinite(s[("process_resident_memory_bytes", ())])
                async with http.get(f"http://127.0.0.1:{port}/metrics", headers={
                        "Accept": "application/openmetrics-text; version=1.0.0"}) as r:
                    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                    assert (await r.text()).endswith("# EOF\n")
            with pytest.raises(SystemExit, match="--metrics-port"):
                await PeerMetrics(Source(SPEC)).start("127.0.0.1", port)
        finally:
            await m.stop()
        with socket.socket() as sock:  # the port is free again
            sock.bind(("127.0.0.1", port))

    asyncio.run(scenario())


def test_metrics_port_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`shoal peer --metrics-port`: off by default, SHOAL_METRICS_PORT when no flag, the flag
    over the environment, a bad value refused by the parser."""
    from shoal.cli import build_parser

    monkeypatch.delenv("SHOAL_METRICS_PORT", raising=False)
    assert build_parser().parse_args(["peer"]).metrics_port is None
    monkeypatch.setenv("SHOAL_METRICS_PORT", "0")
    assert build_parser().parse_args(["peer"]).metrics_port == 0
    assert build_parser().parse_args(["peer", "--metrics-port", "9400"]).metrics_port == 9400
    monkeypatch.setenv("SHOAL_METRICS_PORT", "nine")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer"])
