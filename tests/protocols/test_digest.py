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
