"""Every peer's own /metrics (`shoal peer --metrics-port 0`) in a real swarm, and the Grafana
dashboard (docker/grafana/shoal-dashboard.json) against what the processes really expose.

One small swarm for the module: a coordinator, two replicas of the one block stage, then the
stage-0 driver, each peer serving /metrics on a port of its own choosing (read from its log, as an
operator would). Checked: the step counter moves, bytes by kind grow with training, stage 0's
router reports hop figures for both block replicas, the coordinator's view of a peer's bytes never
exceeds what the peer itself counts; every PromQL expression of the dashboard names only metrics
a coordinator or a peer exposes; the peers stop cleanly (exit 0) with their metrics server.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocols.coordinator_client import PEER_STATES
from shoal.swarm import Swarm
from tests.swarm.local_swarm import logs_tail, spec_with, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "shoal-dashboard.json"
STAGE_OF = [1, 1, 0]  # peer i holds STAGE_OF[i]: the block replicas first, then the driver
_LOGGED = re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/metrics")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    s = Swarm(tmp_path_factory.mktemp("metrics"),
              spec_with(**{"pipeline.stages": 1, "run.steps": 30}), 0, None, "cpu")
    try:
        s.start(0)
        for i, stage in enumerate(STAGE_OF):
            s.add_peer(i, ["--stage", str(stage), "--grace", "10", "--metrics-port", "0"])
        yield s
    finally:
        s.stop(grace=5)


def metrics_port(swarm: Swarm, i: int) -> int:
    """The port peer `i` logged it serves /metrics on (it was started with --metrics-port 0)."""
    def logged() -> int | None:
        m = _LOGGED.search((swarm.logs / f"peer{i}.log").read_text(errors="replace"))
        return int(m.group(1)) if m else None

    return wait_for(f"peer{i} to log its metrics port", logged, 60, swarm)  # type: ignore


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as r:  # a bound for a loaded machine
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def peer_metrics(swarm: Swarm, i: int) -> Samples:
    return scrape(f"http://127.0.0.1:{metrics_port(swarm, i)}/metrics")


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), math.nan)


def labelled(s: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in s.items() if n == name}


def test_peer_metrics_move_with_training(swarm: Swarm) -> None:
    driver = STAGE_OF.index(0)
    wait_for("the driver's step to reach 2", lambda: value(
        peer_metrics(swarm, driver), "shoal_peer_step") >= 2 or None, 180, swarm)
    at = value(peer_metrics(swarm, driver), "shoal_peer_step")
    wait_for("the step counter to move", lambda: value(
        peer_metrics(swarm, driver), "shoal_peer_step") > at or None, 120, swarm)
    wait_for("every replica after step 4", lambda: all(
        value(peer_metrics(swarm, i), "shoal_peer_step") >= 4 for i in range(3)) or None, 120,
        swarm)

    ids = {}
    for i, stage in enumerate(STAGE_OF):
        s = peer_metrics(swarm, i)
        (info,) = labelled(s, "shoal_peer_info")
        info_d = dict(info)
        ids[i] = info_d["peer_id"]
        assert info_d["stage"] == str(stage) and info_d["device"] == "cpu", info_d
        assert value(s, "shoal_peer_stage") == stage
        assert value(s, "shoal_peer_state", state="training") == 1
        assert sum(value(s, "shoal_peer_state", state=st) for st in PEER_STATES) == 1
        assert value(s, "shoal_wire_sent_bytes_total", kind="activations") > 0
        assert value(s, "shoal_wire_received_bytes_total", kind="activations") > 0
        if stage != 0:  # two replicas: they exchange their stage's gradients
            assert value(s, "shoal_wire_sent_bytes_total",
                         kind=f"sync:{swarm.spec.sync.mode}") > 0
        assert value(s, "shoal_peer_step_seconds_count") >= 1
        assert value(s, "shoal_peer_step_seconds_sum") > 0
        assert value(s, "shoal_peer_device_memory_bytes", device="cpu", kind="rss") > 0
        assert value(s, "shoal_peer_dropped_microbatches_total") >= 0
        assert ("shoal_peer_pending_microbatches", ()) in s and ("shoal_peer_queue", ()) in s
        assert value(s, "process_cpu_seconds_total") > 0
        assert value(s, "process_resident_memory_bytes") > 0

    s = peer_metrics(swarm, driver)
    assert value(s, "shoal_peer_microbatches_done_total") > 0
    assert math.isfinite(value(s, "shoal_peer_loss"))
    hops = labelled(s, "shoal_peer_hop_calls_total")
    blocks = {ids[i] for i, stage in enumerate(STAGE_OF) if stage == 1}
    assert {dict(k)["replica"] for k in hops} == blocks
    assert sum(hops.values()) > 0
    for labels in hops:
        assert 0 < value(s, "shoal_peer_hop_seconds", **dict(labels)) < math.inf

    # The coordinator's figure is a heartbeat old (on a loaded machine, a late one): once in,
    # never more than the peer counts now.
    def coordinator_figures() -> Samples | None:
        coord = scrape(f"http://127.0.0.1:{swarm.http_port}/metrics")
        return coord if all(value(coord, "shoal_peer_bytes_sent_total", peer=ids[i]) > 0
                            for i in range(3)) else None
    coord = wait_for("every peer's bytes in the coordinator's /metrics", coordinator_figures, 60,
                     swarm)
    assert isinstance(coord, dict)
    for i in range(3):
        reported = value(coord, "shoal_peer_bytes_sent_total", peer=ids[i])
        own = sum(labelled(peer_metrics(swarm, i), "shoal_wire_sent_bytes_total").values())
        assert 0 < reported <= own, (i, reported, own)


# PromQL words that are not metric names: functions, aggregations, keywords, and the labels
# the dashboard groups by. Anything else in an expression must be a metric some process exposes.
PROMQL_WORDS = {"rate", "irate", "increase", "delta", "deriv", "sum", "avg", "max", "min",
                "count", "by", "without", "histogram_quantile", "clamp_min", "clamp_max",
                "label_values", "and", "or", "unless", "on", "ignoring", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (or a Grafana label_values query)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r",\s*[a-z_]+\s*\)\s*$", ")", expr)  # label_values(metric, label)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return words - PROMQL_WORDS


def dashboard_queries(doc: dict) -> list[str]:
    out = []
    for p in doc["panels"]:
        for t in p.get("targets", []):
            out.append(t["expr"])
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return out


def test_metric_name_extraction_sees_unknown_names() -> None:
    """The drift check below can fail: it finds every metric name and nothing else."""
    assert metric_names('histogram_quantile(0.9, sum by (le, instance) (rate(shoal_x_bucket'
                        '{job="$peer_job", instance=~"$instance"}[$__rate_interval])))') == \
        {"shoal_x_bucket"}
    assert metric_names("increase(a_total{j=\"x\"}[5m]) / clamp_min(delta(b[5m]), 1)") == \
        {"a_total", "b"}
    assert metric_names('label_values(shoal_peer_info{job="$peer_job"}, instance)') == \
        {"shoal_peer_info"}


def test_dashboard_names_only_exposed_metrics(swarm: Swarm) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels), "a panel without a query"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]

    wait_for("the driver's first step", lambda: value(
        peer_metrics(swarm, STAGE_OF.index(0)), "shoal_peer_step") >= 1 or None, 180, swarm)
    coord = {n for n, _ in scrape(f"http://127.0.0.1:{swarm.http_port}/metrics")}
    peers = {n for i in range(len(STAGE_OF)) for n, _ in peer_metrics(swarm, i)}
    used: set[str] = set()
    for expr in dashboard_queries(doc):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - coord - peers
        assert not unknown, f"{expr!r} names metrics nothing exposes: {sorted(unknown)}"
        used |= names
    # both halves are on the dashboard: the swarm's and the peers' own
    assert {"shoal_peers_by_state", "shoal_step", "shoal_network_sent_bytes_total",
            "shoal_joins_total", "shoal_leaves_total"} <= used
    assert {"shoal_peer_step_seconds_bucket", "shoal_wire_sent_bytes_total",
            "shoal_peer_hop_seconds", "shoal_peer_device_memory_bytes"} <= used
    assert "process_cpu_seconds_total" in used and "process_resident_memory_bytes" in used


def test_peers_stop_cleanly_with_their_metrics_server(swarm: Swarm) -> None:
    ports = [metrics_port(swarm, i) for i in range(len(STAGE_OF))]
    swarm.stop(grace=15)
    codes = [p.returncode for p in swarm.peers]
    assert codes == [0] * len(STAGE_OF), f"{codes}\n{logs_tail(swarm)}"
    for port in ports:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
