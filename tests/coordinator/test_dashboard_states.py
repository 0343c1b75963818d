"""The dashboard's special states and its layout, measured in the real browser (issue #17).

- A coordinator no peer has joined says "waiting for peers" with the join command and its address
  (a real `shoal coordinator` process), and paints no stage red; a swarm whose peers all went
  keeps the red EMPTY stages and shows the command again.
- The bytes-per-step panel's empty note and caption do not overlap; the "bypassed" badge stays
  inside its stage column, and a bypassed stage never says "ok".
- At 820 px the stage map scrolls sideways, visibly (scrollbar, fade, hint line), and its last
  stage can be scrolled into view; so does the peer table, to its last column.
- The peer table shows a peer's link (direct / relayed) and device memory when the status has
  them, and no such column when it does not.

Geometry is read with getBoundingClientRect; screenshots land in test-artifacts/dashboard/.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from protocols.runspec import RunSpec
from tests.coordinator import test_dashboard as base
from tests.fake_status import FakeStatusServer, join_peer, lose_peer, make_status
from tests.sim_peer import CoordinatorProcess, SimSwarm

pytestmark = pytest.mark.browser
MS, open_dashboard, shot = base.MS, base.open_dashboard, base.shot  # `page`: conftest.py

RED = "rgb(220, 38, 38)"  # --lost in style.css

BOX_JS = """(sel) => [...document.querySelectorAll(sel)].map((e) => {
  const r = e.getBoundingClientRect();
  return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width,
          height: r.height, text: e.textContent.trim()};
})"""


def boxes(page: Any, selector: str) -> list[dict]:
    """The boxes of every element `selector` matches that takes space on the page."""
    return [b for b in page.evaluate(BOX_JS, selector) if b["width"] > 0 and b["height"] > 0]


def overlaps(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and \
        a["top"] < b["bottom"] and b["top"] < a["bottom"]


def inside(inner: dict, outer: dict, slack: float = 0.5) -> bool:
    return inner["left"] >= outer["left"] - slack and inner["right"] <= outer["right"] + slack \
        and inner["top"] >= outer["top"] - slack and inner["bottom"] <= outer["bottom"] + slack


def no_red_empty(page: Any) -> None:
    """No stage says EMPTY or "no live replica", and none is drawn with the red border."""
    text = page.inner_text("#stage-map-panel")
    assert "EMPTY" not in text and "no live replica" not in text, text
    borders = page.evaluate("[...document.querySelectorAll('#stage-map .stage')]"
                            ".map((s) => getComputedStyle(s).borderTopColor)")
    assert borders and RED not in borders, borders


# ---------------------------------------------------------------------------------------------


def test_a_coordinator_no_peer_joined_waits_for_peers(page: Any, tmp_path: Path) -> None:
    """A real coordinator, fresh: the page says how to join, names the token file, never shows
    the token, paints nothing red; the first peer's join takes the panel away."""
    config = tmp_path / "run.toml"
    config.write_text(RunSpec().replace(**{"run.name": "empty-swarm", "pipeline.stages": 3,
                                           "membership.lease_s": 30.0}).to_toml())
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        assert coord.token_file is not None
        url = coord.http_url.rstrip("/")
        with urllib.request.urlopen(url + "/api/status", timeout=10) as resp:
            body = resp.read().decode()
        join = json.loads(body)["join"]
        command = f"shoal peer --coordinator {coord.grpc_address} --token-file join.token"
        assert join["coordinator"] == coord.grpc_address and join["command"] == command
        assert join["token_file"] == str(coord.token_file)
        assert join["fingerprint"].startswith("sha256:")

        open_dashboard(page, url)
        page.wait_for_selector("#join", state="visible", timeout=5 * MS)
        assert page.get_attribute("#join", "data-emptiness") == "never"
        assert page.inner_text("#join-title") == "Waiting for peers"
        assert page.inner_text("#join-command") == command
        assert page.inner_text("#join-coordinator") == coord.grpc_address
        assert page.inner_text("#join-fingerprint") == join["fingerprint"]
        assert str(coord.token_file) in page.inner_text("#join-token")
        secret = coord.token_file.read_text().split()[0]
        assert secret not in body and secret not in page.content()
        assert page.locator("#stage-map .stage").count() == 4  # stage 0 and 3 block stages
        assert page.locator('#stage-map .stage[data-view="waiting"]').count() == 4
        no_red_empty(page)
        shot(page, "empty.png")

        # One simulated peer joins (on its own event loop: Playwright's sync API owns this
        # thread) and stays while the page looks, then leaves.
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            async def join() -> SimSwarm:
                swarm = SimSwarm(coord.grpc_address, coord.token, 1)
                await swarm.join_all(beat=False)
                return swarm

            swarm = asyncio.run_coroutine_threadsafe(join(), loop).result(30)
            page.wait_for_selector("#join", state="hidden", timeout=10 * MS)
            assert page.locator('#stage-map .stage[data-view="waiting"]').count() == 0

            async def leave() -> None:
                await swarm.peers[0].client.leave("done")
                await swarm.stop()

            asyncio.run_coroutine_threadsafe(leave(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        # It left: peers were here, so the command shows again, now over a red empty stage.
        page.wait_for_selector('#join[data-emptiness="none-live"]', state="visible",
                               timeout=10 * MS)


def test_a_swarm_whose_peers_all_went_keeps_red_stages_and_shows_the_command(page: Any) -> None:
    status = make_status(n_peers=4, n_stages=3)
    with FakeStatusServer(status) as fake:
        open_dashboard(page, fake.url)
        assert page.is_hidden("#join")
        status = copy.deepcopy(fake.status)
        for p in status["peers"]:
            lose_peer(status, p["peer_id"])
        fake.set_status(status)
        page.wait_for_selector('#join[data-emptiness="none-live"]', state="visible",
                               timeout=5 * MS)
        assert status["join"]["command"] == page.inner_text("#join-command")
        assert page.locator('#stage-map .stage[data-view="empty"]').count() == 3
        assert page.locator("#stage-map .state-badge", has_text="EMPTY").count() == 3
        shot(page, "all-peers-lost.png")

        status["now"] += 1
        join_peer(status, 50, stage=0)
        fake.set_status(status)
        page.wait_for_selector("#join", state="hidden", timeout=5 * MS)


def test_fake_fresh_swarm_waits_without_red(page: Any) -> None:
    """The fake's fresh coordinator (no peer, no history, no traffic) at 820 px wide."""
    page.set_viewport_size({"width": 820, "height": 900})
    with FakeStatusServer(make_status(n_peers=0, n_stages=5)) as fake:
        open_dashboard(page, fake.url)
        page.wait_for_selector('#join[data-emptiness="never"]', state="visible", timeout=5 * MS)
        assert fake.status["join"]["coordinator"] in page.inner_text("#join")
        no_red_empty(page)
        page.locator("#stage-map-panel").screenshot(path=str(base.ARTIFACTS / "empty-map.png"))
        shot(page, "empty-narrow.png")  # after: a full-page screenshot hides scrollbars


@pytest.mark.parametrize("width", [1440, 1100, 820])
def test_bytes_panel_caption_and_notes_do_not_overlap(page: Any, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    status = make_status(n_peers=6, n_stages=3)
    status["bytes_per_step_by_mode"] = {}
    with FakeStatusServer(status) as fake:
        open_dashboard(page, fake.url)
        panel = "#bytes-by-mode"
        parts = {"heading": boxes(page, "#bytes-panel .panel-head"),
                 "empty note": boxes(page, f"{panel} .chart-empty"),
                 "caption": boxes(page, f"{panel} .bars-note")}
        assert all(len(v) == 1 for v in parts.values()), parts
        assert "no sync-mode figures" in parts["empty note"][0]["text"]
        names = list(parts)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not overlaps(parts[a][0], parts[b][0]), (a, b, parts)
        card = boxes(page, "#bytes-panel")[0]
        assert all(inside(v[0], card) for v in parts.values()), (parts, card)
        if width == 1440:
            shot(page, "bytes-panel-empty.png", full_page=False)

        # With figures: bars, their values and the caption do not overlap either.
        status = copy.deepcopy(fake.status)
        status["bytes_per_step_by_mode"] = make_status()["bytes_per_step_by_mode"]
        fake.set_status(status)
        page.wait_for_selector(f"{panel} li[data-mode]", timeout=5 * MS)
        assert page.is_hidden(f"{panel} .chart-empty")
        bars = boxes(page, f"{panel} ul.bars")[0]
        caption = boxes(page, f"{panel} .bars-note")[0]
        assert not overlaps(bars, caption) and inside(caption, card), (bars, caption, card)


@pytest.mark.parametrize("width", [1440, 1100, 820])
def test_bypassed_badge_stays_in_its_column_and_never_beside_ok(page: Any, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    # Stage 2 has a pending CheckFree rebuild while replicas are back (the coordinator still
    # says "ok" until one reports ready); stage 3 is empty and waits for a snapshot (the longest
    # label).
    status = make_status(n_peers=14, n_stages=5, empty_stages=(3,),
                         rebuilt={2: "checkfree", 3: "snapshot"})
    assert status["stages"][2]["state"] == "ok"
    with FakeStatusServer(status) as fake:
        open_dashboard(page, fake.url)
        for n in (2, 3):
            col = f'#stage-map .stage[data-stage="{n}"]'
            page.locator(col).scroll_into_view_if_needed()
            badge = boxes(page, f"{col} .rebuild-badge")
            column = boxes(page, col)
            assert len(badge) == 1 and "bypassed" in badge[0]["text"], badge
            assert inside(badge[0], column[0]), (n, badge, column)
            assert page.evaluate("(s) => { const b = document.querySelector(s);"
                                 " return b.scrollWidth <= b.clientWidth; }",
                                 f"{col} .rebuild-badge"), "the label overflows its badge"
            state_badge = page.inner_text(f"{col} .state-badge")
            assert state_badge != "ok", (n, state_badge)
        assert page.inner_text('#stage-map .stage[data-stage="2"] .state-badge') == "rebuilding"
        assert page.inner_text('#stage-map .stage[data-stage="3"] .state-badge') == "EMPTY"
        if width == 820:
            page.locator('#stage-map .stage[data-stage="2"]').scroll_into_view_if_needed()
            shot(page, "badges-narrow.png", full_page=False)


def test_stage_map_scrolls_visibly_at_820_px(page: Any) -> None:
    page.set_viewport_size({"width": 820, "height": 1000})
    with FakeStatusServer(make_status(n_peers=14, n_stages=5, empty_stages=(3,),
                                      rebuilt={2: "checkfree"})) as fake:
        open_dashboard(page, fake.url)
        page.wait_for_selector('#stage-map-wrap[data-overflow="right"]', timeout=5 * MS)
        m = page.evaluate("""(() => { const m = document.getElementById('stage-map');
            const w = document.getElementById('stage-map-wrap');
            return {scrollWidth: m.scrollWidth, clientWidth: m.clientWidth,
                    scrollbar: m.offsetHeight - m.clientHeight,
                    fadeRight: getComputedStyle(w, '::after').opacity,
                    fadeLeft: getComputedStyle(w, '::before').opacity,
                    page: document.documentElement.scrollWidth}; })()""")
        assert m["scrollWidth"] > m["clientWidth"], m
        assert m["scrollbar"] >= 6, f"no visible horizontal scrollbar: {m}"
        assert m["fadeLeft"] == "0", m
        page.wait_for_function("getComputedStyle(document.getElementById('stage-map-wrap'),"
                               " '::after').opacity === '1'", timeout=5 * MS)  # a .2 s fade-in
        assert m["page"] <= 820, f"the page itself scrolls sideways: {m}"
        hint = page.locator("#stage-map-scroll")
        assert hint.is_visible() and "scroll sideways" in hint.inner_text()

        last = '#stage-map .stage[data-stage="4"]'
        frame = boxes(page, "#stage-map")[0]
        assert boxes(page, last)[0]["right"] > frame["right"], "the last stage should start hidden"
        # Viewport pictures: a full-page screenshot hides scrollbars (Playwright), and the
        # scrollbar is what these show.
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "narrow.png", full_page=False)
        page.locator("#stage-map-panel").screenshot(path=str(base.ARTIFACTS / "narrow-map.png"))

        page.locator(last).scroll_into_view_if_needed()
        page.wait_for_function(f"""(() => {{
            const s = document.querySelector('{last}').getBoundingClientRect();
            const m = document.getElementById('stage-map').getBoundingClientRect();
            return s.left >= m.left - 1 && s.right <= m.right + 1; }})()""", timeout=5 * MS)
        page.wait_for_function("['left', 'both'].includes(document.getElementById("
                               "'stage-map-wrap').dataset.overflow)", timeout=5 * MS)
        page.evaluate("(() => { const m = document.getElementById('stage-map');"
                      " m.scrollLeft = m.scrollWidth; })()")  # all the way: nothing more right
        page.wait_for_selector('#stage-map-wrap[data-overflow="left"]', timeout=5 * MS)
        page.wait_for_function("getComputedStyle(document.getElementById('stage-map-wrap'),"
                               " '::before').opacity === '1'", timeout=5 * MS)
        assert "←" in page.inner_text("#stage-map-scroll")
        shot(page, "narrow-scrolled.png", full_page=False)
        page.locator("#stage-map-panel").screenshot(
            path=str(base.ARTIFACTS / "narrow-map-scrolled.png"))

        # Keyboard: the map takes focus and arrow keys scroll it back.
        page.focus("#stage-map")
        for _ in range(12):  # 190 px to go, 40 px or so a press
            page.keyboard.press("ArrowLeft")
        page.wait_for_selector('#stage-map-wrap[data-overflow="right"]', timeout=5 * MS)


def test_peer_table_scrolls_visibly_at_820_px(page: Any) -> None:
    page.set_viewport_size({"width": 820, "height": 1000})
    with FakeStatusServer(make_status(n_peers=8, n_stages=3)) as fake:
        open_dashboard(page, fake.url)
        page.wait_for_selector('#peer-table-frame[data-overflow="right"]', timeout=5 * MS)
        hint = page.locator("#peer-table-scroll")
        assert hint.is_visible() and "scroll the table sideways" in hint.inner_text()
        wrap = page.evaluate("""(() => { const w = document.getElementById('peer-table-wrap');
            return [w.scrollWidth, w.clientWidth, w.offsetHeight - w.clientHeight]; })()""")
        assert wrap[0] > wrap[1] and wrap[2] >= 6, wrap
        lease = '#peer-head th[data-sort="lease"]'
        frame = boxes(page, "#peer-table-wrap")[0]
        assert boxes(page, lease)[0]["right"] > frame["right"], "Lease should start hidden"
        page.evaluate("(() => { const w = document.getElementById('peer-table-wrap');"
                      " w.scrollLeft = w.scrollWidth; })()")
        page.wait_for_selector('#peer-table-frame[data-overflow="left"]', timeout=5 * MS)
        assert inside(boxes(page, lease)[0], boxes(page, "#peer-table-wrap")[0], slack=1.0)
        page.locator("#peer-table-frame").scroll_into_view_if_needed()
        page.locator("#peer-table-frame").screenshot(
            path=str(base.ARTIFACTS / "narrow-peers-scrolled.png"))


def test_peer_link_and_device_memory_show_only_when_reported(page: Any) -> None:
    status = make_status(n_peers=8, n_stages=3)
    with FakeStatusServer(status) as fake:
        open_dashboard(page, fake.url)
        heads = page.locator("#peer-head th").all_inner_texts()
        assert not any(h.startswith(("Link", "Device mem")) for h in heads), heads
        assert page.locator("#peer-rows td.c-link, #peer-rows td.c-mem").count() == 0

        status = copy.deepcopy(fake.status)
        relayed, direct = status["peers"][0], status["peers"][1]
        relayed.update(link="relayed", device_memory_bytes=3_221_225_472,
                       device_memory_total_bytes=24_000_000_000)
        direct.update(link="direct")
        fake.set_status(status)
        row = '#peer-rows tr[data-peer-id="{}"]'
        page.wait_for_selector(row.format(relayed["peer_id"]) + " td.c-link", timeout=5 * MS)
        heads = page.locator("#peer-head th").all_inner_texts()
        assert any(h.startswith("Link") for h in heads) and \
            any(h.startswith("Device mem") for h in heads), heads
        assert page.inner_text(row.format(relayed["peer_id"]) + " td.c-link") == "relayed"
        assert page.inner_text(row.format(relayed["peer_id"]) + " td.c-mem") == \
            "3.22 GB / 24.0 GB"
        assert page.inner_text(row.format(direct["peer_id"]) + " td.c-link") == "direct"
        assert page.inner_text(row.format(direct["peer_id"]) + " td.c-mem") == "–"
        tile = f'#stage-map .tile[data-peer-id="{relayed["peer_id"]}"]'
        assert page.get_attribute(tile, "data-link") == "relayed"
        page.click(tile)
        page.wait_for_selector("#peer-detail:not([hidden])", timeout=5 * MS)
        detail = page.inner_text("#detail-fields")
        assert "device memory" in detail and "relayed" in detail and "host memory" in detail
        shot(page, "peer-link-memory.png", full_page=False)
        page.keyboard.press("Escape")

        for p in status["peers"]:
            for key in ("link", "device_memory_bytes", "device_memory_total_bytes"):
                p.pop(key, None)
        fake.set_status(status)
        page.wait_for_function("!document.querySelector('#peer-rows td.c-link')", timeout=5 * MS)
        heads = page.locator("#peer-head th").all_inner_texts()
        assert not any(h.startswith(("Link", "Device mem")) for h in heads), heads
