"""A block replica's EndStep barrier (peer/services.py `StageService._finish`) and its probe of a
missing driver (does a gRPC channel to it fail to connect?), on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

import grpc

from peer.services import StageService
from peer.step_barrier import _StepEnds
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def swallow(reader, writer) -> None:
    """A port that accepts and never answers: a frozen peer."""
    while await reader.read(65536):
        pass


def measured_service(address: dict[str, str], channels: list[grpc.aio.Channel]
                     ) -> tuple[FakePeer, StageService]:
    """A stage-1 replica whose stage-0 replicas are `address`'s keys, dialled at its values over
    real gRPC channels (collected in `channels` to close), with a measured barrier (its
    deadline is the 2 s floor)."""
    from peer.pipeline import deadline

    class Peer(FakePeer):
        def address_of(self, peer_id: str) -> str:
            return address[peer_id]

        def channel(self, address: str) -> grpc.aio.Channel:
            channels.append(grpc.aio.insecure_channel(address))
            return channels[-1]

    spec = RunSpec().replace(**{"pipeline.stages": 2})
    d = Peer(spec, view=FakeView(stage_infos(2), {0: sorted(address), 1: ["ab" * 8]}))
    service = StageService(d)
    for _ in range(deadline.WARMUP):
        service._barrier.complete(0.01)
    return d, service


def test_the_barrier_does_not_wait_for_a_driver_that_cannot_be_connected_to() -> None:
    """Drivers d1..d4 name each other for step 5; d1 ended it. d2 was killed (nothing listens at
    its port any more) and d3's address accepts and closes every connection (as the lab's delay
    relay does when the peer behind it is dead): the view still lists both until their leases
    lapse, and neither is waited for. d4 is frozen (its port accepts and never answers): it is
    waited for until the barrier's measured deadline."""

    channels: list[grpc.aio.Channel] = []

    async def scenario() -> None:
        async def close_at_once(reader, writer):
            writer.close()

        closing = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        frozen = await asyncio.start_server(swallow, "127.0.0.1", 0)
        address = {"d1": "127.0.0.1:1", "d2": f"127.0.0.1:{closed_port()}",
                   "d3": f"127.0.0.1:{closing.sockets[0].getsockname()[1]}",
                   "d4": f"127.0.0.1:{frozen.sockets[0].getsockname()[1]}"}
        d, service = measured_service(address, channels)
        ends = _StepEnds(expected=set(address), got={"d1"})
        try:
            reply = await asyncio.wait_for(service._finish(5, ends), 20)  # a hang guard only
        finally:
            for ch in channels:
                await ch.close()
            closing.close()
            frozen.close()
        assert reply.stepped and d.stepped == [5] and ends.gone == {"d2", "d3"}

    asyncio.run(scenario())


def test_a_driver_the_last_barrier_stepped_without_is_not_waited_for_until_heard_from() -> None:
    """d2 is frozen (its port accepts and never answers): step 5's barrier waits its deadline
    for d2's EndStep; step 6's does not wait for it at all; once d2's EndStep comes in again
    it is waited for as usual."""
    from peer.pipeline import deadline
    from protocols import shoal_pb2 as pb

    channels: list[grpc.aio.Channel] = []

    async def scenario() -> None:
        frozen = await asyncio.start_server(swallow, "127.0.0.1", 0)
        address = {"d1": "127.0.0.1:1",
                   "d2": f"127.0.0.1:{frozen.sockets[0].getsockname()[1]}"}
        d, service = measured_service(address, channels)  # step 5 waits 2 s for d2
        try:
            ends = _StepEnds(expected={"d1", "d2"}, got={"d1"})
            assert (await asyncio.wait_for(service._finish(5, ends), 20)).stepped
            for _ in range(deadline.MEASURED):  # a wait for d2 would now last 30 s
                service._barrier.complete(100.0)
            ends = _StepEnds(expected={"d1", "d2"}, got={"d1"})
            assert (await asyncio.wait_for(service._finish(6, ends), 20)).stepped
            # d2 thawed: its late EndStep comes in, and step 7 waits for it again
            service._ended(pb.StepEnd(step=6, sender="d2", stage0_replicas=["d1", "d2"]),
                           False)
            ends = _StepEnds(expected={"d1", "d2"}, got={"d1"})
            seventh = asyncio.ensure_future(service._finish(7, ends))
            await asyncio.sleep(1.0)
            assert not seventh.done()
            ends.got.add("d2")
            ends.arrived.set()
            assert (await asyncio.wait_for(seventh, 20)).stepped
            assert d.stepped == [5, 6, 7]
        finally:
            for ch in channels:
                await ch.close()
            frozen.close()

    asyncio.run(scenario())
