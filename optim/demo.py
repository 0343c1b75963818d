"""DeMo (Peng, Quesnelle, Kingma 2024): decoupled momentum, sparse DCT exchange, sign-SGD step.

One optimizer step of a stage's replicas, in three phases (ALGORITHMS.md §5):

1. `DemoState.compress(params, grads)`, local: p <- p*(1 - lr*wd); delta <- beta*delta + lr*grad;
   chunked orthonormal DCT-II of delta; keep the top-k coefficients of each chunk; subtract the
   inverse DCT of exactly what is sent from delta (error feedback). Returns one `DemoPacket` per
   parameter.
2. `aggregate(packets_by_replica, shapes, config)`, identical on every replica: each coefficient
   is averaged over the replicas that chose that index (not sum / W), then inverse-DCT'd. With
   a robust `method` ("trimmed_mean" / "clipped_mean", `sync.demo.aggregator`) each replica's
   packets are instead decoded on their own (inverse DCT of its kept coefficients, zeros
   elsewhere: that replica's update in parameter space) and the decodes are combined by
   `optim.robust.aggregate`, so one replica cannot set the sign of a weight alone.
3. `apply(params, aggregated, lr)`: p <- p - lr*sign(result). sign(0) is 0: a weight whose decoded
   result is exactly zero does not move.

Chunking: a tensor is viewed as 2-D [rows, cols] (1-D and 0-D as [1, n]; ndim > 2 as
[prod(shape[:-1]), shape[-1]]); each axis is cut into runs whose length is the largest divisor of
that axis that is <= `chunk` (the axis itself when it is <= `chunk`). A 1-D tensor therefore
gets 1 x c blocks, which is the 1-D DCT of the paper. Coefficient index within a chunk is
f_row * c2 + f_col.

Determinism and wire:
- The DCT basis is built in float64 from Python's `math.cos` (correctly rounded on glibc) and
  cast: float32 for compress (local math), float64 for the decode. Decoding in float64, with
  replicas summed in sorted-id order and indices validated unique per chunk (no scatter
  collisions), makes the result bit-identical on every replica of one build; across BLAS builds
  the sign can only differ where the float64 result is within rounding of zero.
- Indices go out as uint16 (chunks up to 65536 coefficients, so `chunk` <= 256), sorted
  ascending within each chunk; values as float32: 6 bytes per kept coefficient. With
  `sign_bits` the values are replaced by packed sign bits (bit set = negative, little-endian
  bit order, k bits padded to whole bytes) plus one float32 scale per chunk: the mean |value| of
  the chunk's kept coefficients, i.e. the scale c minimising ||v - c*sign(v)||. Error feedback
  then subtracts the decoded sign*scale (what was actually sent; Psyche instead subtracts the
  unquantised values).
- Robust methods: the per-replica decodes are float64 (as the chooser mean), cast to float32 by
  `robust.aggregate`, which combines them in sorted-id order with float64 adds: bit-identical on
  every replica of one build, with the same cross-build caveat as above. The trimmed mean is
  coordinate-wise in parameter space, over every valid replica (a replica that did not touch a
  weight's chunk votes 0 for it); it is not the chooser mean, so the robust rules also change an
  honest run's trajectory (bench/byzantine.py prints the honest loss under both).
- Bad packets: a replica any of whose packets fails `validate_packet` (shape, k, index range,
  duplicate indices, non-finite values, |value| or scale above `value_bound`) is dropped from
  the whole step and reported in `Aggregate.dropped`; all replicas see the same bytes and drop
  the same replica. Zero valid replicas raises `NoContributions`.
- Devices: `compress` runs where the parameters live; packets always hold CPU tensors and the
  decode runs on the CPU; `apply` moves the signs to each parameter's device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from optim import robust
from optim.dct import Chunking
from optim.errors import ConfigError, NoContributions, PacketRejected, ShapeMismatch
from optim.robust import Aggregate


@dataclass(frozen=True)
class DemoConfig:
    """DeMo hyperparameters (defaults from the paper's OLMo configs, except lr)."""

    lr: float
    beta: float = 0.999
    topk: int = 32
    chunk: int = 64
    weight_decay: float = 0.0
    sign_bits: bool = False
    value_bound: float | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0.0:
            raise ConfigError(f"DeMo lr must be > 0, got {self.lr}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"DeMo beta must be in [0, 1), got {self.beta}; the paper uses 0.999")
        if self.topk < 1:
            raise ConfigError(f"DeMo topk must be >= 1, got {self.topk}")
        if not 1 <= self.chunk <= 256:
            raise ConfigError(
                f"DeMo chunk must be in [1, 256] so indices fit uint16, got {self.chunk}; use 64"
            )
        if self.weight_decay < 0.0:
            raise ConfigError(f"DeMo weight_decay must be >= 0, got {self.weight_decay}")
        if self.value_bound is not None and not self.value_bound > 0.0:
            raise ConfigError(f"DeMo value_bound must be > 0 or None, got {self.value_bound}")


@dataclass(frozen=True)
class DemoPacket:
    """What one replica sends for one parameter in one step.

    Attributes:
        shape: the parameter's shape.
        chunk: (c1, c2), the block sides.
        indices: uint16 [n_chunks, k], ascending within each row, index within the chunk.
        values: float32 [n_chunks, k], or None in sign-bit mode.
        signs: uint8 [n_chunks, ceil(k/8)] packed sign bits (1 = negative), sign-bit mode only.
        scales: float32 [n_chunks], the magnitude of every coefficient of a chunk, sign-bit mode.
    """

    shape: tuple[int, ...]
    chunk: tuple[int, int]
    indices: Tensor
    values: Tensor | None = None
    signs: Tensor | None = None
    scales: Tensor | None = None

    def decoded(self) -> Tensor:
        """float32 [n_chunks, k]: the values, or sign * scale in sign-bit mode."""
        if self.values is not None:
            return self.values
        assert self.signs is not None and self.scales is not None
        negative = _unpack_bits(self.signs, self.indices.shape[1])
        return (1.0 - 2.0 * negative.to(torch.float32)) * self.scales[:, None]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numpy arrays for the wire layer to frame (no pickling needed on receive)."""
        out = {
            "shape": np.asarray(self.shape, dtype=np.int64),
            "chunk": np.asarray(self.chunk, dtype=np.int64),
            "indices": self.indices.numpy(),
        }
        for name in ("values", "signs", "scales"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> DemoPacket:
        """Rebuild a packet from `to_arrays` output; checks dtypes (contents: `validate_packet`)."""
        want = {"shape": np.int64, "chunk": np.int64, "indices": np.uint16, "values": np.float32,
                "signs": np.uint8, "scales": np.float32}
        for name, arr in arrays.items():
            if name not in want:
                raise PacketRejected(f"unknown DeMo packet field {name!r}; expected {sorted(want)}")
            if np.asarray(arr).dtype != want[name]:
                raise PacketRejected(f"DeMo packet field {name!r} has dtype {arr.dtype}, "
                                     f"expected {np.dtype(want[name])}")
        has_values = "values" in arrays
        if has_values == ("signs" in arrays or "scales" in arrays):
            raise PacketRejected("a DeMo packet carries either 'values' or 'signs'+'scales'")
        if not has_values and not ("signs" in arrays and "scales" in arrays):
            raise PacketRejected("a sign-bit DeMo packet needs both 'signs' and 'scales'")
        missing = {"shape", "chunk", "indices"} - set(arrays)
        if missing or arrays["chunk"].shape != (2,) or arrays["shape"].ndim != 1:
            raise PacketRejected(f"a DeMo packet needs 1-D 'shape', 2-element 'chunk' and "
                                 f"'indices' (missing: {sorted(missing)})")

        def tensor(name: str) -> Tensor | None:
            return torch.from_numpy(np.array(arrays[name])) if name in arrays else None

        idx = tensor("indices")
        assert idx is not None
        return cls(tuple(int(d) for d in arrays["shape"]), (int(arrays["chunk"][0]),
                   int(arrays["chunk"][1])), idx, tensor("values"), tensor("signs"),
                   tensor("scales"))


def packet_nbytes(packet: DemoPacket) -> int:
    """Payload bytes of one packet (indices + values, or indices + signs + scales); no framing."""
    parts = (packet.indices, packet.values, packet.signs, packet.scales)
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


class DemoState:
    """The local half of DeMo: one `delta` (decoupled momentum) per parameter.

    `delta` differs between replicas by design; the parameters stay identical because every
    replica applies the same decoded sign. A joining replica starts with zero deltas.
    """

    def __init__(self, params: Sequence[Tensor], config: DemoConfig) -> None:
        self.config = config
        self.shapes = [tuple(p.shape) for p in params]
        self.chunkings = [Chunking.of(s, config.chunk) for s in self.shapes]
        self.delta = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    @torch.no_grad()
    def compress(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], lr: float | None = None
    ) -> list[DemoPacket]:
        """Phase 1. Applies weight decay to `params` in place and updates `delta` in place.

        Args:
            params: the stage's parameters (mutated: multiplicative weight decay).
            grads: the local gradients, already clipped if the run clips (not mutated).
            lr: this step's learning rate (a schedule's value); defaults to config.lr.
        """
        cfg, lr = self.config, self.config.lr if lr is None else lr
        _check_same(self.shapes, params, "params")
        _check_same(self.shapes, grads, "grads")
        packets = []
        for p, g, delta, ch in zip(params, grads, self.delta, self.chunkings, strict=True):
            if cfg.weight_decay:
                p.mul_(1.0 - lr * cfg.weight_decay)
            delta.mul_(cfg.beta).add_(g.to(torch.float32), alpha=lr)
            coeffs = ch.dct(delta)
            k = ch.k(cfg.topk)
            idx = torch.topk(coeffs.abs(), k, dim=1, sorted=False).indices
            idx = torch.sort(idx, dim=1).values
            vals = coeffs.gather(1, idx)
            packet = _make_packet(tuple(p.shape), ch, idx, vals, cfg.sign_bits)
            sent = torch.zeros_like(coeffs).scatter_(1, idx, packet.decoded().to(idx.device))
            delta.sub_(ch.idct(sent, delta.shape))
            packets.append(packet)
        return packets


def validate_packet(packet: DemoPacket, shape: Sequence[int], config: DemoConfig) -> None:
    """Raise `PacketRejected` unless `packet` is a well-formed packet for a parameter of `shape`."""
    ch = Chunking.of(shape, config.chunk)
    k = ch.k(config.topk)
    if tuple(packet.shape) != tuple(shape) or tuple(packet.chunk) != (ch.c1, ch.c2):
        raise PacketRejected(f"packet for shape {packet.shape} chunk {packet.chunk}, expected "
                             f"{tuple(shape)} chunk {(ch.c1, ch.c2)}")
    idx = packet.indices
    if idx.dtype != torch.uint16 or tuple(idx.shape) != (ch.n_chunks, k):
        raise PacketRejected(f"indices {idx.dtype} {tuple(idx.shape)}, expected uint16 "
                             f"{(ch.n_chunks, k)}")
    idx64 = idx.to(torch.int64)
    if bool((idx64 >= ch.per_chunk).any()):
        raise PacketRejected(f"an index is >= {ch.per_chunk}, the coefficients per chunk")
    if k > 1 and bool((idx64[:, 1:] <= idx64[:, :-1]).any()):
        raise PacketRejected("indices must be strictly ascending within each chunk (no repeats)")
    bound = config.value_bound
    if (packet.values is None) != config.sign_bits:
        mode = "sign bits" if config.sign_bits else "float32 values"
        raise PacketRejected(f"this run sends {mode}; the packet uses the other encoding")
    if packet.values is not None:
        if packet.signs is not None or packet.scales is not None:
            raise PacketRejected("packet carries both values and sign bits")
        _check_payload(packet.values, (ch.n_chunks, k), "values", bound)
    else:
        if packet.signs is None or packet.scales is None:
            raise PacketRejected("packet carries neither values nor signs+scales")
        if packet.signs.dtype != torch.uint8 or tuple(packet.signs.shape) != (ch.n_chunks,
                                                                              (k + 7) // 8):
            raise PacketRejected(f"signs {packet.signs.dtype} {tuple(packet.signs.shape)}, "
                                 f"expected uint8 {(ch.n_chunks, (k + 7) // 8)}")
        if k % 8 and bool((packet.signs[:, -1].to(torch.int64) >> (k % 8)).any()):
            raise PacketRejected("padding bits of the sign bytes must be zero")
        _check_payload(packet.scales, (ch.n_chunks,), "scales", bound)
        if bool((packet.scales < 0).any()):
            raise PacketRejected("sign-bit scales must be >= 0")


def decode_packet(packet: DemoPacket, shape: Sequence[int], config: DemoConfig) -> Tensor:
    """One replica's update for one parameter: the inverse DCT of its kept coefficients (zeros
    elsewhere), float64 of `shape`. The packet must have passed `validate_packet` (unique
    indices: the scatter has no collisions, so the result does not depend on thread order)."""
    ch = Chunking.of(shape, config.chunk)
    coeffs = torch.zeros(ch.n_chunks, ch.per_chunk, dtype=torch.float64)
    coeffs.scatter_(1, packet.indices.to(torch.int64), packet.decoded().to(torch.float64))
    return ch.idct(coeffs, shape)


def aggregate(
    packets_by_replica: Mapping[str, Sequence[DemoPacket]],
    shapes: Sequence[Sequence[int]],
    config: DemoConfig,
    method: robust.Method = "mean",
    *,
    trim: int = 1,
    max_norm: float | None = None,
) -> Aggregate:
    """Phase 2: per-index mean over choosers, inverse DCT; float64 result per parameter.

    Invalid replicas are dropped (see the module docstring) and listed in the result.

    Args:
        method: "mean" (the paper's chooser mean, float64 result), or "trimmed_mean" /
            "clipped_mean": `robust.aggregate` over the replicas' own decodes (`decode_packet`),
            float32 result; `trim` (per side, lowered for small groups) and `max_norm` (None:
            the median of the replicas' norms) as there.

    Raises:
        NoContributions: no replica sent a valid set of packets.
        ConfigError: unknown method, or an invalid trim / max_norm.
    """
    if method not in ("mean", "clipped_mean", "trimmed_mean"):
        raise ConfigError(f"unknown DeMo aggregation method {method!r}; use "
                          "mean|clipped_mean|trimmed_mean")
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for rid in sorted(packets_by_replica):
        packets = packets_by_replica[rid]
        try:
            if len(packets) != len(shapes):
                raise PacketRejected(f"sent {len(packets)} packets, expected {len(shapes)}")
            for i, (pk, shape) in enumerate(zip(packets, shapes, strict=True)):
                try:
                    validate_packet(pk, shape, config)
                except PacketRejected as e:
                    raise PacketRejected(f"parameter {i}: {e}") from None
        except PacketRejected as e:
            dropped[rid] = str(e)
            continue
        kept.append(rid)
    if not kept:
        raise NoContributions(f"no valid DeMo packets from {len(packets_by_replica)} replicas "
                              f"(dropped: {dropped}); skip this step")
    if method != "mean":
        decodes = {rid: [decode_packet(pk, shape, config) for pk, shape in
                         zip(packets_by_replica[rid], shapes, strict=True)] for rid in kept}
        agg = robust.aggregate(decodes, method, trim=trim, max_norm=max_norm, shapes=shapes)
        return Aggregate(agg.tensors, agg.included, {**dropped, **agg.dropped},
                         f"demo/{method}", agg.detail)
    results = []
    for i, shape in enumerate(shapes):
        ch = Chunking.of(shape, config.chunk)
        total = torch.zeros(ch.n_chunks, ch.per_chunk, dtype=torch.float64)
        count = torch.zeros(ch.n_chunks, ch.per_chunk, dtype=torch.float64)
        for rid in kept:
            pk = packets_by_replica[rid][i]
            idx = pk.indices.to(torch.int64)
            total.scatter_add_(1, idx, pk.decoded().to(torch.float64))
            count.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))
        avg = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
        results.append(ch.idct(avg, shape))
    return Aggregate(results, tuple(kept), dropped, "demo")


@torch.no_grad()
def apply(params: Sequence[Tensor], aggregated: Aggregate | Sequence[Tensor], lr: float) -> None:
    """Phase 3: p <- p - lr*sign(result) in place; each weight moves by exactly lr or not at all."""
    results = aggregated.tensors if isinstance(aggregated, Aggregate) else aggregated
    _check_same([tuple(r.shape) for r in results], params, "params")
    for p, r in zip(params, results, strict=True):
        p.sub_(torch.sign(r).to(device=p.device, dtype=p.dtype) * lr)


def _make_packet(shape: tuple[int, ...], ch: Chunking, idx: Tensor, vals: Tensor,
                 sign_bits: bool) -> DemoPacket:
    idx, vals = idx.cpu(), vals.cpu()  # packets are wire objects: always on the CPU
    indices = idx.to(torch.uint16)
    if not sign_bits:
        return DemoPacket(shape, (ch.c1, ch.c2), indices, values=vals.to(torch.float32))
    scales = vals.abs().mean(dim=1).to(torch.float32)
    return DemoPacket(shape, (ch.c1, ch.c2), indices, signs=_pack_bits(vals < 0), scales=scales)


_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.int64)


def _pack_bits(bits: Tensor) -> Tensor:
    """bool [n, k] -> uint8 [n, ceil(k/8)], bit j of byte b is element 8*b + j."""
    n, k = bits.shape
    padded = torch.zeros(n, (k + 7) // 8 * 8, dtype=torch.int64)
    padded[:, :k] = bits.to(torch.int64)
    return (padded.reshape(n, -1, 8) * _BIT_WEIGHTS).sum(dim=2).to(torch.uint8)


def _unpack_bits(packed: Tensor, k: int) -> Tensor:
    """Inverse of `_pack_bits`: uint8 [n, nbytes] -> bool [n, k]."""
    bits = (packed.to(torch.int64)[:, :, None] >> torch.arange(8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].to(torch.bool)


def _check_payload(t: Tensor, shape: tuple[int, ...], name: str, bound: float | None) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape:
        raise PacketRejected(f"{name} {t.dtype} {tuple(t.shape)}, expected float32 {shape}")
    if not bool(torch.isfinite(t).all()):
        raise PacketRejected(f"{name} hold NaN or inf")
    if bound is not None and bool((t.abs() > bound).any()):
        raise PacketRejected(f"a {name} magnitude exceeds value_bound={bound}")


def _check_same(shapes: Sequence[tuple[int, ...]], tensors: Sequence[Tensor], what: str) -> None:
    got = [tuple(t.shape) for t in tensors]
    if got != list(shapes):
        raise ShapeMismatch(f"DeMo {what} have shapes {got}, expected {list(shapes)}; "
                            "build DemoState from the same parameter list")
