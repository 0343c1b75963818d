"""Evaluate every query of shoal-dashboard.json on a real Prometheus scraping a real swarm.

    python docker/grafana/check_queries.py        # needs the `prometheus` binary (Debian: apt
                                                  # install prometheus); run from the repository

Starts a local swarm (a coordinator, two replicas of one block stage and a stage-0 driver, each
peer with --metrics-port 0), a Prometheus on 127.0.0.1 scraping them every 2 s, waits for a few
scrapes, then runs each panel's query and each variable's label query through Prometheus' HTTP
API. Prints one line per query and exits 1 if any query is refused or returns no series. Stops
exactly the processes it started. tests/swarm/test_metrics_swarm.py checks the metric names on
every run; this checks that Prometheus parses and answers each query too.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shoal.swarm import Swarm, free_port  # noqa: E402
from tests.swarm.local_swarm import spec_with  # noqa: E402

DASHBOARD = REPO / "docker" / "grafana" / "shoal-dashboard.json"
VARIABLES = {"$__rate_interval": "10s", "$coordinator_job": "shoal-coordinator",
             "$peer_job": "shoal-peers", "$instance": ".*"}


def substituted(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)  # Grafana's, not PromQL
    return f"count by ({m.group(2)}) ({m.group(1)})" if m else expr


def peer_ports(swarm: Swarm, n: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [re.search(r"metrics at http://127\.0\.0\.1:(\d+)/",
                           (swarm.logs / f"peer{i}.log").read_text(errors="replace"))
                 for i in range(n)]
        if all(found):
            return [int(m.group(1)) for m in found if m]
        time.sleep(1)
    raise SystemExit("the peers did not log their metrics ports")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="shoal-dashboard-"))
    swarm = Swarm(work / "swarm", spec_with(**{"pipeline.stages": 1}), 0, None, "cpu")
    prometheus = None
    try:
        swarm.start(0)
        for i, stage in enumerate([1, 1, 0]):
            swarm.add_peer(i, ["--stage", str(stage), "--metrics-port", "0"])
        peers = ", ".join(f'"127.0.0.1:{p}"' for p in peer_ports(swarm, 3))
        (work / "prometheus.yml").write_text(
            "global: {scrape_interval: 2s}\nscrape_configs:\n"
            f"  - {{job_name: shoal-coordinator, static_configs: "
            f"[{{targets: [\"127.0.0.1:{swarm.http_port}\"]}}]}}\n"
            f"  - {{job_name: shoal-peers, static_configs: [{{targets: [{peers}]}}]}}\n")
        port = free_port()
        with open(work / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={work / 'prometheus.yml'}",
                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(60)  # training steps and a few dozen scrapes

        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": expr})
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)["data"]["result"]

        doc = json.loads(DASHBOARD.read_text())
        queries = [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]
        queries += [(f"${v['name']}", v["query"]["query"]) for v in doc["templating"]["list"]
                    if v["type"] == "query"]
        bad = 0
        for title, expr in queries:
            try:
                result = query(substituted(expr))
            except urllib.error.HTTPError as exc:
                result, note = [], exc.read().decode(errors="replace")[:200]
            else:
                note = ", ".join(x["value"][1] for x in result[:3])
            bad += not result
            print(f"{'ok   ' if result else 'EMPTY'} {title[:36]:36} {len(result):3} series  "
                  f"{expr[:60]}  [{note}]")
        print(f"{len(queries) - bad} of {len(queries)} dashboard queries answered with data "
              f"(logs in {work})")
        return 1 if bad else 0
    finally:
        if prometheus is not None:
            prometheus.send_signal(signal.SIGTERM)
            prometheus.wait(30)
        swarm.stop(grace=5)


if __name__ == "__main__":
    sys.exit(main())
