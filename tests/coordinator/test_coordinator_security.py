"""Every bad input to a real coordinator process is refused with the right status and a useful
message, and the coordinator keeps answering good calls afterwards."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pb_grpc
from protocols.auth import issue_certificate
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    CoordinatorRefused,
    PeerStats,
)
from protocols.identity import Identity
from tests.sim_peer import CoordinatorProcess

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
BENCH = Benchmark(samples_per_s=5.0, device="test")


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator with a join token and RunSpec() defaults (no --config)."""
    with CoordinatorProcess(tmp_path_factory.mktemp("sec") / "state") as c:
        yield c


async def joined(coord: CoordinatorProcess, port: int = 9000) -> CoordinatorClient:
    client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
    await client.join(BENCH, f"127.0.0.1:{port}")
    return client


async def still_serving(coord: CoordinatorProcess) -> None:
    client = await joined(coord, 9999)
    result = await client.heartbeat(PeerStats(state="training", samples_per_s=3.0))
    assert result.lease_expires > time.time()
    await client.close()


async def refused(call, code: grpc.StatusCode, match: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert match.lower() in info.value.details().lower(), info.value.details()
    return info.value.details()


class Tamper(grpc.aio.UnaryUnaryClientInterceptor):
    """Runs after the signing interceptor: flips one bit of the signature."""

    async def intercept_unary_unary(self, continuation, details, request):
        md = [(k, (bytes([v[0] ^ 1]) + v[1:]) if k == "x-shoal-sig-bin" else v)
              for k, v in details.metadata]
        return await continuation(details._replace(metadata=grpc.aio.Metadata(*md)), request)


class Record(grpc.aio.UnaryUnaryClientInterceptor):
    """Runs after the signing interceptor: keeps the signed metadata of each call."""

    def __init__(self) -> None:
        self.metadata: list[tuple] = []

    async def intercept_unary_unary(self, continuation, details, request):
        self.metadata.append(tuple(details.metadata))
        return await continuation(details, request)


def with_extra_interceptor(client: CoordinatorClient, extra) -> pb_grpc.CoordinatorStub:
    """A stub signing like `client` does, then passing through `extra`."""
    from protocols.auth import CallSigner, client_interceptors

    signer = CallSigner(client.identity, lambda: client.certificate)
    channel = grpc.aio.insecure_channel(client.address,
                                        interceptors=[*client_interceptors(signer), extra])
    stub = pb_grpc.CoordinatorStub(channel)
    stub.channel = channel  # type: ignore[attr-defined]  # a collected channel closes itself
    return stub


def test_wrong_or_missing_token_is_refused(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        bad = CoordinatorClient(coord.grpc_address, Identity.generate(), "not-the-token")
        with pytest.raises(CoordinatorRefused, match="token") as info:
            await bad.join(BENCH, "127.0.0.1:9001")
        assert info.value.code == DENIED
        none = CoordinatorClient(coord.grpc_address, Identity.generate(), None)
        with pytest.raises(CoordinatorRefused, match="token proof"):
            await none.join(BENCH, "127.0.0.1:9002")
        await bad.close()
        await none.close()
        await still_serving(coord)

    asyncio.run(scenario())


def test_bad_signature_expired_foreign_cert_and_replay_are_refused(
        coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        client = await joined(coord)
        hb = pb.HeartbeatRequest(stats=pb.PeerStats(state="training"))
        # a flipped signature bit
        tampering = with_extra_interceptor(client, Tamper())
        await refused(tampering.Heartbeat(hb), UNAUTH, "signature")
        # an expired certificate, issued by the real coordinator key
        key = Identity.load(coord.state_dir / "coordinator.key")
        swarm_id = (await client.view()).swarm_id
        good = client.certificate
        client.certificate = issue_certificate(key, client.identity.public_key, swarm_id, 10.0,
                                               time.time() - 100, 1)
        await refused(client._stub_now().Heartbeat(hb), UNAUTH, "expired")
        # a certificate from another coordinator
        client.certificate = issue_certificate(Identity.generate(), client.identity.public_key,
                                               swarm_id, 600.0, time.time(), 1)
        await refused(client._stub_now().Heartbeat(hb), UNAUTH, "not signed by")
        client.certificate = good
        # a replayed call: the same metadata and body a second time
        record = Record()
        recording = with_extra_interceptor(client, record)
        await recording.Heartbeat(hb)
        raw_channel = grpc.aio.insecure_channel(coord.grpc_address)
        raw = pb_grpc.CoordinatorStub(raw_channel)
        await refused(raw.Heartbeat(hb, metadata=record.metadata[0]), UNAUTH, "nonce")
        # no signature at all
        await refused(raw.Heartbeat(hb), UNAUTH, "not signed")
        for channel in (raw_channel, tampering.channel, recording.channel):
            await channel.close()
        await client.close()
        await still_serving(coord)

    asyncio.run(scenario())


def test_non_members_cannot_heartbeat(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        stranger = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
        hb = pb.HeartbeatRequest(stats=pb.PeerStats(state="training"))
        await refused(stranger._stub_now().Heartbeat(hb), UNAUTH, "certificate")
        gone = await joined(coord)
        cert = gone.certificate
        await gone.leave("test")
        gone.certificate = cert  # still within its validity window, but revoked
        await refused(gone._stub_now().Heartbeat(hb), DENIED, "not a member")
        await stranger.close()
        await gone.close()
        await still_serving(coord)

    asyncio.run(scenario())


BAD_STATS = [
    (dict(state="training", samples_per_s=math.nan), "samples_per_s"),
    (dict(state="training", tokens_per_s=-1.0), "tokens_per_s"),
    (dict(state="training", grad_norm=math.inf), "grad_norm"),
    (dict(state="training", loss=math.inf), "loss"),
    (dict(state="training", loss=-3.0), "loss"),
    (dict(state="dancing"), "state"),
    (dict(state="training", state_hash="ab" * 50_000), "state_hash"),
    (dict(state="training", state_hash="not hex"), "state_hash"),
    (dict(state="training", bytes_by_kind={f"k{i}": 1 for i in range(40)}), "bytes_by_kind"),
    (dict(state="training", bytes_by_kind={"x" * 1000: 1}), "bytes_by_kind"),
    (dict(state="training", step=2**60), "step"),
]


def test_malformed_heartbeats_are_invalid_arguments(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        client = await joined(coord)
        stub = client._stub_now()
        for fields, name in BAD_STATS:
            request = pb.HeartbeatRequest(stats=pb.PeerStats(**fields))
            await refused(stub.Heartbeat(request), INVALID, name)
        too_big = pb.HeartbeatRequest(stats=pb.PeerStats(state="x" * (2 << 20)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Heartbeat(too_big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a NaN loss means "unknown" and is fine
        ok = await client.heartbeat(PeerStats(state="training", loss=math.nan))
        assert ok.action == ""
        await client.close()
        await still_serving(coord)

    asyncio.run(scenario())


def test_malformed_joins_are_invalid_arguments(coord: CoordinatorProcess) -> None:
    async def scenario() -> None:
        cases = [
            (dict(address="x" * 300), "address"),
            (dict(address="no-port"), "address"),
            (dict(address="host:99999"), "address"),
            (dict(benchmark=Benchmark(samples_per_s=0.0)), "samples_per_s"),
            (dict(benchmark=Benchmark(samples_per_s=math.nan)), "samples_per_s"),
            (dict(benchmark=Benchmark(samples_per_s=1.0, device="d" * 500)), "device"),
            (dict(stage_hint=99), "stage_hint"),
        ]
        for kwargs, name in cases:
            client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            args = {"benchmark": BENCH, "address": "127.0.0.1:9000", **kwargs}
            with pytest.raises(CoordinatorRefused, match=name) as info:
                await client.join(**args)
            assert info.value.code == INVALID
            await client.close()
        await still_serving(coord)

    asyncio.run(scenario())


def test_allow_list_admits_only_listed_keys(tmp_path: Path) -> None:
    allowed = Identity.generate()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# the one peer we trust\n{allowed.public_key.hex()}\n")
    with CoordinatorProcess(tmp_path / "state", extra=["--allow-file", str(allow)]) as coord:
        async def scenario() -> None:
            stranger = CoordinatorClient(coord.grpc_address, Identity.generate())
            with pytest.raises(CoordinatorRefused, match="allow-list") as info:
                await stranger.join(BENCH, "127.0.0.1:9001")
            assert info.value.code == DENIED
            friend = CoordinatorClient(coord.grpc_address, allowed)
            result = await friend.join(BENCH, "127.0.0.1:9002")
            assert result.stage == 0
            await friend.heartbeat(PeerStats(state="training"))
            await stranger.close()
            await friend.close()

        asyncio.run(scenario())


def test_bad_allow_list_fails_at_start_naming_the_line(tmp_path: Path) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("00" * 32 + "\nnot-a-key\n")
    coord = CoordinatorProcess(tmp_path / "state", extra=["--allow-file", str(allow)])
    with pytest.raises(RuntimeError, match=r"allow\.txt:2"):
        coord.start()
    coord.kill()
