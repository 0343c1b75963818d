"""/api/status is gzipped for a client that asks (issue #19: a 5,000-peer document is ~3 MB of
JSON, ~0.7 MB gzipped), and plain for one that does not (`shoal status`, curl, scripts)."""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.request
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import make_mocked_request

from coordinator.http import accepts_gzip
from tests.sim_peer import CoordinatorProcess, SimSwarm


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """A coordinator with three joined peers."""
    with CoordinatorProcess(tmp_path_factory.mktemp("gzip") / "state") as c:
        async def populate() -> None:
            swarm = SimSwarm(c.grpc_address, c.token, 3)
            await swarm.join_all(beat=False)
            await swarm.stop()

        asyncio.run(populate())
        yield c


def get(url: str, **headers: str) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(r.headers), r.read()


def test_status_is_gzipped_when_asked_and_plain_otherwise(coord: CoordinatorProcess) -> None:
    url = coord.http_url + "api/status"
    head, body = get(url, **{"Accept-Encoding": "gzip, deflate, br"})
    assert head.get("Content-Encoding") == "gzip"
    assert "Accept-Encoding" in head.get("Vary", "")
    zipped = json.loads(gzip.decompress(body))
    assert len(zipped["peers"]) == 3

    head, body = get(url)  # urllib asks for no encoding
    assert "Content-Encoding" not in head
    plain = json.loads(body)
    assert {p["peer_id"] for p in plain["peers"]} == {p["peer_id"] for p in zipped["peers"]}

    head, body = get(url, **{"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in head
    assert json.loads(body)["run"] == plain["run"]


@pytest.mark.parametrize("header, ok", [
    ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("*", True),
    ("", False), ("br", False), ("gzip;q=0", False), ("identity, gzip; q=0.0", False),
    ("*;q=0, gzip", True), ("*, gzip;q=0", False), ("gzip;q=x", False),
])
def test_accept_encoding_is_read_as_browsers_send_it(header: str, ok: bool) -> None:
    req = make_mocked_request("GET", "/api/status", headers={"Accept-Encoding": header})
    assert accepts_gzip(req) is ok


def test_fake_status_server_gzips_too() -> None:
    """The dashboard's tests get what the coordinator sends (tests/fake_status.py)."""
    from tests.fake_status import FakeStatusServer, make_status

    with FakeStatusServer(make_status(n_peers=40)) as fake:
        head, body = get(fake.url + "/api/status", **{"Accept-Encoding": "gzip"})
        assert head.get("Content-Encoding") == "gzip"
        assert len(json.loads(gzip.decompress(body))["peers"]) == 40
        head, body = get(fake.url + "/api/status")
        assert "Content-Encoding" not in head and len(json.loads(body)["peers"]) == 40
