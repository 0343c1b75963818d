"""The dashboard against a live swarm: a real coordinator and real training peers on 127.0.0.1,
read by Debian's Chromium through Playwright.

The page must show every stage and peer, update when a peer joins and when one is killed
(kill -9: its tile turns lost once its lease lapses), and raise the banner when the coordinator
stops. Screenshots go to test-artifacts/dashboard/live-*.png.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from protocols.runspec import RunSpec
from shoal.swarm import Swarm
from tests.coordinator.conftest import browser, page  # noqa: F401
from tests.coordinator.test_dashboard import MS, open_dashboard, sel, shot
from tests.swarm.local_swarm import TINY, step_of, wait_for, wait_replicas_agree

pytestmark = pytest.mark.browser


def test_live_swarm_on_the_page(browser, page, tmp_path: Path) -> None:  # noqa: F811
    spec = RunSpec().replace(**TINY)
    swarm = Swarm(tmp_path / "swarm", spec, 0, None, "cpu")
    try:
        swarm.start(0)
        for i, stage in enumerate([0, 1, 2]):
            swarm.add_peer(i, ["--stage", str(stage), "--grace", "5"])
        wait_for("2 steps", lambda: step_of(swarm) >= 2, 120, swarm)
        url = f"http://127.0.0.1:{swarm.http_port}"
        status = open_dashboard(page, url)
        for st in range(spec.pipeline.stages + 1):
            assert page.locator(f'#stage-map .stage[data-stage="{st}"]').is_visible()
        for p in status["peers"]:
            page.wait_for_selector("#stage-map " + sel(".tile", p["peer_id"]), timeout=5 * MS)
            page.wait_for_selector("#peer-rows " + sel("tr", p["peer_id"]), timeout=5 * MS)
        shot(page, "live-overview.png")

        # A peer joins: its tile and row appear.
        known = {p["peer_id"] for p in status["peers"]}
        swarm.add_peer(3, ["--stage", "2", "--grace", "5"])
        newcomer = wait_for("the newcomer in /api/status", lambda: next(
            (p["peer_id"] for p in (swarm.status() or {}).get("peers", [])
             if p["peer_id"] not in known), None), 60, swarm)
        page.wait_for_selector("#stage-map " + sel(".tile", newcomer), timeout=10 * MS)
        page.wait_for_selector("#peer-rows " + sel("tr", newcomer), timeout=10 * MS)

        # The newcomer is killed: once its lease lapses the page shows it lost.
        victim = swarm.peers[3]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        page.wait_for_selector("#stage-map " + sel(".tile", newcomer) + '[data-state="lost"]',
                               timeout=(spec.membership.lease_s + 15) * MS)
        shot(page, "live-peer-lost.png")
        wait_replicas_agree(swarm, {0: 1, 1: 1, 2: 1}, 30)  # the survivors hold known states

        # The coordinator stops: the banner says so.
        assert page.is_hidden("#banner")
        swarm.coordinator.send_signal(signal.SIGKILL)
        swarm.coordinator.wait()
        page.wait_for_selector("#banner", state="visible", timeout=15 * MS)
        time.sleep(0.5)
        shot(page, "live-coordinator-lost.png")
    finally:
        swarm.stop(grace=5)
