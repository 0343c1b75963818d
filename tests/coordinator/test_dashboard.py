"""The dashboard page in a real headless Chromium (Debian's, driven by Playwright's sync API).

The fixtures `browser` and `page` are in tests/coordinator/conftest.py. By default each test
starts the fake status server (tests/fake_status.py) and changes the swarm through it. Set
SHOAL_DASHBOARD_URL=http://HOST:PORT to point the read-only checks at a live
coordinator instead; the tests that must change the swarm (join, loss, outage) then skip.

Screenshots land in test-artifacts/dashboard/ (gitignored). Needs `apt-get install chromium` and
`pip install playwright`; never `playwright install` (it downloads a browser, and fails offline).
"""

from __future__ import annotations

import copy
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_status import FakeStatusServer, join_peer, leave_peer, lose_peer, make_status

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
MS = 1000


class LiveDashboard:
    """A coordinator someone else runs: the page can be read, the swarm cannot be changed."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")


@pytest.fixture
def dashboard() -> Iterator[FakeStatusServer | LiveDashboard]:
    """Where the page is served: SHOAL_DASHBOARD_URL, or a fresh fake status server."""
    live = os.environ.get("SHOAL_DASHBOARD_URL")
    if live:
        yield LiveDashboard(live)
        return
    with FakeStatusServer(make_status(n_peers=14, n_stages=5, empty_stages=(3,),
                                      rebuilt={2: "checkfree"})) as fake:
        yield fake


@pytest.fixture
def fake(dashboard: FakeStatusServer | LiveDashboard) -> FakeStatusServer:
    """The dashboard's server, for tests that change the swarm."""
    if not isinstance(dashboard, FakeStatusServer):
        pytest.skip("needs a swarm it can change (the fake status server); "
                    "SHOAL_DASHBOARD_URL points at a live coordinator")
    return dashboard


def open_dashboard(page: Any, url: str) -> dict:
    """Load the page, wait for its first picture; returns the status document it drew."""
    page.goto(url + "/")
    page.wait_for_function("window.__shoal && window.__shoal.renders > 0", timeout=10 * MS)
    return page.evaluate("window.__shoal.status")


def served_step(url: str) -> int:
    """The swarm's step in the status the server serves now."""
    with urllib.request.urlopen(url + "/api/status", timeout=10) as resp:
        return int(json.loads(resp.read())["totals"]["step"])


def shot(page: Any, name: str, full_page: bool = True) -> None:
    """A screenshot in test-artifacts/dashboard/. A full-page one is taken without the window's
    scrollbar (the capture hides it but keeps its width: the right edge would be cut off)."""
    if not full_page:
        page.screenshot(path=str(ARTIFACTS / name))
        return
    page.evaluate("window.scrollTo(0, 0)")  # a scrolled window draws the sticky top bar mid-page
    page.evaluate("document.documentElement.style.overflowY = 'hidden'")
    try:
        page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    finally:
        page.evaluate("document.documentElement.style.overflowY = ''")


def sel(kind: str, peer_id: str) -> str:
    return f'{kind}[data-peer-id="{peer_id}"]'


# ---------------------------------------------------------------------------------------------


def test_page_shows_every_stage_and_peer(dashboard, page) -> None:
    status = open_dashboard(page, dashboard.url)
    if isinstance(dashboard, FakeStatusServer):
        assert {p["peer_id"] for p in status["peers"]} == \
            {p["peer_id"] for p in dashboard.status["peers"]}
    assert page.text_content("#run-name") == (status["run"]["name"] or "unnamed run")
    assert page.get_attribute("#conn", "data-conn") in ("live", "polling")
    assert page.is_hidden("#banner")

    for st in status["stages"]:
        column = page.locator(f'#stage-map .stage[data-stage="{st["stage"]}"]')
        assert column.is_visible()
        assert column.get_attribute("data-state") == st["state"]
        if st["state"] == "empty":
            assert "EMPTY" in column.inner_text()
        if st["rebuild"]:
            assert st["rebuild"] in column.locator(".rebuild-badge").inner_text().lower()
    for p in status["peers"]:
        tile = page.locator("#stage-map " + sel(".tile", p["peer_id"]))
        assert tile.get_attribute("data-state") == p["state"]
        assert tile.locator("xpath=ancestor::div[@data-stage][1]").get_attribute(
            "data-stage") == str(p["stage"])
        assert page.locator("#peer-rows " + sel("tr", p["peer_id"])).get_attribute(
            "data-state") == p["state"]

    assert page.locator("#chart-loss canvas").count() > 0
    assert page.locator("#chart-tokens canvas").count() > 0
    modes = page.locator("#bytes-by-mode li[data-mode]")
    assert modes.count() == len([v for v in status["bytes_per_step_by_mode"].values() if v])
    shown = [e for e in status["events"][-500:] if e["kind"] != "state"]  # state: off by default
    assert page.locator("#timeline li").count() == min(len(shown), 300)
    shot(page, "overview.png")


def test_page_updates_when_a_peer_joins_and_when_one_is_lost(fake, page) -> None:
    open_dashboard(page, fake.url)
    status = copy.deepcopy(fake.status)
    status["now"] += 1
    newcomer = join_peer(status, 99, stage=1)
    fake.set_status(status)
    page.wait_for_selector("#stage-map " + sel('.stage[data-stage="1"] .tile', newcomer) +
                           '[data-state="joining"]', timeout=5 * MS)
    page.wait_for_selector("#peer-rows " + sel("tr", newcomer), timeout=5 * MS)
    page.wait_for_selector("#timeline " + sel('li[data-kind="join"]', newcomer), timeout=5 * MS)
    shot(page, "peer-joined.png")

    # Stage 4's replicas all expire: their tiles turn lost and the stage becomes empty.
    status["now"] += 1
    victims = [p["peer_id"] for p in status["peers"] if p["stage"] == 4 and p["state"] != "lost"]
    for pid in victims:
        lose_peer(status, pid)
    fake.set_status(status)
    for pid in victims:
        page.wait_for_selector("#stage-map " + sel(".tile", pid) + '[data-state="lost"]',
                               timeout=5 * MS)
        page.wait_for_selector("#timeline " + sel('li[data-kind="expire"]', pid), timeout=5 * MS)
        assert page.get_attribute("#peer-rows " + sel("tr", pid), "data-state") == "lost"
    page.wait_for_selector('#stage-map .stage[data-stage="4"][data-state="empty"]', timeout=5 * MS)

    # A clean departure is not a failure: greyed as "left", with a leave event.
    status["now"] += 1
    leaver = next(p["peer_id"] for p in status["peers"] if p["stage"] == 1 and p["live"])
    leave_peer(status, leaver)
    fake.set_status(status)
    page.wait_for_selector("#stage-map " + sel(".tile.departed", leaver) + '[data-state="left"]',
                           timeout=5 * MS)
    page.wait_for_selector("#timeline " + sel('li[data-kind="leave"]', leaver), timeout=5 * MS)
    live = sum(p["live"] for p in status["peers"])
    assert page.text_content("#m-peers") == f"{live} / {len(status['peers'])}"
    shot(page, "peers-lost.png")


def test_200_peers_render_and_stay_usable(fake, page) -> None:
    status = make_status(n_peers=200, n_stages=6, empty_stages=(3,), rebuilt={5: "snapshot"})
    fake.set_status(status)
    open_dashboard(page, fake.url)
    page.wait_for_function(f"document.querySelectorAll('#peer-rows tr[data-peer-id]').length"
                           f" === {len(status['peers'])}", timeout=10 * MS)
    assert page.locator("#stage-map .tile").count() == len(status["peers"])
    assert "compact" in (page.get_attribute("#stage-map", "class") or "")

    # The table scrolls inside its panel instead of making the page endless.
    wrap = page.evaluate("(() => { const w = document.getElementById('peer-table-wrap');"
                         " return [w.scrollHeight, w.clientHeight]; })()")
    assert wrap[0] > wrap[1] and wrap[1] <= 560, wrap
    assert page.evaluate("document.documentElement.scrollHeight") < 2600

    # Grouped by stage at first; ungrouped and sorted by samples/s, highest first.
    groups = page.locator("#peer-rows tr.group")
    assert groups.count() == len({p["stage"] for p in status["peers"]})
    page.uncheck("#group-by-stage")
    assert groups.count() == 0
    page.click('#peer-head th[data-sort="sps"]')
    assert page.get_attribute('#peer-head th[data-sort="sps"]', "aria-sort") == "descending"
    first = page.get_attribute("#peer-rows tr[data-peer-id]", "data-peer-id")
    best = max(p["samples_per_s"] for p in status["peers"])
    assert next(p for p in status["peers"] if p["peer_id"] == first)["samples_per_s"] == best

    # Filtering by id and by state.
    target = status["peers"][137]["peer_id"]
    page.fill("#peer-filter", target[:10])
    page.wait_for_function("document.querySelectorAll('#peer-rows tr[data-peer-id]').length"
                           " === 1", timeout=5 * MS)
    page.fill("#peer-filter", "")
    page.select_option("#peer-state-filter", "lost")
    lost = [p["peer_id"] for p in status["peers"] if p["state"] == "lost"]
    page.wait_for_function("document.querySelectorAll('#peer-rows tr[data-peer-id]').length"
                           f" === {len(lost)}", timeout=5 * MS)
    page.select_option("#peer-state-filter", "")

    # Live updates every half second: the page keeps redrawing, its step moves on with the
    # swarm's and catches up with the step the server serves, and it stays usable (the clicks
    # below land while it updates). How long a redraw of 200 peers takes is a figure for a
    # benchmark, not a test.
    fake.configure(animate=True, interval=0.5)
    renders = page.evaluate("window.__shoal.renders")
    step_js = "(window.__shoal.status?.totals?.step ?? -1)"
    shown = [page.evaluate(step_js)]
    for _ in range(3):
        page.wait_for_function(f"{step_js} > {shown[-1]}", timeout=10 * MS)
        shown.append(page.evaluate(step_js))
    served = served_step(fake.url)
    page.wait_for_function(f"{step_js} >= {served}", timeout=10 * MS)
    assert page.evaluate("window.__shoal.renders") >= renders + 3

    # Clicking a tile opens that peer's details and marks its row.
    page.click("#stage-map " + sel(".tile", target))
    page.wait_for_selector("#peer-detail:not([hidden])", timeout=5 * MS)
    assert page.get_attribute("#peer-detail", "data-peer-id") == target
    assert "selected" in (page.get_attribute("#peer-rows " + sel("tr", target), "class") or "")
    shot(page, "200-peers-detail.png", full_page=False)
    page.keyboard.press("Escape")
    page.wait_for_selector("#peer-detail", state="hidden", timeout=5 * MS)
    shot(page, "200-peers.png")


def test_banner_when_the_coordinator_goes_away_and_comes_back(fake, page) -> None:
    open_dashboard(page, fake.url)
    assert page.is_hidden("#banner")
    fake.stop()
    page.wait_for_selector("#banner", state="visible", timeout=10 * MS)
    assert page.get_attribute("body", "data-conn") == "lost"
    assert "Lost contact with the coordinator" in page.inner_text("#banner")
    assert page.title().startswith("⚠")
    assert page.locator("#stage-map .tile").count() == len(fake.status["peers"]), \
        "the last state stays on screen"
    shot(page, "coordinator-lost.png", full_page=False)

    fake.start()
    page.wait_for_selector("#banner", state="hidden", timeout=15 * MS)
    assert page.get_attribute("body", "data-conn") in ("live", "polling")
    page.wait_for_function("window.__shoal.conn === 'live'", timeout=10 * MS)
    assert not page.title().startswith("⚠")
    shot(page, "coordinator-back.png", full_page=False)


def test_bandwidth_is_derived_from_successive_byte_counters(fake, page) -> None:
    open_dashboard(page, fake.url)
    status = copy.deepcopy(fake.status)
    peer = next(p for p in status["peers"] if p["state"] == "training")
    status["now"] += 2.0
    peer["bytes_sent"] += 4_000_000
    peer["bytes_received"] += 2_000_000
    fake.set_status(status)
    row = "#peer-rows " + sel("tr", peer["peer_id"])
    page.wait_for_function(
        f"document.querySelector({json.dumps(row + ' .c-up')}).textContent === '2.00 MB/s'",
        timeout=5 * MS)
    assert page.text_content(row + " .c-down") == "1.00 MB/s"


def test_polling_takes_over_when_events_fail(fake, page) -> None:
    fake.configure(sse=False)
    open_dashboard(page, fake.url)
    page.wait_for_function("window.__shoal.conn === 'polling'", timeout=10 * MS)
    assert page.is_hidden("#banner")
    status = copy.deepcopy(fake.status)
    status["run"]["name"] = "renamed-while-polling"
    fake.set_status(status)
    page.wait_for_function("document.getElementById('run-name').textContent"
                           " === 'renamed-while-polling'", timeout=6 * MS)


def test_static_files_come_from_the_coordinator_not_a_cdn(dashboard) -> None:
    """The page names no remote host; the vendored chart library is served with its licence."""
    with urllib.request.urlopen(dashboard.url + "/", timeout=10) as resp:
        head = resp.read().decode().split("<body")[0]
    for remote in ('="http:', '="https:', '="//'):
        assert remote not in head, "the page must load nothing from another host"
    for path in ("static/vendor/uplot/uPlot.iife.min.js", "static/vendor/uplot/LICENSE",
                 "static/app.js", "static/style.css"):
        with urllib.request.urlopen(f"{dashboard.url}/{path}", timeout=10) as resp:
            assert resp.status == 200, path
