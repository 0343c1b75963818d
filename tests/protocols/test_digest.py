"""The payload digest (protocols/digest.py): every way of computing it agrees with its written
definition, at leaf boundaries and on many threads, and it changes when bytes, their order or
the length change."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from protocols import digest
from protocols.digest import LEAF_BYTES, LeafPool, TreeHasher, payload_digest

L = LEAF_BYTES
SIZES = [0, 1, L - 1, L, L + 1, 3 * L + 5, digest.PARALLEL_MIN_BYTES + 3]


def spec(payload: bytes) -> bytes:
    leaves = b"".join(hashlib.sha256(payload[i: i + L]).digest() for i in range(0, len(payload), L))
    return hashlib.sha256(b"shoal/payload-sha256-tree/v1\0" + len(payload).to_bytes(8, "big")
                          + L.to_bytes(4, "big") + leaves).digest()


def payload_of(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("n", SIZES)
def test_every_hasher_matches_the_definition(n: int) -> None:
    payload = payload_of(n)
    want = spec(payload)
    assert payload_digest(payload, threads=1) == want
    assert payload_digest(payload, threads=3) == want
    streamed = TreeHasher()
    rng, at = np.random.default_rng(1), 0
    while at < n:  # parts of random size, straddling leaves
        step = int(rng.integers(1, 3 * L))
        streamed.update(payload[at: at + step])
        at += step
    assert streamed.digest() == want
    buffer = bytearray(payload)
    pool = LeafPool(memoryview(buffer), threads=2)
    for upto in [*range(0, n, 300_001), n]:
        pool.filled(upto)
    assert pool.digest() == want


def test_digest_binds_bytes_order_and_length() -> None:
    payload = payload_of(2 * L)
    swapped = payload[L:] + payload[:L]
    flipped = bytearray(payload)
    flipped[L + 7] ^= 0x10
    digests = {payload_digest(p) for p in (payload, swapped, bytes(flipped), payload + b"\0",
                                           payload[:-1])}
    assert len(digests) == 5
    assert payload_digest(payload) != hashlib.sha256(payload).digest()  # not a flat SHA-256


def test_leaf_pool_refuses_an_unfilled_buffer_and_stops_its_threads() -> None:
    before = threading.active_count()
    pool = LeafPool(memoryview(bytearray(3 * L)), threads=2)
    pool.filled(L + 5)  # one leaf complete
    with pytest.raises(ValueError, match="only 1 of 3 leaves"):
        pool.digest()
    pool.close()
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="leaf digests"):
        digest.root(L + 1, [b"\0" * 32])


# ------------------------------------------------------------------ BLAKE3 (CallHeader.digest)

B3_SIZES = [0, 1, digest.BLAKE3_PIECE - 1, digest.BLAKE3_PIECE, 2 * digest.BLAKE3_PIECE + 7]


@pytest.mark.parametrize("n", B3_SIZES)
def test_blake3_stream_is_standard_blake3_whatever_the_fill_pattern(n: int) -> None:
    import blake3

    payload = payload_of(n)
    expected = blake3.blake3(payload).digest()  # the reference implementation, unkeyed
    assert payload_digest(payload, alg=digest.BLAKE3) == expected
    for step in (1 << 16, 3 * (1 << 20) + 1, max(n, 1)):
        buffer = np.frombuffer(payload, np.uint8).copy()
        stream = digest.stream_for(digest.BLAKE3, memoryview(buffer))
        seen: list[int] = []
        stream.watch(seen.append)
        for upto in range(step, n + step, step):
            stream.filled(min(upto, n))
        if n == 0:
            stream.filled(0)
        got = stream.digest()
        assert got == expected and got.alg == digest.BLAKE3 and digest.algorithm_of(got) == "blake3"
        assert not n or seen[-1] == n


def test_blake3_stream_refuses_an_unfilled_buffer() -> None:
    stream = digest.Blake3Stream(memoryview(bytearray(10)))
    stream.filled(4)
    with pytest.raises(ValueError, match="of 10 bytes were filled"):
        stream.digest()
    stream.close()


def test_algorithms_are_named_and_unknown_ones_refused() -> None:
    assert digest.check_algorithm("") == digest.SHA256_TREE
    assert digest.algorithm_of(payload_digest(b"x")) == digest.SHA256_TREE
    assert payload_digest(b"x", alg=digest.BLAKE3) != payload_digest(b"x")
    with pytest.raises(digest.UnknownDigest, match=r"'sha3' is unknown.*upgrade it"):
        digest.check_algorithm("sha3")


def test_codec_checks_the_algorithm_the_header_names() -> None:
    """A header names its digest; a digest computed under another algorithm is not compared
    (the payload is hashed again), so an in-band BLAKE3 payload decodes and a flipped one is
    refused as a BLAKE3 mismatch; an unknown name is refused at the header."""
    from protocols import codec
    from protocols import shoal_pb2 as pb

    arrays = {"w": np.arange(1000, dtype=np.float32)}
    enc = codec.encode(arrays, digest=digest.BLAKE3)
    header = codec.fill_header(pb.CallHeader(), enc)
    assert header.digest == "blake3" and enc.alg == digest.BLAKE3
    assert codec.fill_header(pb.CallHeader(), codec.encode(arrays)).digest == ""  # as before
    sha = payload_digest(enc.payload)  # what an in-band receiver's TreeHasher computes
    out = codec.decode(header, enc.payload, codec.Limits(), computed_sha256=sha)
    np.testing.assert_array_equal(out["w"], arrays["w"])
    bad = bytearray(enc.payload)
    bad[17] ^= 1
    with pytest.raises(codec.DigestMismatch, match="BLAKE3"):
        codec.decode(header, bytes(bad), codec.Limits())
    header.digest = "crc32"
    with pytest.raises(codec.MislabeledPayload, match="'crc32' is unknown"):
        codec.decode(header, enc.payload, codec.Limits())
