"""The peer's Reach service (peer/reach.py) over real gRPC on 127.0.0.1, behind the peer's
AuthInterceptor: it answers the coordinator it joined, signed with its identity key, and nobody
else; malformed pings get INVALID_ARGUMENT; it keeps serving after each refusal. Also the log
line a peer writes when the coordinator reports it unreachable."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import grpc
import pytest

from peer.reach import ReachNotice
from protocols import reach as reach_wire
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.auth import CallSigner, client_interceptors, issue_certificate
from protocols.identity import Identity, verify_signature
from tests.reach_member import reach_server

SWARM = "swarm-under-test"


def test_ping_answers_only_the_coordinator() -> None:
    coordinator, me, stranger, member = (Identity.generate() for _ in range(4))
    member_cert = issue_certificate(coordinator, member.public_key, SWARM, 600.0, time.time(), 1)

    async def scenario() -> None:
        server, port = await reach_server(me, lambda: coordinator.public_key, lambda: SWARM)
        channels = []

        def stub(signer: Identity, cert=None) -> pbg.ReachStub:
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors(
                CallSigner(signer, lambda: cert)))
            channels.append(ch)
            return pbg.ReachStub(ch)

        async def refused(call, code: grpc.StatusCode, match: str) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == code, info.value.details()
            assert match in info.value.details(), info.value.details()

        def ping(peer_id: str = me.peer_id, n: int = 32) -> pb.ReachPing:
            return pb.ReachPing(nonce=secrets.token_bytes(n), peer_id=peer_id)

        try:
            # signed by a key that is not the coordinator's: no certificate, not the issuer
            await refused(stub(stranger).Ping(ping()), grpc.StatusCode.UNAUTHENTICATED,
                          "membership certificate")
            # a member of the swarm, properly certified, is still not the coordinator
            await refused(stub(member, member_cert).Ping(ping()),
                          grpc.StatusCode.PERMISSION_DENIED, "answers only the coordinator")
            coord = stub(coordinator)
            await refused(coord.Ping(ping(n=7)), grpc.StatusCode.INVALID_ARGUMENT, "32 random")
            await refused(coord.Ping(ping(peer_id="0123456789abcdef")),
                          grpc.StatusCode.INVALID_ARGUMENT, f"this is peer {me.peer_id}")
            # and it still answers the coordinator, signed by its identity key
            request = ping()
            pong = await coord.Ping(request)
            assert pong.nonce == request.nonce
            assert verify_signature(me.public_key, pong.signature,
                                    reach_wire.payload(request.nonce, me.peer_id))
            assert not verify_signature(stranger.public_key, pong.signature,
                                        reach_wire.payload(request.nonce, me.peer_id))
        finally:
            for ch in channels:
                await ch.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_unreachable_is_logged_once_in_plain_words(caplog: pytest.LogCaptureFixture) -> None:
    notice = ReachNotice()
    with caplog.at_level(logging.INFO, logger="shoal.peer"):
        for _ in range(3):
            notice.update("unreachable", "", "203.0.113.7:7100")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        text = warnings[0]
        assert "203.0.113.7:7100" in text and "port 7100" in text and "--advertise" in text
        assert "relayed once a relay is offered" in text
        notice.update("unreachable", "198.51.100.1:7000", "203.0.113.7:7100")
        notice.update("relayed", "", "198.51.100.1:40001")
    lines = [r.getMessage() for r in caplog.records]
    assert any("relay 198.51.100.1:7000" in x for x in lines), lines
    assert "relayed" in lines[-1] and "198.51.100.1:40001" in lines[-1], lines
