"""Admission, membership certificates and signed calls against real grpc.aio servers.

A fake coordinator (unary calls) and a fake stage (streaming calls) run behind AuthInterceptor on
127.0.0.1; every client holds a real Ed25519 identity. Each bad call must end with the right status
code and a message that says what to do, and the server must keep serving afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest

from protocols import auth, shoal_pb2, shoal_pb2_grpc
from protocols.auth import (
    Admission,
    AdmissionDenied,
    AuthInterceptor,
    CallSigner,
    CertificateInvalid,
    client_interceptors,
    current_caller,
    issue_certificate,
    new_token,
    token_proof,
    verify_certificate,
)
from protocols.identity import Identity

SWARM = "swarm-a"
HEARTBEAT = "/shoal.v1.Coordinator/Heartbeat"
FORWARD = "/shoal.v1.Stage/Forward"
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


class FakeCoordinator(shoal_pb2_grpc.CoordinatorServicer):
    """Answers with the verified caller's peer id so tests can see what the handler saw."""

    async def Join(self, request, context):
        caller = current_caller()
        assert caller is not None and caller.certificate is None
        assert caller.public_key == request.public_key
        return shoal_pb2.JoinReply(swarm_id=caller.peer_id)

    async def Heartbeat(self, request, context):
        await asyncio.sleep(0.01 * request.known_epoch)  # let concurrent calls interleave
        caller = current_caller()
        assert caller.certificate is None or caller.certificate.swarm_id == SWARM
        return shoal_pb2.HeartbeatReply(action=caller.peer_id, epoch=request.known_epoch,
                                        view=shoal_pb2.SwarmView(swarm_id=caller.role))


    def Leave(self, request, context):  # not async: runs inline on the event loop
        assert current_caller().peer_id == request.reason
        return shoal_pb2.LeaveReply()


class FakeStage(shoal_pb2_grpc.StageServicer):
    async def Forward(self, request_iterator, context):  # async generator style
        header, size = None, 0
        async for chunk in request_iterator:
            if chunk.HasField("header"):
                header = chunk.header
            else:
                size += len(chunk.data)
        sender = current_caller().peer_id
        yield shoal_pb2.TensorChunk(header=shoal_pb2.CallHeader(
            sender=sender, microbatch_id=header.microbatch_id, total_bytes=size))

    async def Backward(self, request_iterator, context):  # context.read / context.write style
        first = await context.read()
        reply = shoal_pb2.CallHeader(sender=current_caller().peer_id, kind=first.header.kind)
        await context.write(shoal_pb2.TensorChunk(header=reply))


class FakeSync(shoal_pb2_grpc.SyncServicer):
    async def Exchange(self, request_iterator, context):
        count = len([chunk async for chunk in request_iterator])
        yield shoal_pb2.TensorChunk(data=f"{current_caller().peer_id}:{count}".encode())


class FakeState(shoal_pb2_grpc.StateServicer):
    async def Download(self, request, context):  # unary-stream
        header = shoal_pb2.CallHeader(sender=current_caller().peer_id)
        for _ in range(request.stage):
            yield shoal_pb2.TensorChunk(header=header)


async def _collect(request_iterator, context) -> bytes:  # raw-bytes stream-unary handler
    parts = [part async for part in request_iterator]
    return current_caller().peer_id.encode() + b":" + b"".join(parts)


@dataclass
class Swarm:
    """A coordinator identity, its members, and a server on 127.0.0.1 that checks calls."""

    coordinator: Identity = field(default_factory=Identity.generate)
    members: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    address: str = ""
    interceptor: AuthInterceptor | None = None

    def admit(self, identity: Identity, *, ttl_s: float = 60.0, now: float | None = None,
              swarm: str = SWARM, issuer: Identity | None = None):
        self.members.add(identity.peer_id)
        return issue_certificate(issuer or self.coordinator, identity.public_key, swarm, ttl_s,
                                 time.time() if now is None else now, serial=len(self.members))

    def signer(self, identity: Identity, cert=None, **kw) -> CallSigner:
        return CallSigner(identity, lambda: cert, **kw)

    def channel(self, signer: CallSigner | None = None) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.address, interceptors=client_interceptors(signer) if signer else None)


def run(test: Callable[[Swarm], Awaitable[None]]) -> None:
    async def main() -> None:
        swarm = Swarm()
        swarm.interceptor = AuthInterceptor(
            issuer_public_key=lambda: swarm.coordinator.public_key,
            swarm_id=lambda: SWARM,
            is_member=lambda peer_id: peer_id in swarm.members,
            is_revoked=lambda peer_id: peer_id in swarm.revoked,
        )
        server = grpc.aio.server(interceptors=[swarm.interceptor],
                                 options=[("grpc.so_reuseport", 0)])
        shoal_pb2_grpc.add_CoordinatorServicer_to_server(FakeCoordinator(), server)
        shoal_pb2_grpc.add_StageServicer_to_server(FakeStage(), server)
        shoal_pb2_grpc.add_StateServicer_to_server(FakeState(), server)
        shoal_pb2_grpc.add_SyncServicer_to_server(FakeSync(), server)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Raw", {"Collect": grpc.stream_unary_rpc_method_handler(_collect)})])
        swarm.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            await asyncio.wait_for(test(swarm), timeout=20)
        finally:
            await server.stop(None)

    asyncio.run(main())


async def heartbeat(channel: grpc.aio.Channel, metadata=None, epoch: int = 0):
    # A map field: its wire order is not canonical, so signatures must cover the received bytes.
    stats = shoal_pb2.PeerStats(bytes_by_kind={f"kind-{i}": i for i in range(9)}, step=epoch)
    stub = shoal_pb2_grpc.CoordinatorStub(channel)
    return await stub.Heartbeat(shoal_pb2.HeartbeatRequest(known_epoch=epoch, stats=stats),
                                metadata=metadata)


async def refused(call: Awaitable, code: grpc.StatusCode, *phrases: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for phrase in phrases:
        assert phrase in info.value.details(), info.value.details()
    return info.value.details()


def chunks(microbatch: str, data: bytes = b"x" * 1000, count: int = 1):
    yield shoal_pb2.TensorChunk(header=shoal_pb2.CallHeader(kind="forward",
                                                            microbatch_id=microbatch))
    for _ in range(count):
        yield shoal_pb2.TensorChunk(data=data)


# ---------------------------------------------------------------- good calls


def test_signed_unary_call_reaches_handler_with_caller() -> None:
    async def body(swarm: Swarm) -> None:
        peer = Identity.generate()
        async with swarm.channel(swarm.signer(peer, swarm.admit(peer))) as channel:
            assert (await heartbeat(channel)).action == peer.peer_id
        assert current_caller() is None

    run(body)


def test_concurrent_callers_each_see_themselves() -> None:
    async def body(swarm: Swarm) -> None:
        peers = [Identity.generate() for _ in range(4)]
        channels = [swarm.channel(swarm.signer(p, swarm.admit(p))) for p in peers]
        replies = await asyncio.gather(*(heartbeat(c, epoch=3 - i) for i, c in
                                         enumerate(channels)))
        assert [r.action for r in replies] == [p.peer_id for p in peers]
        for c in channels:
            await c.close()

    run(body)


def test_streaming_calls_are_signed_over_first_message() -> None:
    async def body(swarm: Swarm) -> None:
        peer = Identity.generate()
        async with swarm.channel(swarm.signer(peer, swarm.admit(peer))) as channel:
            stage = shoal_pb2_grpc.StageStub(channel)
            replies = [r async for r in stage.Forward(chunks("mb-1"))]  # sync iterator
            assert replies[0].header.sender == peer.peer_id
            assert replies[0].header.total_bytes == 1000

            async def agen():
                for c in chunks("mb-2"):
                    yield c

            replies = [r async for r in stage.Backward(agen())]  # async iterator
            assert replies[0].header.sender == peer.peer_id
            raw = channel.stream_unary("/test.Raw/Collect")  # raw bytes, no deserializer
            assert await raw(iter([b"ab", b"cd"])) == peer.peer_id.encode() + b":abcd"
            assert await raw(iter([])) == peer.peer_id.encode() + b":"  # empty stream
            state = shoal_pb2_grpc.StateStub(channel)
            replies = [r async for r in state.Download(shoal_pb2.StateRequest(stage=3))]
            assert [r.header.sender for r in replies] == [peer.peer_id] * 3
            sync = shoal_pb2_grpc.SyncStub(channel)
            replies = [r async for r in sync.Exchange(chunks("mb-3"))]
            assert replies[0].data == f"{peer.peer_id}:2".encode()
            coordinator = shoal_pb2_grpc.CoordinatorStub(channel)  # a plain (not async) handler
            assert await coordinator.Leave(shoal_pb2.LeaveRequest(reason=peer.peer_id)) == (
                shoal_pb2.LeaveReply())

    run(body)


def test_join_is_signed_by_the_key_itself() -> None:
    async def body(swarm: Swarm) -> None:
        peer = Identity.generate()
        expired = swarm.admit(peer, now=time.time() - 1000, ttl_s=10)
        swarm.members.clear()
        # Before joining there is no certificate; re-joining with an expired one must work too.
        for cert in (None, expired):
            async with swarm.channel(swarm.signer(peer, cert)) as channel:
                stub = shoal_pb2_grpc.CoordinatorStub(channel)
                reply = await stub.Join(shoal_pb2.JoinRequest(public_key=peer.public_key))
                assert reply.swarm_id == peer.peer_id
        async with swarm.channel(swarm.signer(peer, None)) as channel:
            await refused(heartbeat(channel), UNAUTH, "needs a membership certificate")

    run(body)


def test_coordinator_signs_for_itself_and_peers_carry_their_role() -> None:
    async def body(swarm: Swarm) -> None:
        async with swarm.channel(swarm.signer(swarm.coordinator, None)) as channel:
            reply = await heartbeat(channel)
            assert (reply.action, reply.view.swarm_id) == (swarm.coordinator.peer_id,
                                                           "coordinator")
        peer = Identity.generate()
        async with swarm.channel(swarm.signer(peer, swarm.admit(peer))) as channel:
            assert (await heartbeat(channel)).view.swarm_id == "peer"

    run(body)


# ---------------------------------------------------------------- bad calls


def test_every_bad_call_is_refused_and_the_server_keeps_serving() -> None:
    async def body(swarm: Swarm) -> None:
        peer, stranger = Identity.generate(), Identity.generate()
        good = swarm.signer(peer, swarm.admit(peer))
        message = shoal_pb2.HeartbeatRequest(known_epoch=0, stats=shoal_pb2.PeerStats(
            bytes_by_kind={f"kind-{i}": i for i in range(9)}))
        request = message.SerializeToString()  # sign the bytes of the very object that is sent
        channel = swarm.channel()  # no interceptors: metadata is made by hand below
        stub = shoal_pb2_grpc.CoordinatorStub(channel)

        md = dict(good.metadata(HEARTBEAT, request))
        md["x-shoal-sig-bin"] = stranger.sign(b"something else")
        await refused(heartbeat(channel, tuple(md.items())), UNAUTH, "signature", peer.peer_id)

        md = good.metadata(HEARTBEAT, shoal_pb2.HeartbeatRequest(known_epoch=7)
                           .SerializeToString())  # signed one body, sends another
        await refused(heartbeat(channel, md), UNAUTH, "altered in transit")

        await refused(heartbeat(channel), UNAUTH, "not signed", "client_interceptors")
        md = tuple(kv for kv in good.metadata(HEARTBEAT, request) if kv[0] != "x-shoal-nonce")
        await refused(heartbeat(channel, md), UNAUTH, "missing x-shoal-nonce")

        md = good.metadata(HEARTBEAT, request)
        assert (await stub.Heartbeat(message, metadata=md)).action == peer.peer_id
        await refused(stub.Heartbeat(message, metadata=md), UNAUTH, "replayed", "reuses nonce")

        stale = swarm.signer(peer, swarm.admit(peer), clock=lambda: time.time() - 600)
        await refused(heartbeat(channel, stale.metadata(HEARTBEAT, request)), UNAUTH,
                      "s from this server's clock", "NTP")

        cases = [
            (swarm.admit(peer, now=time.time() - 100, ttl_s=30), UNAUTH, "expired at",
             "re-join the coordinator"),
            (swarm.admit(peer, issuer=Identity.generate()), UNAUTH,
             "not signed by this swarm's coordinator"),
            (swarm.admit(peer, swarm="swarm-b"), UNAUTH, "for swarm 'swarm-b'"),
            (swarm.admit(peer, now=time.time() + 3600), UNAUTH, "valid only from"),
        ]
        for cert, code, *phrases in cases:
            async with swarm.channel(swarm.signer(peer, cert)) as bad:
                await refused(heartbeat(bad), code, *phrases)

        outsider = Identity.generate()
        cert = swarm.admit(outsider)
        swarm.members.discard(outsider.peer_id)
        async with swarm.channel(swarm.signer(outsider, cert)) as bad:
            await refused(heartbeat(bad), DENIED, outsider.peer_id, "not a member", "re-join")
            swarm.members.add(outsider.peer_id)
            swarm.revoked.add(outsider.peer_id)
            await refused(heartbeat(bad), DENIED, outsider.peer_id, "revoked")

        async with swarm.channel(good) as fine:
            assert (await heartbeat(fine)).action == peer.peer_id
        await channel.close()

    run(body)


def test_tampered_first_stream_message_is_refused() -> None:
    async def body(swarm: Swarm) -> None:
        peer = Identity.generate()
        signer = swarm.signer(peer, swarm.admit(peer))
        async with swarm.channel() as channel:
            stage = shoal_pb2_grpc.StageStub(channel)
            signed_header = next(chunks("mb-1")).SerializeToString()
            md = signer.metadata(FORWARD, signed_header)
            call = stage.Forward(chunks("mb-EVIL"), metadata=md)
            await refused(call.read(), UNAUTH, "altered in transit")
            md = signer.metadata(FORWARD, signed_header)
            replies = [r async for r in stage.Forward(chunks("mb-1"), metadata=md)]
            assert replies[0].header.sender == peer.peer_id
        async with swarm.channel(signer) as channel:
            call = shoal_pb2_grpc.StageStub(channel).Forward()  # call.write() style: no iterator
            with pytest.raises(ValueError, match="need a request iterator"):
                await call.write(next(chunks("mb-2")))

    run(body)


def test_refused_long_stream_reports_the_servers_status() -> None:
    # Without draining the refused stream, grpc.aio clients mostly see INTERNAL (grpc#36066).
    async def body(swarm: Swarm) -> None:
        peer = Identity.generate()
        expired = swarm.admit(peer, now=time.time() - 100, ttl_s=10)
        async with swarm.channel(swarm.signer(peer, expired)) as channel:
            stage = shoal_pb2_grpc.StageStub(channel)
            for _ in range(10):
                call = stage.Forward(chunks("mb", b"x" * 65536, count=20))
                await refused(call.read(), UNAUTH, "expired at")

    run(body)


def test_certificate_signature_is_checked_once(monkeypatch) -> None:
    verified: list[bytes] = []
    real = auth.verify_signature

    def counting(public_key, signature, data):
        verified.append(bytes(data))
        return real(public_key, signature, data)

    monkeypatch.setattr(auth, "verify_signature", counting)

    async def body(swarm: Swarm) -> None:
        peer = Identity.generate()
        async with swarm.channel(swarm.signer(peer, swarm.admit(peer))) as channel:
            for _ in range(5):
                await heartbeat(channel)
        certificate_checks = [d for d in verified if not d.startswith(auth.SIGNING_CONTEXT)]
        assert len(certificate_checks) == 1 and len(verified) == 6

    run(body)


# ---------------------------------------------------------------- certificates and admission


def test_verify_certificate_errors_say_what_to_do() -> None:
    coordinator, peer = Identity.generate(), Identity.generate()
    now = 1_700_000_000.0
    signed = issue_certificate(coordinator, peer.public_key, SWARM, 60, now, serial=3)
    cert = verify_certificate(signed, coordinator.public_key, now + 1, SWARM)
    assert (cert.peer_id, cert.serial, cert.role) == (peer.peer_id, 3, "peer")
    with pytest.raises(CertificateInvalid, match=r"expired at 2023-11-14 22:14:20 UTC.*re-join"):
        verify_certificate(signed, coordinator.public_key, now + 60, SWARM)
    with pytest.raises(CertificateInvalid, match="not signed by this swarm's coordinator"):
        verify_certificate(signed, peer.public_key, now, SWARM)
    with pytest.raises(CertificateInvalid, match="has not joined"):
        verify_certificate(signed, b"", now, SWARM)
    tampered = shoal_pb2.SignedCertificate(certificate=signed.certificate + b"\x30\x01",
                                           signature=signed.signature)
    with pytest.raises(CertificateInvalid):
        verify_certificate(tampered, coordinator.public_key, now, SWARM)


def test_admission_with_token() -> None:
    token, peer, now = new_token(), Identity.generate(), 1_700_000_000.5
    assert len(token) >= 43 and token != new_token()
    gate = Admission(token=token)
    gate.check(peer.public_key, token_proof(token, peer.public_key, now), now, now + 3)
    with pytest.raises(AdmissionDenied, match=r"does not match.*--token-file") as info:
        gate.check(peer.public_key, token_proof("wrong", peer.public_key, now), now, now)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    other = Identity.generate().public_key  # a proof is bound to the key it was made for
    with pytest.raises(AdmissionDenied, match="does not match"):
        gate.check(other, token_proof(token, peer.public_key, now), now, now)
    with pytest.raises(AdmissionDenied, match="NTP"):
        gate.check(peer.public_key, token_proof(token, peer.public_key, now), now, now + 600)
    with pytest.raises(AdmissionDenied, match="no join token proof"):
        gate.check(peer.public_key, b"", now, now)


def test_admission_with_allow_list() -> None:
    known, unknown, now = Identity.generate(), Identity.generate(), time.time()
    gate = Admission(allowed_keys={known.public_key})
    gate.check(known.public_key, b"", now, now)
    with pytest.raises(AdmissionDenied, match=f"peer {unknown.peer_id}.*allow-list"):
        gate.check(unknown.public_key, b"", now, now)
    both = Admission(token="t0k", allowed_keys={known.public_key})
    with pytest.raises(AdmissionDenied, match="does not match"):
        both.check(known.public_key, token_proof("nope", known.public_key, now), now, now)
    with pytest.raises(ValueError, match="token"):
        Admission()
