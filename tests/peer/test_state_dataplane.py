"""State downloads over the data plane (peer/state_service.py StateService,
peer/recovery/transfer.py receive_state / fetch_state): the real serve() (AuthInterceptor,
StateService) and a DataPlaneServer as the daemon runs them, a downloader with signed calls
over peer_channel, on 127.0.0.1, plaintext and mTLS (SHOAL_TLS_ON_LOOPBACK=1, swarm-CA leaves as
issued at join).

Checked: a state goes over the data plane with a BLAKE3 digest and loads into a StageHost with
its hash; corrupted, short and extra bytes are refused with a clear error and the peer keeps
serving; a receiver that does not ask, or a state below the threshold, gets the in-band stream;
an unreachable data plane falls back in-band; TLS works and a wrong peer id is refused; the
sender's snapshot buffers (peer/snapshot.py) are reused, but never one still being sent, and a
state changed between downloads gives a new snapshot.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from typing import ClassVar

import grpc
import numpy as np
import pytest
import torch

from bench import transport as harness
from peer import snapshot, state_service
from peer.pipeline import wire
from peer.pipeline.stage_host import StageHost
from peer.recovery import transfer
from protocols import codec, dataplane, digest, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"pipeline.stages": 2, "model.d_model": 32, "model.n_heads": 4,
                            "model.n_layers": 2})


class Downloader(harness.ProductReceiver):
    """What fetch_state uses of a peer: ProductReceiver (channels, leaf, counter) plus a view
    with no attestation and the address of the serving peer."""

    def __init__(self, address: str, leaf=None) -> None:
        identity = harness.identity_of(harness.RECEIVER_SEED)
        super().__init__(identity, harness.receiver_certificate(
            harness.identity_of(harness.COORDINATOR_SEED), identity), leaf,
            wire.state_limits(SPEC))
        self.address, self.view = address, None

    def address_of(self, pid: str) -> str:
        return self.address

    async def refresh_view(self) -> None:
        return None


@pytest.fixture(autouse=True)
def small_states_over_the_data_plane(monkeypatch):
    monkeypatch.setattr(state_service, "STATE_DATAPLANE_MIN_BYTES", 0)
    transfer._IN_BAND_ONLY.clear()
    yield
    transfer._IN_BAND_ONLY.clear()


def scenario(test, *, tls: bool = False, monkeypatch=None):
    """Run `test(peer, downloader, address)` against a serving peer holding a StageHost."""
    if tls:
        monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")
        server_leaf, client_leaf = harness.bench_certificates(
            harness.identity_of(harness.RECEIVER_SEED).peer_id)
    else:
        server_leaf = client_leaf = None

    async def main():
        served = StageHost(SPEC, 1)
        peer = harness.ProductPeer({}, server_leaf,
                                   harness.identity_of(harness.COORDINATOR_SEED).public_key,
                                   host=served)
        port = await peer.start()
        address = f"127.0.0.1:{port}"
        ctx = Downloader(address, client_leaf)
        try:
            return await asyncio.wait_for(test(peer, ctx, address), 60)
        finally:
            await ctx.close()
            await peer.stop()
            served.close()

    return asyncio.run(main())


async def download(ctx, address, **request) -> tuple[pb.CallHeader, dict]:
    return await transfer.receive_state(ctx, address, harness.SERVER_ID,
                                        pb.StateRequest(stage=1, include_optimizer=True,
                                                        **request))


def test_a_state_over_the_data_plane_verifies_and_loads() -> None:
    async def test(peer, ctx, address):
        header, arrays = await download(ctx, address)
        assert dataplane.is_dataplane(header) and header.digest == digest.BLAKE3
        assert peer.dataplane.served == 1
        assert ctx.counter.received["state"] >= header.total_bytes
        into = StageHost(SPEC, 1)
        try:
            with torch.no_grad():
                next(iter(into.params().values())).add_(1.0)  # differs until it loads
            assert into.state_hash() != peer.host.state_hash()
            got = await transfer.fetch_state(ctx, harness.SERVER_ID, into)
            assert got == peer.host.state_hash() == into.state_hash()
        finally:
            into.close()
        assert peer.dataplane.served == 2
        sent = np.concatenate([np.ravel(a).view(np.uint8)
                               for a in peer.host.state_arrays(True).values()])
        assert sum(a.nbytes for a in arrays.values()) == sent.nbytes

    scenario(test)


BAD = [
    ("flipped", lambda p: bytes(p[:-1]) + bytes([p[-1] ^ 1]), codec.DigestMismatch,
     "BLAKE3 digest"),
    ("short", lambda p: bytes(p[:-3]), codec.TruncatedPayload, "closed after"),
    ("extra", lambda p: bytes(p) + b"!", codec.OversizedPayload, "more than"),
]


@pytest.mark.parametrize(("name", "spoil", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_spoiled_payload_is_refused_and_the_peer_keeps_serving(name, spoil, error, message
                                                                 ) -> None:
    """The serving peer's data plane sends spoiled bytes once (a lying or broken sender): the
    download is refused with the codec's error before anything is decoded; the next download
    from the same peer is good."""
    async def test(peer, ctx, address):
        plane = peer.dataplane
        honest_serve = plane._serve
        spoiled = {"left": 1}

        async def serve(reader, writer):
            if not spoiled["left"]:
                return await honest_serve(reader, writer)
            spoiled["left"] = 0
            hello = await reader.readexactly(len(dataplane.MAGIC) + dataplane.TICKET_BYTES)
            offer = plane._take(hello[len(dataplane.MAGIC):])
            writer.write(struct.pack(">Q", len(offer.view)) + spoil(offer.view))
            await writer.drain()
            writer.close()

        plane._server.close()  # listen again with the spoiling handler, same port
        await plane._server.wait_closed()
        plane._server = await asyncio.start_server(serve, "127.0.0.1", plane.port)
        with pytest.raises(error, match=message):
            await download(ctx, address)
        assert address not in transfer._IN_BAND_ONLY  # refused, not taken for unreachable
        header, arrays = await download(ctx, address)  # the same peer serves the next one
        assert dataplane.is_dataplane(header) and arrays

    scenario(test)


def test_in_band_when_the_receiver_does_not_ask_or_the_state_is_small(monkeypatch) -> None:
    async def test(peer, ctx, address):
        stub = pbg.StateStub(ctx.channel(address))
        call = stub.Download(pb.StateRequest(stage=1, include_optimizer=True))  # an old receiver
        chunks = [c async for c in call]
        assert len(chunks) > 1 and not dataplane.is_dataplane(chunks[0].header)
        assert chunks[0].header.digest == ""  # SHA-256 tree, which an old receiver checks
        header, arrays = await tensor_stream.receive(_replay(chunks), ctx.state_limits())
        assert header.meta["state_hash"] == peer.host.state_hash() and arrays
        monkeypatch.setattr(state_service, "STATE_DATAPLANE_MIN_BYTES", 1 << 40)
        header, _ = await download(ctx, address)  # asks, but the state is below the threshold
        assert not dataplane.is_dataplane(header) and header.digest == ""
        assert peer.dataplane.served == 0

    scenario(test)


async def _replay(chunks):
    for c in chunks:
        yield c


def test_an_unreachable_data_plane_falls_back_in_band_for_that_peer() -> None:
    async def test(peer, ctx, address):
        await peer.dataplane.close()  # a firewall, a relayed peer: nothing listens there
        header, arrays = await download(ctx, address)
        assert not dataplane.is_dataplane(header) and arrays
        assert address in transfer._IN_BAND_ONLY
        header, _ = await download(ctx, address)  # asked in-band from now on
        assert not dataplane.is_dataplane(header)

    scenario(test)


def test_the_data_plane_over_mtls(monkeypatch) -> None:
    async def test(peer, ctx, address):
        assert peer.dataplane.ssl_context is not None
        header, arrays = await download(ctx, address)
        assert dataplane.is_dataplane(header) and header.digest == digest.BLAKE3
        assert peer.dataplane.served == 1 and arrays
        # the callee's leaf must name the peer id the caller expects
        with pytest.raises(dataplane.DataPlaneError):
            await dataplane.fetch_async(
                await _pointer(ctx, address), ctx.state_limits(),
                ssl_context=dataplane.peer_client_context(
                    ctx.client.tls().ca_pem, ctx.client.tls().cert_pem,
                    ctx.client.tls().key_pem),
                server_hostname="0000000000000bad", dial_host="127.0.0.1")
        # a plaintext client is refused by the TLS listener (no payload leaves in the clear)
        with pytest.raises(dataplane.DataPlaneError):
            await dataplane.fetch_async(await _pointer(ctx, address), ctx.state_limits(),
                                        timeout=5.0)
        assert peer.dataplane.served == 1

    scenario(test, tls=True, monkeypatch=monkeypatch)


async def _pointer(ctx, address) -> pb.CallHeader:
    stub = pbg.StateStub(ctx.channel(address))
    call = stub.Download(pb.StateRequest(stage=1, accept_dataplane=True,
                                         accept_digests=[digest.BLAKE3]))
    chunks = [c async for c in call]
    assert len(chunks) == 1 and dataplane.is_dataplane(chunks[0].header)
    return chunks[0].header


@pytest.mark.parametrize("alg", [digest.BLAKE3, digest.SHA256_TREE])
def test_the_senders_snapshot_encoding_is_codec_encode_byte_for_byte(alg) -> None:
    rng = np.random.default_rng(3)
    grid = rng.standard_normal((64, 48)).astype(np.float32)
    arrays = {
        "model.w": grid.T,  # strided: copied straight into the payload
        "model.b": rng.standard_normal(48).astype(np.float32),
        "mode.steps": np.array(7, np.int64),  # 0-d
        "mode.mask": rng.random(33) > 0.5,
        "mode.bits": rng.integers(0, 65535, 17, dtype=np.uint16),
        "mode.empty": np.zeros((0, 5), np.float64),
    }
    fast, slow = state_service.encode_state(arrays, alg), codec.encode(arrays, pb.RAW, digest=alg)
    assert fast.tensors == slow.tensors and fast.alg == slow.alg == alg
    assert bytes(fast.payload) == slow.payload and bytes(fast.sha256) == bytes(slow.sha256)
    header = codec.fill_header(pb.CallHeader(), fast)
    out = codec.decode(header, fast.payload, codec.Limits())
    np.testing.assert_array_equal(out["model.w"], grid.T)
    big_endian = {"w": np.arange(4, dtype=">f4")}  # not the codec's storage: codec.encode's
    fast, slow = state_service.encode_state(big_endian, alg), codec.encode(big_endian, digest=alg)
    assert fast.tensors == slow.tensors and bytes(fast.payload) == slow.payload


@pytest.mark.parametrize("alg", [digest.BLAKE3, digest.SHA256_TREE])
def test_a_snapshot_copied_in_pieces_into_a_kept_buffer_is_codec_encode(alg, monkeypatch
                                                                        ) -> None:
    """The copy goes in pieces (the hash follows it on another thread) into a kept buffer whose
    old bytes are overwritten: the same payload and digest as codec.encode."""
    monkeypatch.setattr(state_service, "SNAPSHOT_PIECE", 4096)
    rng = np.random.default_rng(5)
    arrays = {"model.a": rng.standard_normal(10_000).astype(np.float32),  # 10 pieces
              "model.t": rng.standard_normal((40, 30)).astype(np.float32).T,  # strided, whole
              "model.b": rng.standard_normal(3000).astype(np.float64)}
    slow = codec.encode(arrays, pb.RAW, digest=alg)
    buffers = snapshot.SnapshotBuffers()
    try:
        stale, _ = buffers.take(slow.total_bytes)
        stale[:] = 0xAB  # an earlier snapshot's bytes
        buffers.give_back(stale)
        fast = state_service.encode_state(arrays, alg, buffers)
        assert fast.payload is stale and buffers.holds(fast.payload)
        assert bytes(fast.payload) == slow.payload and bytes(fast.sha256) == bytes(slow.sha256)
        buffers.give_back(fast.payload)
        odd = {"w": np.arange(4, dtype=">f4")}  # codec.encode's: no buffer is taken
        assert bytes(state_service.encode_state(odd, alg, buffers).payload) == \
            codec.encode(odd, digest=alg).payload
        assert buffers.held == 0
    finally:
        buffers.close()


class RecordedBuffers(snapshot.SnapshotBuffers):
    made: ClassVar[list[snapshot.SnapshotBuffers]] = []

    def __init__(self) -> None:
        super().__init__()
        RecordedBuffers.made.append(self)


def test_a_snapshot_being_sent_is_never_overwritten_and_buffers_are_reused(monkeypatch
                                                                           ) -> None:
    """Two downloads whose tickets are not fetched yet hold two buffers; the state changes
    between them: each receiver gets the state as it was at its own call. Once both are sent
    the buffers are free, and the next download reuses one instead of faulting in another."""
    RecordedBuffers.made = []
    monkeypatch.setattr(state_service, "SnapshotBuffers", RecordedBuffers)

    async def test(peer, ctx, address):
        (buffers,) = RecordedBuffers.made
        before = {k: v.copy() for k, v in peer.host.state_arrays(False).items()}
        first = await _pointer(ctx, address)
        with torch.no_grad():
            next(iter(peer.host.params().values())).add_(1.0)
        after = {k: v.copy() for k, v in peer.host.state_arrays(False).items()}
        second = await _pointer(ctx, address)
        assert buffers.held == 2 and buffers.fresh == 2  # the first is still waiting
        for pointer, expected in ((second, after), (first, before)):
            got = await dataplane.fetch_async(pointer, ctx.state_limits(),
                                              dial_host="127.0.0.1")
            assert got.keys() == expected.keys()
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name])
        assert buffers.held == 0 and buffers.idle_bytes == 2 * first.total_bytes
        _, arrays = await download(ctx, address)
        np.testing.assert_array_equal(arrays[next(iter(after))], after[next(iter(after))])
        assert (buffers.fresh, buffers.reused, buffers.held) == (2, 1, 0)

    scenario(test)


def test_a_snapshot_comes_back_when_its_ticket_expires_or_the_plane_is_full(monkeypatch
                                                                            ) -> None:
    RecordedBuffers.made = []
    monkeypatch.setattr(state_service, "SnapshotBuffers", RecordedBuffers)

    async def test(peer, ctx, address):
        (buffers,) = RecordedBuffers.made
        peer.dataplane.ticket_ttl = 0.1
        await _pointer(ctx, address)  # never fetched
        assert buffers.held == 1
        for _ in range(100):  # the expiry timer gives it back, no other call needed
            if not buffers.held:
                break
            await asyncio.sleep(0.02)
        assert buffers.held == 0
        peer.dataplane.max_tickets = 0  # full: the answer goes in-band, the buffer comes back
        header, arrays = await download(ctx, address)
        assert not dataplane.is_dataplane(header) and arrays and buffers.held == 0

    scenario(test)


def test_a_download_cancelled_during_its_snapshot_gives_the_buffer_back(monkeypatch) -> None:
    """The receiver gives up (its deadline) while the snapshot is still being copied: the
    buffer is given back when the copy ends, not held for ever."""
    RecordedBuffers.made = []
    monkeypatch.setattr(state_service, "SnapshotBuffers", RecordedBuffers)
    real = state_service.encode_state
    copying = threading.Event()

    def slow(arrays, alg, buffers=None):
        copying.set()
        time.sleep(0.5)
        return real(arrays, alg, buffers)

    monkeypatch.setattr(state_service, "encode_state", slow)

    async def test(peer, ctx, address):
        (buffers,) = RecordedBuffers.made
        stub = pbg.StateStub(ctx.channel(address))
        call = stub.Download(pb.StateRequest(stage=1, accept_dataplane=True,
                                             accept_digests=[digest.BLAKE3]), timeout=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [c async for c in call]
        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and copying.is_set()
        for _ in range(100):
            if buffers.fresh and not buffers.held:
                break
            await asyncio.sleep(0.02)
        assert (buffers.fresh, buffers.held, peer.dataplane.outstanding) == (1, 0, 0)
        header, arrays = await download(ctx, address)  # and the next one reuses it
        assert dataplane.is_dataplane(header) and arrays and buffers.reused == 1

    scenario(test)
