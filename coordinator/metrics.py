"""The coordinator's `/metrics`: the swarm as Prometheus metrics, through `prometheus_client`.

`SwarmCollector` reads the live `CoordinatorService` / `Membership` state at scrape time (nothing
is updated on the hot path: a heartbeat costs the same with or without a scraper) and yields one
metric family per figure. Names, labels and types are a contract with dashboards
(docker/grafana/shoal-dashboard.json, tests/coordinator/test_metrics.py checks it): add
metrics, never rename them. Base units; counters end in `_total`; per-peer series are labelled by
peer id (fine for the few thousand peers one coordinator holds).

Every app gets its own `CollectorRegistry` (`metrics_registry`), never the process-wide default
one: tests run several coordinators in one process, and each must show its own swarm. The
registry also holds prometheus_client's process (CPU, RSS, open files), platform and GC
collectors.

`exposition` is what the aiohttp handler serves: the families are collected on the event loop
(membership is only ever touched there) and encoded in a thread, in the format the scraper's
Accept header asks for (the Prometheus text format 0.0.4 by default, OpenMetrics on request).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from protocols.coordinator_client import PEER_STATES

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService
    from protocols.relay import RelayHub

_COUNTERS = (("heartbeats", "Heartbeats accepted."), ("joins", "First joins."),
             ("rejoins", "Joins by peers already known."), ("leaves", "Clean leaves."),
             ("expired", "Peers whose lease lapsed."),
             ("reported_lost", "Peers expired before their lease lapsed: neighbours reported "
              "them unreachable after they missed their own heartbeats."),
             ("moves", "Rebalancing moves."),
             ("rebuilds", "Stages rebuilt."))


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


class SwarmCollector(Collector):
    """The swarm's metrics, read from `svc` at every scrape (event loop only: see the module
    docstring)."""

    def __init__(self, svc: CoordinatorService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        svc = self.svc
        m = svc.membership
        live = m.live_members()
        stages = m.stage_summaries()
        c = m.counters
        info = GaugeMetricFamily("shoal_build_info", "Build and run metadata (always 1).",
                                 labels=["version", "swarm_id", "run", "sync_mode"])
        info.add_metric([svc.version, svc.swarm_id, svc.spec.run.name, svc.spec.sync.mode], 1)
        yield info
        yield _gauge("shoal_start_time_seconds", "Unix time this coordinator process started.",
                     svc.started_at)
        yield _counter("shoal_coordinator_restarts",
                       "Times the coordinator restarted from its state directory.", svc.restarts)
        yield _gauge("shoal_peers", "Live peers (lease held).", len(live))
        by_state = GaugeMetricFamily("shoal_peers_by_state", "Live peers by reported state.",
                                     labels=["state"])
        for st in PEER_STATES:
            by_state.add_metric([st], sum(1 for x in live if x.state == st))
        yield by_state
        yield _gauge("shoal_epoch", "Membership epoch (grows on every membership change).",
                     m.epoch)
        for key, help_ in _COUNTERS:
            yield _counter(f"shoal_{key}", help_, c[key])
        yield _labelled(CounterMetricFamily, "shoal_rejected_calls",
                        "Calls refused by a handler (malformed input, admission), by method.",
                        "method", sorted(svc.rejected.items()))
        yield _gauge("shoal_revoked_peers", "Peer ids whose certificates are revoked.",
                     len(m.revoked()))
        yield _gauge("shoal_banned_peers", "Peer ids the operator banned (shoal ban).",
                     len(m.bans()))
        yield from self._stages(stages)
        yield from self._peers(live)
        yield _counter("shoal_network_sent_bytes", "Bytes sent by all peers, whole run.",
                       m.bytes_sent_total)
        yield _counter("shoal_network_received_bytes", "Bytes received by all peers, whole run.",
                       m.bytes_received_total)
        yield _counter("shoal_dropped_microbatches", "Microbatches dropped, whole run.",
                       m.dropped_total)
        yield from self._relay(getattr(svc, "relay_hub", None))
        drivers = [x for x in live if x.stage == 0 and math.isfinite(x.stats.loss)]
        loss = sum(x.stats.loss for x in drivers) / len(drivers) if drivers else math.nan
        yield _gauge("shoal_loss", "Mean training loss over stage-0 peers (NaN: unknown).", loss)
        yield _gauge("shoal_step", "The swarm's optimizer step.", m.step())
        yield _gauge("shoal_tokens_per_second", "Tokens/s summed over stage-0 peers.",
                     sum(x.stats.tokens_per_s for x in live if x.stage == 0))
        yield _gauge("shoal_event_loop_lag_seconds",
                     "Worst event-loop wake-up delay of the last 10 s (the coordinator's "
                     "queueing).", svc.loop_lag_s)
        if svc.journal is not None:
            yield _counter("shoal_store_transactions", "SQLite transactions committed.",
                           svc.journal.transactions)
            yield _gauge("shoal_store_last_write_seconds", "Duration of the last transaction.",
                         svc.journal.last_write_s)
        yield from self._pace(svc)
        h = svc.heartbeat_seconds
        acc, buckets = 0, []
        for bound, count in zip((*h.buckets, math.inf), h.counts, strict=True):
            acc += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), acc))
        yield HistogramMetricFamily(
            "shoal_heartbeat_duration_seconds",
            "Time to handle one heartbeat (after authentication).", buckets=buckets,
            sum_value=h.total)

    @staticmethod
    def _relay(hub: RelayHub | None) -> Iterator[Metric]:
        """What this coordinator's relay (protocols/relay.py) carries; nothing with --no-relay."""
        if hub is None:
            return
        yield _counter("shoal_relayed_bytes", "Bytes relayed for unreachable peers, both ways, "
                       "since this coordinator started.", hub.relayed_bytes)
        yield _gauge("shoal_relay_attached_peers", "Peers attached to this relay now.",
                     len(hub.attached))
        yield _gauge("shoal_relay_connections", "TCP connections carried by this relay now.",
                     hub.connections())
        yield _labelled(CounterMetricFamily, "shoal_peer_relayed_bytes",
                        "Bytes relayed for each peer, both ways.", "peer",
                        sorted(hub.bytes_by_peer.items()))

    @staticmethod
    def _stages(stages: list) -> Iterator[Metric]:
        def per_stage(name: str, help_: str, values: Iterable[float]) -> GaugeMetricFamily:
            return _labelled(GaugeMetricFamily, name, help_, "stage",
                             zip((s.stage for s in stages), values, strict=True))

        yield per_stage("shoal_stage_replicas", "Live replicas per stage.",
                        [len(s.replicas) for s in stages])
        yield per_stage("shoal_stage_throughput_samples_per_second",
                        "Sum of the replicas' samples/s per stage.",
                        [s.throughput for s in stages])
        yield per_stage("shoal_stage_step", "Latest optimizer step reported per stage.",
                        [s.step for s in stages])
        yield per_stage("shoal_stage_grad_norm", "Latest gradient norm reported per stage.",
                        [s.grad_norm for s in stages])
        yield per_stage("shoal_stage_empty", "1 when a stage has no live replica.",
                        [int(s.state == "empty") for s in stages])

    @staticmethod
    def _pace(svc: CoordinatorService) -> Iterator[Metric]:
        """What the pacer tells peers and what the Join gate admits (coordinator/pacing.py)."""
        pacer, gate = svc.pacer, svc.join_gate
        yield _gauge("shoal_heartbeat_period_seconds",
                     "Heartbeat period told to peers now (the spec's in small swarms).",
                     pacer.pace.heartbeat_s)
        yield _gauge("shoal_lease_seconds", "Lease told to peers now.", pacer.pace.lease_s)
        yield _gauge("shoal_heartbeat_cpu_seconds",
                     "Measured coordinator CPU per heartbeat the pace is computed from.",
                     pacer.cost_s)
        yield _counter("shoal_joins_admitted", "Joins let through the Join gate.", gate.admitted)
        yield _counter("shoal_joins_turned_away",
                       "Joins turned away with RESOURCE_EXHAUSTED and a retry-after (a join "
                       "storm); the clients retry.", gate.turned_away)
        yield _gauge("shoal_join_rate", "Joins per second the gate admits at most now.",
                     gate.rate)
        yield _gauge("shoal_joins_in_flight", "Joins admitted and not yet answered.",
                     gate.in_flight)
        yield _gauge("shoal_joins_waiting",
                     "Joiners turned away and not admitted since (told to come back).",
                     gate.waiting)
        if svc.gc_policy is not None:
            yield _gauge("shoal_gc_pause_max_seconds",
                         "Longest garbage-collector pause of the last minute.",
                         svc.gc_policy.worst_pause_s())
        yield _counter("shoal_view_bytes_sent", "Swarm-view bytes sent in replies (Join, "
                       "Heartbeat, GetSwarmView).", svc.views_sent["bytes"])
        yield _labelled(CounterMetricFamily, "shoal_views_sent",
                        "Swarm views sent in replies, whole or as deltas.", "kind",
                        [("whole", svc.views_sent["whole"]), ("delta", svc.views_sent["deltas"])])
        yield _counter("shoal_views_withheld",
                       "Swarm views left out of replies for want of view-byte budget.",
                       svc.view_budget.withheld)

    @staticmethod
    def _peers(live: list) -> Iterator[Metric]:
        ids = [x.peer_id for x in live]
        yield _labelled(CounterMetricFamily, "shoal_peer_bytes_sent",
                        "Bytes sent, as reported by each peer.", "peer",
                        zip(ids, (x.stats.bytes_sent for x in live), strict=True))
        yield _labelled(CounterMetricFamily, "shoal_peer_bytes_received",
                        "Bytes received, as reported by each peer.", "peer",
                        zip(ids, (x.stats.bytes_received for x in live), strict=True))
        yield _labelled(GaugeMetricFamily, "shoal_peer_samples_per_second",
                        "Measured samples/s per peer.", "peer",
                        zip(ids, (x.stats.samples_per_s for x in live), strict=True))


def _labelled(family: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str,
              help_: str, label: str, samples: Iterable[tuple[object, float]]) -> Metric:
    """A family with one label, one sample per (label value, value)."""
    out = family(name, help_, labels=[label])
    for key, value in samples:
        out.add_metric([str(key)], value)
    return out


def metrics_registry(svc: CoordinatorService) -> CollectorRegistry:
    """A registry of its own for one coordinator app: the swarm, the process, the platform
    and the garbage collector (the default collectors' names, on this registry only)."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(svc))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _Collected(Collector):
    """Families already collected: what the encoder thread reads instead of live state."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """(body, Content-Type) of one scrape of `registry`: collected here on the event loop,
    encoded in a thread in the format `accept` (the request's Accept header) asks for."""
    families = list(registry.collect())
    encode, content_type = choose_encoder(accept or "")
    body = await asyncio.to_thread(encode, _Collected(families))
    return body, content_type


class Histogram:
    """A Prometheus-style cumulative histogram of durations in seconds, updated on the hot
    path at the cost of a bucket search (CoordinatorService.heartbeat_seconds) and read by
    `SwarmCollector` at scrape time."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1
