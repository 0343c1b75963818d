"""A peer's own `/metrics` (`shoal peer --metrics-port PORT`), through `prometheus_client`.

The coordinator's /metrics shows the swarm as heartbeats report it; this shows one peer from the
inside, at the moment of the scrape: its step and state, seconds per optimizer step, bytes on the
wire by kind, the work queued and held here, dropped microbatches, how long a hop to each replica
of the next stages takes (stage 0: its router's measurements), device memory, and the process.

`PeerCollector` reads the daemon's live state through the narrow `MetricsSource` protocol at
scrape time: nothing is counted on the hot path but the step time (`PeerMetrics.note_step`, once
per optimizer step). Everything runs on the daemon's event loop (the state it reads is only ever
touched there), and the text is encoded in a thread, so a scrape never holds up a heartbeat.
The registry is the peer's own, with prometheus_client's process, platform and GC collectors.

The server binds the peer's own `--host` (so the metrics are reachable exactly where the peer is)
and has no authentication: like the peer's gRPC port, keep it off networks you do not trust.

Metric names (a contract with docker/grafana/shoal-dashboard.json; add, never rename):
`shoal_peer_info`, `shoal_peer_stage`, `shoal_peer_step`, `shoal_peer_state`,
`shoal_peer_step_seconds` (histogram), `shoal_wire_sent_bytes_total` and
`shoal_wire_received_bytes_total` by kind, `shoal_peer_queue`, `shoal_peer_pending_microbatches`,
`shoal_peer_dropped_microbatches_total`, `shoal_peer_microbatches_done_total`,
`shoal_peer_compute_samples_per_second`, `shoal_peer_loss`, `shoal_peer_tokens_per_second`,
`shoal_peer_hop_seconds`, `shoal_peer_hop_throughput_samples_per_second`,
`shoal_peer_hop_calls_total`, `shoal_peer_hop_timeouts_total` (by stage and replica),
`shoal_peer_device_memory_bytes` (by device and kind: CUDA allocated/reserved, else process rss).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Protocol

import torch
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peer.pipeline.driver import Driver
from peer.pipeline.stage_host import StageHost
from peer.pipeline.wire import ByteCounter
from protocols.coordinator_client import PEER_STATES, PeerStats
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.peer.metrics")

# seconds per optimizer step: a CPU test swarm steps in ~0.1-1 s, a WAN swarm in minutes
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class MetricsSource(Protocol):
    """What the collector reads of the peer (the daemon implements it); event loop only."""

    peer_id: str
    spec: RunSpec
    state: str
    host: StageHost | None
    driver: Driver | None
    counter: ByteCounter

    def stats(self) -> PeerStats:
        """What the next heartbeat would report."""
        ...


def _rss_bytes() -> float | None:
    """This process's resident set size, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, help_: str,
            labels: list[str], rows: list[tuple[list[str], float]]) -> Metric:
    out = kind(name, help_, labels=labels)
    for values, value in rows:
        out.add_metric(values, value)
    return out


class PeerCollector(Collector):
    """The peer's live state as metric families (see the module docstring)."""

    def __init__(self, source: MetricsSource) -> None:
        self.src = source

    def collect(self) -> Iterator[Metric]:
        d = self.src
        st = d.stats()
        host = d.host
        stage = host.stage if host is not None else -1
        device = str(host.device) if host is not None else "none"
        yield _family(GaugeMetricFamily, "shoal_peer_info",
                      "This peer (always 1): id, stage, device, run and sync mode.",
                      ["peer_id", "stage", "device", "run", "sync_mode"],
                      [([d.peer_id, str(stage), device, d.spec.run.name, d.spec.sync.mode], 1)])
        yield GaugeMetricFamily("shoal_peer_stage", "The stage this peer holds (-1: none yet).",
                                value=stage)
        yield GaugeMetricFamily("shoal_peer_step", "The optimizer step this replica is after.",
                                value=st.step)
        states = [*PEER_STATES, *([d.state] if d.state not in PEER_STATES else [])]
        yield _family(GaugeMetricFamily, "shoal_peer_state",
                      "1 for the state this peer is in (joining, syncing, training, ...), "
                      "0 for the others.", ["state"],
                      [([s], int(s == d.state)) for s in states])
        # dict() of a dict is one step under the GIL: no torn copy if the data plane adds a kind
        sent, received = dict(d.counter.sent), dict(d.counter.received)
        yield _family(CounterMetricFamily, "shoal_wire_sent_bytes",
                      "Bytes this peer sent, by kind (activations, state, sync:<mode>, ...).",
                      ["kind"], [([k], v) for k, v in sorted(sent.items())])
        yield _family(CounterMetricFamily, "shoal_wire_received_bytes",
                      "Bytes this peer received, by kind.", ["kind"],
                      [([k], v) for k, v in sorted(received.items())])
        yield GaugeMetricFamily("shoal_peer_queue",
                                "Calls (Forward/Backward) being served here now.", value=st.queue)
        yield GaugeMetricFamily(
            "shoal_peer_pending_microbatches",
            "Microbatches whose forward graph is held here waiting for their backward (on "
            "stage 0: the driver's microbatches in flight).",
            value=len(host.pending) if host is not None else 0)
        yield CounterMetricFamily("shoal_peer_dropped_microbatches",
                                  "Microbatches dropped here (stage 0: by the driver too).",
                                  value=st.dropped_microbatches)
        yield CounterMetricFamily("shoal_peer_microbatches_done",
                                  "Microbatches this stage-0 peer carried through forward and "
                                  "backward.", value=st.microbatches_done)
        yield GaugeMetricFamily("shoal_peer_compute_samples_per_second",
                                "Samples/s this peer computed (EMA).", value=st.samples_per_s)
        if stage == 0:
            yield GaugeMetricFamily("shoal_peer_loss", "Loss of the last step (NaN: none yet).",
                                    value=st.loss)
            yield GaugeMetricFamily("shoal_peer_tokens_per_second",
                                    "Tokens/s of the last step.", value=st.tokens_per_s)
        yield from self._hops()
        yield self._memory(host)

    def _hops(self) -> Iterator[Metric]:
        """Stage 0's router: per replica of every block stage, what it measured (the EMA of
        samples/s over whole calls: network, the replica's queue and compute)."""
        driver = self.src.driver
        labels = ["stage", "replica"]
        seconds: list[tuple[list[str], float]] = []
        rate: list[tuple[list[str], float]] = []
        calls: list[tuple[list[str], float]] = []
        timeouts: list[tuple[list[str], float]] = []
        if driver is not None:
            mb = self.src.spec.pipeline.microbatch
            for s in range(1, self.src.spec.pipeline.stages + 1):
                for pid in driver.router.replicas(s):
                    try:
                        e = driver.router.estimate(pid)
                    except KeyError:
                        continue
                    key = [str(s), pid]
                    seconds.append((key, mb / e.throughput if e.throughput > 0 else math.inf))
                    rate.append((key, e.throughput))
                    calls.append((key, e.calls))
                    timeouts.append((key, e.timeouts))
        yield _family(GaugeMetricFamily, "shoal_peer_hop_seconds",
                      "Expected seconds of one microbatch's hop to a replica: microbatch size / "
                      "the measured throughput (stage 0 only).", labels, seconds)
        yield _family(GaugeMetricFamily, "shoal_peer_hop_throughput_samples_per_second",
                      "The router's EMA of a replica's samples/s over whole calls.", labels, rate)
        yield _family(CounterMetricFamily, "shoal_peer_hop_calls",
                      "Forward hops sent to a replica.", labels, calls)
        yield _family(CounterMetricFamily, "shoal_peer_hop_timeouts",
                      "Hops to a replica that timed out (resent elsewhere).", labels, timeouts)

    @staticmethod
    def _memory(host: StageHost | None) -> Metric:
        out = GaugeMetricFamily("shoal_peer_device_memory_bytes",
                                "Memory of the stage's device: CUDA allocated and reserved by "
                                "torch; on a CPU device the process's resident set.",
                                labels=["device", "kind"])
        device = host.device if host is not None else torch.device("cpu")
        if device.type == "cuda":
            out.add_metric([str(device), "allocated"], torch.cuda.memory_allocated(device))
            out.add_metric([str(device), "reserved"], torch.cuda.memory_reserved(device))
        else:
            rss = _rss_bytes()
            if rss is not None:
                out.add_metric([str(device), "rss"], rss)
        return out


class _Collected(Collector):
    """Families already collected: what the encoder thread reads instead of live state."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class PeerMetrics:
    """The peer's registry, its step-time histogram and its HTTP server.

    `note_step` and `start`/`stop` are called on the daemon's event loop."""

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(PeerCollector(source))
        self.step_seconds = Histogram(
            "shoal_peer_step_seconds",
            "Wall seconds from one optimizer step of this replica to the next.",
            buckets=STEP_BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._last: tuple[int, float] | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    def note_step(self, step: int, now: float | None = None) -> None:
        """The replica is after `step` now. One step on from the last note observes the time
        between the two; a jump (download, fast-forward) only moves the mark."""
        now = time.monotonic() if now is None else now
        if self._last is not None and step == self._last[0] + 1:
            self.step_seconds.observe(now - self._last[1])
        if self._last is None or step != self._last[0]:
            self._last = (step, now)

    async def scrape(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, Content-Type) of one scrape, in the format `accept` asks for (text 0.0.4
        unless the scraper asks for OpenMetrics)."""
        families = list(self.registry.collect())
        encode, content_type = choose_encoder(accept or "")
        return await asyncio.to_thread(encode, _Collected(families)), content_type

    async def start(self, host: str, port: int) -> int:
        """Serve GET /metrics on host:port (0: any free port); returns the bound port."""
        async def metrics(request: web.Request) -> web.Response:
            body, content_type = await self.scrape(request.headers.get("Accept"))
            return web.Response(body=body, headers={"Content-Type": content_type,
                                                    "Cache-Control": "no-store"})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise SystemExit(f"shoal peer: cannot serve metrics on {host}:{port} "
                             f"({exc.strerror}): pick another --metrics-port, or 0 for any "
                             f"free one") from None
        self._runner = runner
        self.port = runner.addresses[0][1] if runner.addresses else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
