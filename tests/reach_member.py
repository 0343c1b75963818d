"""A member for the reachability tests: a real `CoordinatorClient` that heartbeats, and, when
asked, a real gRPC server on 127.0.0.1 with the peer's own Reach service (peer/reach.py) behind
the peer's AuthInterceptor, as `shoal peer` serves it, without torch or a stage.

    async with ReachMember(coord.grpc_address, coord.token, serve=True) as m:
        await m.join()                 # registered at 127.0.0.1:<its server's port>
        await m.wait_reach("direct")   # the coordinator dialled it back
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import grpc

from peer.reach import ReachService
from protocols import reach as reach_wire
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.auth import AuthInterceptor
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    HeartbeatResult,
    PeerStats,
)
from protocols.identity import Identity

BENCH = Benchmark(samples_per_s=5.0, device="test")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Impostor(pbg.ReachServicer):
    """Answers every ping for whatever peer id it names, signed with its own (wrong) key."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    async def Ping(self, request: pb.ReachPing, context: object) -> pb.ReachPong:
        return pb.ReachPong(nonce=request.nonce, signature=self.identity.sign(
            reach_wire.payload(bytes(request.nonce), request.peer_id)))


async def reach_server(identity: Identity, coordinator_key, swarm_id,
                       answer_as: Identity | None = None) -> tuple[grpc.aio.Server, int]:
    """A started plaintext server on 127.0.0.1 with the peer's ReachService for `identity`, or,
    with `answer_as`, an `Impostor` signing with that key."""
    server = grpc.aio.server(interceptors=[AuthInterceptor(
        issuer_public_key=coordinator_key, swarm_id=swarm_id, is_member=lambda _: True,
        key_only_methods=frozenset())])
    pbg.add_ReachServicer_to_server(
        Impostor(answer_as) if answer_as is not None else ReachService(identity), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class ReachMember:
    """One member: joins, heartbeats every heartbeat_s in the background, keeps the last reply."""

    def __init__(self, address: str, token: str | None, *, serve: bool = False,
                 answer_as: Identity | None = None, relay: bool = False) -> None:
        self.identity = Identity.generate()
        self.client = CoordinatorClient(address, self.identity, token)
        self.client.relay = relay
        self.serve = serve
        self.answer_as = answer_as
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.last: HeartbeatResult | None = None
        self._stop = asyncio.Event()
        self._beats: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def __aenter__(self) -> ReachMember:
        if self.serve:
            self.server, self.port = await reach_server(
                self.identity, lambda: self.client.coordinator_public_key,
                lambda: self.client.swarm_id, self.answer_as)
        else:
            self.port = closed_port()
        return self

    async def join(self, address: str | None = None) -> str:
        """Join with `address` (default "127.0.0.1:<port>") and start heartbeating; returns the
        address the coordinator registered."""
        joined = await self.client.join(BENCH, address or f"127.0.0.1:{self.port}")
        self._beats = asyncio.ensure_future(self.client.run_heartbeats(
            lambda: PeerStats(state="training", samples_per_s=5.0), self._note, self._stop))
        return joined.address

    def _note(self, result: HeartbeatResult) -> None:
        self.last = result

    async def wait_reach(self, reach: str, timeout: float = 60.0) -> HeartbeatResult:
        """The first heartbeat reply that reports `reach` (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last is not None and self.last.reach == reach:
                return self.last
            await asyncio.sleep(0.1)
        raise AssertionError(f"member {self.peer_id} never reported reach {reach!r} within "
                             f"{timeout} s; last reply: {self.last}")

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beats is not None:
            with contextlib.suppress(Exception):
                await self._beats
        with contextlib.suppress(Exception):
            await self.client.leave("test over")
        await self.client.close()
        if self.server is not None:
            await self.server.stop(0)
