"""A block replica's EndStep barrier (peer/services.py `StageService._finish`) and the
connection-refused probe it uses (peer/pipeline/wire.py `refuses_connections`), on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

from peer.pipeline import wire
from peer.services import StageService, _StepEnds
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_a_port_nothing_listens_on_refuses() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        open_port = server.sockets[0].getsockname()[1]
        try:
            assert await wire.refuses_connections(f"127.0.0.1:{closed_port()}")
            assert not await wire.refuses_connections(f"127.0.0.1:{open_port}")
            assert not await wire.refuses_connections("not an address")
        finally:
            server.close()

    asyncio.run(scenario())


def test_the_barrier_does_not_wait_for_a_driver_whose_port_refuses() -> None:
    """Drivers d1 and d2 name each other for step 5; d2 was killed (the view still lists it
    until its lease lapses). The replica steps once d1's EndStep is in and d2's port refused,
    not after the barrier's deadline (the 30 s sync timeout, as nothing was measured yet)."""
    class Peer(FakePeer):
        def address_of(self, peer_id: str) -> str:
            return {"d1": "127.0.0.1:1", "d2": f"127.0.0.1:{dead}"}[peer_id]

    dead = closed_port()
    spec = RunSpec().replace(**{"pipeline.stages": 2})
    d = Peer(spec, view=FakeView(stage_infos(2), {0: ["d1", "d2"], 1: ["ab" * 8]}))
    service = StageService(d)

    async def scenario() -> None:
        ends = _StepEnds(expected={"d1", "d2"}, got={"d1"})
        reply = await asyncio.wait_for(service._finish(5, ends), 20)  # a hang guard only
        assert reply.stepped and d.stepped == [5] and ends.gone == {"d2"}

    asyncio.run(scenario())
