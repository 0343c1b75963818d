"""The payload digest: SHA-256 over the SHA-256 of each 1 MiB leaf (`CallHeader.sha256`).

Why a tree and not one SHA-256 over the payload: one SHA-256 stream is serial, and a single core
hashes only ~1.5 GB/s (SHA-NI) while loopback TCP delivers ~2.4 GB/s, so a flat digest made the
receiver's check the bottleneck of every bulk download. Leaves can be hashed on several threads
(hashlib releases the GIL), in any order, while later bytes are still arriving.

Definition (version 1; every sender and receiver of the codec uses it, for every payload):

    n       = len(payload) in bytes,  L = LEAF_BYTES = 1 MiB (2**20)
    leaf_i  = SHA-256(payload[i*L : min(n, (i+1)*L)])        for i = 0 .. ceil(n/L) - 1
    digest  = SHA-256(DOMAIN || uint64_be(n) || uint32_be(L) || leaf_0 || leaf_1 || ...)

with DOMAIN = b"shoal/payload-sha256-tree/v1\\0". An empty payload has no leaves. Every payload
byte is covered by exactly one leaf; binding n and L into the root means truncating, extending or
re-chunking a payload changes the digest, so the integrity a flat SHA-256 gave (find a second
payload with the same digest only by breaking SHA-256) is kept. The digest is what the header
carries; only the root travels, and a receiver compares it after hashing what it received.

`payload_digest` hashes a whole buffer (in parallel when big); `TreeHasher` hashes a stream of
arbitrary-sized parts in order (the in-band gRPC path); `LeafPool` hashes leaves of a buffer that
is being filled, on worker threads, as each leaf completes (the data plane).

Algorithms (`CallHeader.digest`, a versioned choice; receivers refuse a name they do not know):

    "" or SHA256_TREE ("sha256-tree/v1")  the tree above; every sender before the field existed
    BLAKE3 ("blake3")                     BLAKE3-256 of the payload (standard BLAKE3, unkeyed;
                                          its own tree of 1 KiB chunks binds the length)

Why BLAKE3 for bulk transfers: measured here (256 MiB in memory, load ~2 on 2 cores) one core
hashes 4.7 GB/s with BLAKE3 against 1.76 GB/s with SHA-256 (SHA-NI), and fed in order in 4 MiB
pieces as bytes land it still runs 4.6 GB/s; its multithreaded update gained nothing on this
2-core machine. It is a hash built for this (verified streaming), and a receive-while-landing
check that takes ~0.06 s of one core per 256 MiB instead of ~0.15 s. A sender uses it only
toward a receiver that said it accepts it (StateRequest.accept_digests); SHA-256 tree stays
the default and stays accepted. `payload_digest(view, alg=...)`, `Blake3Stream` (the
receive-while-landing hasher, LeafPool's interface) and `stream_for(alg, view)` choose by name;
a digest computed by them is a `Digest` (bytes that know their algorithm), so `codec.decode`
never compares digests of two different algorithms.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import blake3

LEAF_BYTES = 1 << 20
SHA256_TREE = "sha256-tree/v1"
BLAKE3 = "blake3"
ALGORITHMS = (SHA256_TREE, BLAKE3)
BLAKE3_PIECE = 4 << 20  # bytes per in-order update of the receive-while-landing hasher (measured)
DOMAIN = b"shoal/payload-sha256-tree/v1\0"
_ROOT_PREFIX = struct.Struct(">QI")
PARALLEL_MIN_BYTES = 16 << 20  # below this one thread is faster than handing work to others
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


def leaf_count(n: int) -> int:
    return -(-n // LEAF_BYTES)


def root(n: int, leaves: list[bytes]) -> bytes:
    """The digest of an `n`-byte payload whose leaf digests, in order, are `leaves`."""
    if len(leaves) != leaf_count(n):
        raise ValueError(f"{len(leaves)} leaf digests for {n} bytes; need {leaf_count(n)}")
    sha = hashlib.sha256(DOMAIN)
    sha.update(_ROOT_PREFIX.pack(n, LEAF_BYTES))
    sha.update(b"".join(leaves))
    return sha.digest()


def _leaf(view: memoryview, index: int) -> bytes:
    return hashlib.sha256(view[index * LEAF_BYTES: (index + 1) * LEAF_BYTES]).digest()


def _leaves(view: memoryview, first: int, stop: int) -> list[bytes]:
    return [_leaf(view, i) for i in range(first, stop)]


class Digest(bytes):
    """A digest that knows its algorithm (plain bytes from this module are SHA256_TREE)."""

    alg: str = SHA256_TREE

    def __new__(cls, value: bytes, alg: str) -> Digest:
        out = super().__new__(cls, value)
        out.alg = alg
        return out


def algorithm_of(digest: bytes) -> str:
    return getattr(digest, "alg", SHA256_TREE)


class UnknownDigest(ValueError):
    """A header names a digest algorithm this receiver does not know."""


def check_algorithm(name: str) -> str:
    """The algorithm a header's `digest` field names ("" is SHA256_TREE); UnknownDigest if none."""
    alg = name or SHA256_TREE
    if alg not in ALGORITHMS:
        raise UnknownDigest(f"payload digest algorithm {name[:40]!r} is unknown to this receiver "
                            f"(it checks {', '.join(ALGORITHMS)}): upgrade it, or have the sender "
                            f"use {SHA256_TREE}")
    return alg


def blake3_digest(payload: bytes | bytearray | memoryview) -> Digest:
    return Digest(blake3.blake3(memoryview(payload).cast("B")).digest(), BLAKE3)


def payload_digest(payload: bytes | bytearray | memoryview, threads: int = HASH_THREADS,
                   alg: str = SHA256_TREE) -> bytes:
    """The digest of a complete payload under `alg`; SHA-256 tree leaves are split over `threads`
    threads when it is big."""
    if check_algorithm(alg) == BLAKE3:
        return blake3_digest(payload)
    view = memoryview(payload).cast("B")
    n, count = len(view), leaf_count(len(view))
    if threads <= 1 or n < PARALLEL_MIN_BYTES:
        return root(n, _leaves(view, 0, count))
    bounds = [count * k // threads for k in range(threads + 1)]
    with ThreadPoolExecutor(threads, thread_name_prefix="sha256-leaf") as pool:
        parts = [pool.submit(_leaves, view, a, b) for a, b in itertools.pairwise(bounds)]
        return root(n, [leaf for part in parts for leaf in part.result()])


class TreeHasher:
    """Incremental digest of a payload that arrives in order, in parts of any size."""

    def __init__(self) -> None:
        self._leaves: list[bytes] = []
        self._leaf = hashlib.sha256()
        self._in_leaf = 0
        self._total = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(LEAF_BYTES - self._in_leaf, len(view))
            self._leaf.update(view[:take])
            self._in_leaf += take
            self._total += take
            view = view[take:]
            if self._in_leaf == LEAF_BYTES:
                self._leaves.append(self._leaf.digest())
                self._leaf, self._in_leaf = hashlib.sha256(), 0

    def digest(self) -> bytes:
        """The digest of everything passed to `update` (call once, at the end)."""
        leaves = self._leaves + ([self._leaf.digest()] if self._in_leaf else [])
        return root(self._total, leaves)


class _Filling:
    """What LeafPool and Blake3Stream share: a buffer filled front to back, and other checks of
    the arriving bytes (FiniteScan) run beside the hash: `watch(fn)` has `fn(k)` called on
    every `filled(k)`, `submit` runs a job on this object's `threads` workers, and the digest
    waits for those jobs too. `close()` (also on error) stops the workers."""

    def __init__(self, buffer: memoryview, threads: int, name: str) -> None:
        self._view = buffer.cast("B") if buffer.format != "B" else buffer
        self._n = len(self._view)
        self._extra: list[Future[Any]] = []
        self._watchers: list[Callable[[int], None]] = []
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)

    def _notify(self, upto: int) -> None:
        for watcher in self._watchers:
            watcher(upto)

    def watch(self, watcher: Callable[[int], None]) -> None:
        self._watchers.append(watcher)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        job = self._pool.submit(fn, *args)
        self._extra.append(job)
        return job

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LeafPool(_Filling):
    """Hashes the leaves of a buffer while it is being filled front to back.

    Call `filled(k)` whenever the first k bytes are final; each leaf that became complete is
    handed to a worker thread at once (the last, short leaf once k reaches the end). `digest()`
    waits for the workers and returns the payload digest; `close()` (also on error) stops them.
    The buffer must not change after `filled` covered it. Other checks share the workers
    (`_Filling`).
    """

    def __init__(self, buffer: memoryview, threads: int = HASH_THREADS) -> None:
        super().__init__(buffer, threads, "sha256-leaf")
        self._count = leaf_count(self._n)
        self._next = 0
        self._jobs: list[Future[bytes]] = []

    def filled(self, upto: int) -> None:
        complete = self._count if upto >= self._n else upto // LEAF_BYTES
        while self._next < complete:
            self._jobs.append(self._pool.submit(_leaf, self._view, self._next))
            self._next += 1
        self._notify(upto)

    def digest(self) -> bytes:
        if self._next != self._count:
            raise ValueError(f"only {self._next} of {self._count} leaves were filled")
        try:
            futures.wait(self._extra)
            return root(self._n, [job.result() for job in self._jobs])
        finally:
            self.close()


class Blake3Stream(_Filling):
    """BLAKE3 of a buffer while it is being filled front to back: LeafPool's interface.

    `filled(k)` hands each newly final stretch of at least BLAKE3_PIECE bytes (the rest at the
    end) to one hashing thread, in order (BLAKE3 releases the GIL); other checks of the arriving
    bytes get their own `threads` workers (`_Filling`), so they do not hold up the hash.
    `digest()` waits for all of it; `close()` (also on error) stops the threads.
    """

    def __init__(self, buffer: memoryview, threads: int = 1) -> None:
        super().__init__(buffer, threads, "blake3-check")
        self._hasher = blake3.blake3()
        self._sent = 0
        self._hash = ThreadPoolExecutor(1, thread_name_prefix="blake3")
        self._jobs: list[Future[Any]] = []

    def filled(self, upto: int) -> None:
        upto = min(upto, self._n)
        if upto - self._sent >= BLAKE3_PIECE or (upto == self._n and upto > self._sent):
            self._jobs.append(self._hash.submit(self._hasher.update,
                                                self._view[self._sent: upto]))
            self._sent = upto
        self._notify(upto)

    def digest(self) -> Digest:
        if self._sent != self._n:
            raise ValueError(f"only {self._sent} of {self._n} bytes were filled")
        try:
            futures.wait(self._extra)
            for job in self._jobs:
                job.result()
            return Digest(self._hasher.digest(), BLAKE3)
        finally:
            self.close()

    def close(self) -> None:
        self._hash.shutdown(wait=True, cancel_futures=True)
        super().close()


def stream_for(alg: str, buffer: memoryview, threads: int = HASH_THREADS
               ) -> LeafPool | Blake3Stream:
    """The receive-while-landing hasher of `alg` for `buffer` (see LeafPool, Blake3Stream)."""
    if check_algorithm(alg) == BLAKE3:
        return Blake3Stream(buffer, threads)
    return LeafPool(buffer, threads)


__all__ = ["ALGORITHMS", "BLAKE3", "DOMAIN", "LEAF_BYTES", "SHA256_TREE", "Blake3Stream", "Digest",
           "LeafPool", "TreeHasher", "UnknownDigest", "algorithm_of", "blake3_digest",
           "check_algorithm", "leaf_count", "payload_digest", "root", "stream_for"]
