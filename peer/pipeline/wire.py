"""Tensors between peers: torch <-> the codec's numpy arrays, tensor calls over grpc.aio, and the
byte counters behind every figure Shoal reports about the wire.

Bytes are counted here, at the transport edge, as the serialized size of every TensorChunk sent or
received (header and payload), per kind ("activations", "sync:allreduce", "state", ...). Nothing
upstream estimates sizes.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from protocols import codec, tensor_stream
from protocols import shoal_pb2 as pb
from protocols.encodings import CODECS, DEFAULT_BLOCK_SIZE
from protocols.runspec import RunSpec
from protocols.tls import PeerTls, peer_channel

ACTIVATION_ENCODINGS = {
    "fp32": pb.RAW,
    "bf16": pb.BF16,
    "int8": pb.INT8_BLOCKWISE,
    "fp8": pb.FP8_E4M3,
}
CHUNK_BYTES = 2 * 1024 * 1024


@dataclass
class ByteCounter:
    """Bytes on the wire by kind; thread-safe (the compute thread never touches it, but the
    data plane may run on its own thread)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            if sent:
                self.sent[kind] += sent
            if received:
                self.received[kind] += received

    def total_sent(self) -> int:
        return sum(self.sent.values())

    def total_received(self) -> int:
        return sum(self.received.values())

    def by_kind(self) -> dict[str, int]:
        """Bytes *sent* by kind: summed over peers, each byte on the wire counts once."""
        with self._lock:
            return {k: self.sent[k] for k in sorted(self.sent)}


def to_arrays(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        out[name] = t.contiguous().numpy()
    return out


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in arrays.items()}


def encode_chunks(
    header: pb.CallHeader,
    arrays: Mapping[str, np.ndarray],
    encoding: int | Mapping[str, int] = pb.RAW,
) -> list[pb.TensorChunk]:
    """The whole message as chunks: header first, then the payload in <= CHUNK_BYTES pieces."""
    enc = codec.encode(arrays, encoding)
    codec.fill_header(header, enc)
    return list(tensor_stream.chunks(header, enc.payload, CHUNK_BYTES))


def chunk_bytes(chunks: Iterable[pb.TensorChunk]) -> int:
    return sum(c.ByteSize() for c in chunks)


async def counted(
    it: AsyncIterator[pb.TensorChunk], counter: ByteCounter, kind: str
) -> AsyncIterator[pb.TensorChunk]:
    async for chunk in it:
        counter.add(kind, received=chunk.ByteSize())
        yield chunk


async def receive(
    it: AsyncIterator[pb.TensorChunk], limits: codec.Limits, counter: ByteCounter, kind: str
) -> tuple[pb.CallHeader, dict[str, np.ndarray]]:
    return await tensor_stream.receive(counted(it, counter, kind), limits)


def send_iter(chunks: list[pb.TensorChunk], counter: ByteCounter, kind: str
              ) -> Iterator[pb.TensorChunk]:
    for c in chunks:
        counter.add(kind, sent=c.ByteSize())
        yield c


async def call_tensors(
    method,  # a grpc.aio stream-stream multicallable
    header: pb.CallHeader,
    arrays: Mapping[str, np.ndarray],
    *,
    encoding: int | Mapping[str, int],
    limits: codec.Limits,
    counter: ByteCounter,
    kind: str,
    timeout: float,
) -> tuple[pb.CallHeader, dict[str, np.ndarray]]:
    """One tensor call: send header + payload, receive the reply's header + tensors."""
    chunks = encode_chunks(header, arrays, encoding)
    call = method(send_iter(chunks, counter, kind), timeout=timeout)
    return await receive(call.__aiter__(), limits, counter, kind)


def limits_for(max_bytes: int, check_finite: bool = True) -> codec.Limits:
    return codec.Limits(max_total_bytes=max_bytes, max_tensors=4096, check_finite=check_finite)


def activation_limits(spec: RunSpec) -> codec.Limits:
    """One activation or gradient message of a run: a few microbatches' worth, with slack."""
    m, p = spec.model, spec.pipeline
    return limits_for(4 * p.target_batch * m.seq_len * m.d_model * 4 + 4096)


def activation_bytes(spec: RunSpec) -> int:
    """Payload bytes of one microbatch's activation (or its gradient) in the run's encoding."""
    m = spec.model
    numel = spec.pipeline.microbatch * m.seq_len * m.d_model
    enc = ACTIVATION_ENCODINGS[spec.pipeline.activations]
    return CODECS[enc].payload_bytes("float32", numel, DEFAULT_BLOCK_SIZE)


def sync_limits(n_params: int) -> codec.Limits:
    """One sync round's message for a stage of `n_params` parameters (dense fp32 and slack)."""
    return limits_for(8 * n_params + (1 << 20))


def state_limits(spec: RunSpec) -> codec.Limits:
    """One stage state download of a run (weights, optimizer state, mode state)."""
    return limits_for(64 * spec.model.d_model ** 2 * spec.model.n_layers * 16 + (64 << 20))


class Channels:
    """This peer's gRPC channels to other peers, one per (address, peer id), made with the client
    interceptors `interceptors()` gives (protocols.auth: each call signed) by
    protocols.tls.peer_channel: mTLS with this peer's leaf (`tls()`) to the peer `peer_of(address)`
    names, unless the link is loopback or the peer runs --plaintext (tls() None). Event loop
    only."""

    def __init__(self, interceptors: Callable[[], list],
                 tls: Callable[[], PeerTls | None] = lambda: None,
                 peer_of: Callable[[str], str] = lambda address: "") -> None:
        self._interceptors = interceptors
        self._tls = tls
        self._peer_of = peer_of
        self._by_address: dict[tuple[str, str], grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        key = (address, self._peer_of(address))  # a new peer at an old address: a new channel
        ch = self._by_address.get(key)
        if ch is None:
            ch = peer_channel(address, key[1], self._tls(), options=tensor_stream.grpc_options(),
                              interceptors=self._interceptors())
            self._by_address[key] = ch
        return ch

    async def close(self) -> None:
        for ch in self._by_address.values():
            await ch.close()

