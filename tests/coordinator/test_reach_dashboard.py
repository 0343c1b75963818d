"""The dashboard's peers table shows each peer's reach as a real coordinator found it (issue #13):
one member serves the peer's Reach service (direct), one registers a port nothing listens on
(unreachable). The members heartbeat from a thread of their own while Chromium reads the page."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.coordinator import test_dashboard as base
from tests.reach_member import ReachMember
from tests.sim_peer import CoordinatorProcess

pytestmark = pytest.mark.browser
MS, open_dashboard, shot = base.MS, base.open_dashboard, base.shot  # `page`: conftest.py


class Members:
    """A direct and an unreachable member, joined and heartbeating on a background loop."""

    def __init__(self, coord: CoordinatorProcess) -> None:
        self.coord = coord
        self.ready = threading.Event()
        self.done = threading.Event()
        self.ids: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        direct = ReachMember(self.coord.grpc_address, self.coord.token, serve=True)
        closed = ReachMember(self.coord.grpc_address, self.coord.token)
        async with direct, closed:
            await asyncio.gather(direct.join(), closed.join())
            await asyncio.gather(direct.wait_reach("direct"), closed.wait_reach("unreachable"))
            self.ids = {"direct": direct.peer_id, "unreachable": closed.peer_id}
            self.ready.set()
            while not self.done.is_set():
                await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CoordinatorProcess,
                                                                        Members]]:
    with CoordinatorProcess(Path(tmp_path_factory.mktemp("reach-dash")) / "state") as coord:
        m = Members(coord)
        m.thread.start()
        try:
            assert m.ready.wait(120), "the members were never checked"
            assert m.error is None, m.error
            yield coord, m
        finally:
            m.done.set()
            m.thread.join(30)


def test_peers_table_shows_reach(page, members) -> None:
    coord, m = members
    open_dashboard(page, coord.http_url.rstrip("/"))
    row = '#peer-rows tr[data-peer-id="{}"] td.c-link'
    for reach, peer_id in m.ids.items():
        page.wait_for_selector(row.format(peer_id), timeout=10 * MS)
        assert page.inner_text(row.format(peer_id)) == reach
    heads = page.locator("#peer-head th").all_inner_texts()
    assert any(h.startswith("Link") for h in heads), heads
    shot(page, "peers-reach.png", full_page=False)
