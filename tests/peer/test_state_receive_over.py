"""`receive_state_over` (peer/recovery/transfer.py): a state download without a PeerContext, as
`shoal export` makes it: a signed peer_channel made by hand, the caller's own leaf (or none), a
byte counter and limits. Against the real serve() and a DataPlaneServer (bench/transport.py's
ProductPeer) on 127.0.0.1, plaintext and mTLS (SHOAL_TLS_ON_LOOPBACK=1).

Checked: the payload comes over the data plane (with mTLS exactly when the channel is mTLS) and
equals what an in-band download of the same state gives; a data plane that cannot be reached
falls back in-band with the same arrays.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from bench import transport as harness
from peer.pipeline import wire
from peer.recovery import transfer
from protocols import auth, dataplane, digest, tensor_stream, tls
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from tests.peer.test_state_dataplane import (  # noqa: F401 - autouse here too
    small_states_over_the_data_plane,
)

ARRAYS = {"model.w": np.arange(4096, dtype=np.float32).reshape(64, 64) / 7,
          "model.b": np.linspace(-1, 1, 64, dtype=np.float32)}


def scenario(test, *, mtls: bool, monkeypatch):
    """Run `test(peer, channel, address, own_tls)` against a serving peer holding ARRAYS."""
    receiver = harness.identity_of(harness.RECEIVER_SEED)
    if mtls:  # the leaf names the identity that signs the calls, as one issued at join does
        monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")
        server_leaf, own = harness.bench_certificates(receiver.peer_id)
    else:
        server_leaf = own = None
    coordinator = harness.identity_of(harness.COORDINATOR_SEED)
    certificate = harness.receiver_certificate(coordinator, receiver)

    async def main():
        peer = harness.ProductPeer(ARRAYS, server_leaf, coordinator.public_key)
        port = await peer.start()
        address = f"127.0.0.1:{port}"
        channel = tls.peer_channel(address, harness.SERVER_ID, own,
                                   interceptors=auth.client_interceptors(
                                       auth.CallSigner(receiver, lambda: certificate)))
        try:
            return await asyncio.wait_for(test(peer, channel, address, own), 60)
        finally:
            await channel.close()
            await peer.stop()

    return asyncio.run(main())


async def download(channel, address, own, counter=None):
    return await transfer.receive_state_over(
        channel, address, harness.SERVER_ID, pb.StateRequest(stage=1), own_tls=own,
        counter=counter or wire.ByteCounter(), limits=wire.limits_for(1 << 30))


async def in_band(channel) -> dict:
    call = pbg.StateStub(channel).Download(pb.StateRequest(stage=1))  # does not ask
    _, arrays = await tensor_stream.receive(call.__aiter__(), wire.limits_for(1 << 30))
    return arrays


def same(a: dict, b: dict) -> None:
    assert set(a) == set(b) == set(ARRAYS)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("mtls", [False, True], ids=["plaintext", "mtls"])
def test_over_the_data_plane_without_a_peer_context(mtls, monkeypatch, caplog) -> None:
    async def test(peer, channel, address, own):
        counter = wire.ByteCounter()
        with caplog.at_level(logging.INFO, "shoal.peer"):
            header, arrays = await download(channel, address, own, counter)
        assert dataplane.is_dataplane(header) and header.digest == digest.BLAKE3
        assert peer.dataplane.served == 1
        assert (peer.dataplane.ssl_context is not None) == mtls
        assert counter.received["state"] >= header.total_bytes
        assert f"over the data plane ({'mTLS' if mtls else 'plaintext'}, blake3" in caplog.text
        same(arrays, await in_band(channel))
        assert peer.dataplane.served == 1  # the in-band reference did not use it

    scenario(test, mtls=mtls, monkeypatch=monkeypatch)


@pytest.mark.parametrize("mtls", [False, True], ids=["plaintext", "mtls"])
def test_an_unreachable_data_plane_falls_back_in_band(mtls, monkeypatch) -> None:
    async def test(peer, channel, address, own):
        await peer.dataplane.close()  # nothing listens there: a firewall that rejects
        header, arrays = await download(channel, address, own)
        assert not dataplane.is_dataplane(header)
        assert address in transfer._IN_BAND_ONLY
        same(arrays, await in_band(channel))

    scenario(test, mtls=mtls, monkeypatch=monkeypatch)
