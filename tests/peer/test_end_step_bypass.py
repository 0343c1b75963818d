"""The driver's end of step (peer/pipeline/driver.py `close_step`) over real gRPC on 127.0.0.1:
a stage this step went around (no replica answered its microbatches) does not hold the swarm
until its replicas come back; a stage that was visited is still waited for."""

from __future__ import annotations

import asyncio

import grpc

from peer.pipeline.driver import Driver
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos

SPEC = RunSpec().replace(**{"pipeline.stages": 2})


class Replica(pbg.StageServicer):
    """Answers EndStep at once, or (`hold`) only once the test releases it: a replica that is
    cut off for now."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.hold = hold
        self.asked: list[int] = []

    async def EndStep(self, request: pb.StepEnd, context) -> pb.StepDone:
        self.asked.append(request.step)
        if self.hold is not None:
            await self.hold.wait()
        return pb.StepDone(step=request.step, stage=0, stepped=True)


class NetPeer(FakePeer):
    def __init__(self, addresses: dict[str, str], **kw) -> None:
        super().__init__(**kw)
        self.addresses = addresses
        self._channels: dict[str, grpc.aio.Channel] = {}

    def address_of(self, peer_id: str) -> str:
        return self.addresses[peer_id]

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]


async def _serve(servicer: Replica) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pbg.add_StageServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_bypassed_stage_is_not_waited_for_and_a_visited_one_is() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        up, cut = Replica(), Replica(hold=release)
        (s1, a1), (s2, a2) = await _serve(up), await _serve(cut)
        view = FakeView(stage_infos(2), {1: ["r1"], 2: ["r2"]})
        d = NetPeer({"r1": a1, "r2": a2}, spec=SPEC, view=view)
        driver = Driver(d)
        for _ in range(3):  # measured answers: the deadline is its floor, not the timeout
            driver._answers.complete(0.01)
        replicas = {1: ["r1"], 2: ["r2"]}

        def request(step: int):
            return lambda pid, stage: pb.StepEnd(step=step, sender=d.peer_id)

        try:
            # stage 2 was gone around this step: the step ends without r2's answer, which
            # goes on in the background (r2 catches up when it is back)
            answers = await driver.close_step(7, replicas, request(7), d.sync_step(7),
                                              bypassed={2})
            assert answers["r1"].stepped and answers["r2"] is None
            assert not release.is_set() and cut.asked == [7]
            # visited this time: the driver waits until a replica of stage 2 stepped, however
            # long past the measured deadline; it steps once the cut-off one answers
            ending = asyncio.ensure_future(driver.close_step(8, replicas, request(8),
                                                             d.sync_step(8)))
            while cut.asked != [7, 8] or len(up.asked) < 2:
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # past the measured deadline (its 2 s floor)
            assert not ending.done(), "stage 2 was visited: its EndStep must be waited for"
            release.set()
            answers = await ending
            assert answers["r2"].stepped
        finally:
            release.set()
            for ch in d._channels.values():
                await ch.close()
            await s1.stop(None)
            await s2.stop(None)

    asyncio.run(scenario())
