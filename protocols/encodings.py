"""The four tensor encodings of the wire codec, the dtypes they carry, and the codec's errors.

One `Codec` subclass per encoding, in the shape of hivemind's `compression/base.py`: how many
payload bytes a tensor needs, how to encode it, how to decode it. protocols.codec builds the
headers and payloads from these and validates what arrives; it re-exports every name here.

| encoding         | carries             | payload per tensor                                    |
|------------------|---------------------|-------------------------------------------------------|
| `RAW`            | every dtype below   | the array's bytes, little-endian                      |
| `FP16`           | float32/64/16, bf16 | IEEE half (numpy's round-to-nearest-even)             |
| `BF16`           | float32/64/16, bf16 | upper 16 bits of fp32, round-to-nearest-even (ints)   |
| `INT8_BLOCKWISE` | float32/64/16, bf16 | an fp32 absmax scale per block, then an int8 per value |
| `FP8_E4M3`       | float32/64/16, bf16 | an fp32 absmax scale per block, then an fp8 e4m3 byte  |

numpy has no bfloat16: a bf16 tensor is stored as `np.uint16` bit patterns with the dtype label
"bfloat16"; `float32_to_bf16_bits` and `bf16_bits_to_float32` convert with integer ops.

The `CodecError` hierarchy lives here because the encodings raise it too (`NonFinite`,
`MislabeledPayload`); protocols.codec raises the rest.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from protocols import shoal_pb2 as pb

Encoding = int  # a protocols.shoal_pb2.Encoding value: RAW, FP16, BF16, INT8_BLOCKWISE, FP8_E4M3
Shape = tuple[int, ...]

DEFAULT_BLOCK_SIZE = 64

# dtype label on the wire -> numpy storage dtype (bfloat16 is stored as its uint16 bit pattern)
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(storage).newbyteorder("<")
    for name, storage in {
        "float32": np.float32, "float64": np.float64, "float16": np.float16,
        "bfloat16": np.uint16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
        "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_,
    }.items()
}
FLOAT_LABELS = frozenset({"float32", "float64", "float16", "bfloat16"})


class CodecError(ValueError):
    """A tensor payload or its header was refused; the message says which tensor and why."""


class TruncatedPayload(CodecError):
    """Fewer payload bytes arrived than the header declares."""


class OversizedPayload(CodecError):
    """More bytes than declared arrived, or the declared size exceeds the receiver's limits."""


class MislabeledPayload(CodecError):
    """The header is inconsistent: unknown dtype/encoding, or a size that does not match."""


class DigestMismatch(CodecError):
    """The payload's SHA-256 differs from the one in the header (corrupted or tampered)."""


class NonFinite(CodecError):
    """A floating tensor holds NaN or Inf."""


class UnexpectedTensor(CodecError):
    """The header is consistent but not what the receiver expects (name, dtype or shape)."""


class UnsupportedEncoding(CodecError):
    """The sender asked for an encoding the array's dtype cannot use."""


# ------------------------------------------------------------------ bfloat16 bit helpers


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) with integer ops; returns uint16 bits.

    NaNs stay NaN (quiet bit set: the rounding add could otherwise carry a NaN into Inf);
    finite values past bf16's range round to Inf as IEEE rounding does.
    """
    bits = _contiguous(x, np.dtype("<f4")).view(np.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _as_float32(array: np.ndarray, label: str) -> np.ndarray:
    return bf16_bits_to_float32(array) if label == "bfloat16" else array.astype(np.float32)


def _from_float32(values: np.ndarray, label: str) -> np.ndarray:
    # past the target's range a value becomes Inf (the finiteness check refuses it), silently
    with np.errstate(over="ignore"):
        return (float32_to_bf16_bits(values) if label == "bfloat16"
                else values.astype(DTYPES[label]))


# ------------------------------------------------------------------ one codec per encoding


class Codec(ABC):
    """How one encoding turns an array into payload bytes and back.

    Subclasses are stateless. `encode` may return a view of its input (RAW does); the caller
    copies it into the payload. `decode` gets exactly `payload_bytes(...)` bytes, already
    length- and digest-checked, and may return a read-only view of them.
    """

    encoding: Encoding

    def accepts(self, label: str) -> bool:
        """Whether arrays with this dtype label can use this encoding."""
        return label in FLOAT_LABELS

    @abstractmethod
    def payload_bytes(self, label: str, numel: int, block_size: int) -> int:
        """Bytes this encoding needs for `numel` values of dtype `label`."""

    @abstractmethod
    def encode(self, array: np.ndarray, label: str, block_size: int) -> np.ndarray:
        """The encoded bytes of a C-contiguous little-endian array, as any contiguous array."""

    @abstractmethod
    def decode(self, buf: memoryview, label: str, shape: Shape, block_size: int) -> np.ndarray:
        """Rebuild the array (dtype `DTYPES[label]`, `shape`) from its encoded bytes."""

    def ratio(self, label: str) -> float:
        """Estimated encoded size / raw size, for choosing an encoding."""
        return self.payload_bytes(label, 1 << 20, DEFAULT_BLOCK_SIZE) / (
            (1 << 20) * DTYPES[label].itemsize)


class RawCodec(Codec):
    encoding = pb.RAW

    def accepts(self, label: str) -> bool:
        return label in DTYPES

    def payload_bytes(self, label: str, numel: int, block_size: int) -> int:
        return numel * DTYPES[label].itemsize

    def encode(self, array: np.ndarray, label: str, block_size: int) -> np.ndarray:
        return array

    def decode(self, buf: memoryview, label: str, shape: Shape, block_size: int) -> np.ndarray:
        if label == "bool" and len(buf) and np.frombuffer(buf, np.uint8).max() > 1:
            raise MislabeledPayload("bool tensor holds bytes other than 0 and 1")
        return _frombuffer(buf, DTYPES[label]).reshape(shape)


class _TwoBytes(Codec):
    def payload_bytes(self, label: str, numel: int, block_size: int) -> int:
        return 2 * numel


class Fp16Codec(_TwoBytes):
    encoding = pb.FP16

    def encode(self, array: np.ndarray, label: str, block_size: int) -> np.ndarray:
        if label == "float16":
            return array
        wide = _as_float32(array, label)
        with np.errstate(over="ignore"):
            half = wide.astype("<f2")
        if overflow := np.count_nonzero(np.isinf(half) & np.isfinite(wide)):
            raise NonFinite(f"{overflow} values exceed float16's range (±65504); use BF16")
        return half

    def decode(self, buf: memoryview, label: str, shape: Shape, block_size: int) -> np.ndarray:
        half = _frombuffer(buf, np.dtype("<f2")).reshape(shape)
        return half if label == "float16" else _from_float32(half.astype(np.float32), label)


class Bf16Codec(_TwoBytes):
    encoding = pb.BF16

    def encode(self, array: np.ndarray, label: str, block_size: int) -> np.ndarray:
        if label == "bfloat16":
            return array
        return float32_to_bf16_bits(_as_float32(array, label))

    def decode(self, buf: memoryview, label: str, shape: Shape, block_size: int) -> np.ndarray:
        bits = _frombuffer(buf, np.dtype("<u2")).reshape(shape)
        return bits if label == "bfloat16" else _from_float32(bf16_bits_to_float32(bits), label)


class _ScaledBlocks(Codec):
    """A float32 absmax scale per block of `block_size` values, then one byte per value: the
    layout INT8_BLOCKWISE and FP8_E4M3 share. Subclasses map a block scaled into
    [-LIMIT, LIMIT] to bytes and back."""

    LIMIT: float

    def payload_bytes(self, label: str, numel: int, block_size: int) -> int:
        return 4 * math.ceil(numel / block_size) + numel

    @abstractmethod
    def _to_bytes(self, scaled: np.ndarray) -> np.ndarray:
        """float32 values in [-LIMIT, LIMIT] -> one uint8/int8 each."""

    @abstractmethod
    def _from_bytes(self, q: np.ndarray) -> np.ndarray:
        """The bytes back to float32 values in [-LIMIT, LIMIT]."""

    def encode(self, array: np.ndarray, label: str, block_size: int) -> np.ndarray:
        flat = _as_float32(array, label).reshape(-1)
        n = flat.size
        blocks = np.pad(flat, (0, -n % block_size)).reshape(-1, block_size)
        absmax = np.abs(blocks).max(axis=1) if n else np.zeros(0, np.float32)
        if not np.isfinite(absmax).all():
            raise NonFinite(f"{pb.Encoding.Name(self.encoding)} cannot encode NaN/Inf")
        inv = np.divide(np.float32(self.LIMIT), absmax, out=np.zeros_like(absmax),
                        where=absmax > 0)
        scaled = np.clip(blocks * inv[:, None], -self.LIMIT, self.LIMIT).reshape(-1)[:n]
        q = self._to_bytes(scaled.astype(np.float32, copy=False))
        return np.concatenate([absmax.astype("<f4").view(np.uint8), q.view(np.uint8)])

    def decode(self, buf: memoryview, label: str, shape: Shape, block_size: int) -> np.ndarray:
        # Work and memory are O(numel + blocks), whatever the block size: the last, short block
        # is rebuilt on its own instead of padding the values up to a whole block.
        n = math.prod(shape)
        nblocks = -(-n // block_size)
        name = pb.Encoding.Name(self.encoding)
        if len(buf) != 4 * nblocks + n:
            raise MislabeledPayload(f"{name} {list(shape)} in blocks of {block_size} "
                                    f"needs {4 * nblocks + n} bytes, got {len(buf)}")
        scales = _frombuffer(buf[: 4 * nblocks], np.dtype("<f4"))
        if not np.isfinite(scales).all():
            raise NonFinite(f"a {name} block scale is NaN/Inf")
        unit = self._from_bytes(np.frombuffer(buf[4 * nblocks:], np.uint8))
        step = scales / np.float32(self.LIMIT)
        values = np.empty(n, np.float32)
        whole = n // block_size
        head = whole * block_size
        if whole:
            np.multiply(unit[:head].reshape(whole, block_size), step[:whole, None],
                        out=values[:head].reshape(whole, block_size))
        if head < n:
            np.multiply(unit[head:], step[whole], out=values[head:])
        return _from_float32(values, label).reshape(shape)


class Int8BlockwiseCodec(_ScaledBlocks):
    """Absmax int8 per block (SWARM-style 8-bit activations): scales first, then the values.

    A value x in a block with absmax s is sent as q = round(127 x / s); the receiver rebuilds
    q s / 127, so |error| <= s / 254 per value. NaN/Inf would poison a scale: `encode` refuses.
    """

    encoding = pb.INT8_BLOCKWISE
    LIMIT = 127.0

    def _to_bytes(self, scaled: np.ndarray) -> np.ndarray:
        return np.rint(scaled).astype(np.int8)

    def _from_bytes(self, q: np.ndarray) -> np.ndarray:
        return q.view(np.int8)


def _e4m3_values() -> np.ndarray:
    """The float32 value of every fp8 e4m3fn code 0..255 (0x7F and 0xFF, the NaNs, as NaN).

    Layout: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent field 0 is subnormal
    (m * 2^-9); no infinities, so the largest finite value is 0x7E = 1.75 * 2^8 = 448.
    """
    code = np.arange(128)
    exp, mant = code >> 3, code & 7
    magnitude = np.where(exp == 0, mant * 2.0 ** -9, (1 + mant / 8) * 2.0 ** (exp - 7))
    magnitude[0x7F] = np.nan
    return np.concatenate([magnitude, -magnitude]).astype(np.float32)


class Fp8E4M3Codec(_ScaledBlocks):
    """fp8 e4m3 per value with an fp32 absmax scale per block (scaled fp8, as FP8 training
    recipes send activations): a block with absmax s is scaled so that s maps to 448, the
    largest e4m3 value, and each value is rounded to the nearest e4m3 (ties to even), the
    rounding torch's `float8_e4m3fn` cast makes.

    Against INT8_BLOCKWISE at the same size: 3 mantissa bits give a relative error <= 1/16 at
    every magnitude above 2^-6 of the block's absmax, where int8's absolute error s/254 is
    large for the small values of a block with an outlier. Encoding is numpy only (protocols
    runs without torch): the exponent comes from frexp, the quantum is 2^(e-3), and the code
    of k quanta at exponent e is 8e + 48 + k, which also covers subnormals (e = -6) and k = 16
    rolling over into the next exponent.
    """

    encoding = pb.FP8_E4M3
    LIMIT = 448.0
    _VALUES = _e4m3_values()

    def _to_bytes(self, scaled: np.ndarray) -> np.ndarray:
        magnitude = np.abs(scaled)
        _, exp2 = np.frexp(magnitude)  # magnitude = m * 2^exp2, m in [0.5, 1)
        e = np.where(magnitude > 0, np.maximum(exp2 - 1, -6), -6)  # frexp(0) gives 0, not -inf
        k = np.rint(np.ldexp(magnitude, 3 - e))  # quanta of 2^(e-3): 0..16, ties to even
        code = (8 * e + 48 + k).astype(np.uint8)
        return code | (np.signbit(scaled).astype(np.uint8) << 7)

    def _from_bytes(self, q: np.ndarray) -> np.ndarray:
        if np.count_nonzero((q & 0x7F) == 0x7F):
            raise NonFinite("an FP8_E4M3 value is NaN (code 0x7F/0xFF)")
        return self._VALUES[q]


# encodings with a scale per block: their TensorHeader carries block_size (1..the tensor's length)
BLOCKED = frozenset({pb.INT8_BLOCKWISE, pb.FP8_E4M3})

CODECS: dict[int, Codec] = {
    c.encoding: c
    for c in (RawCodec(), Fp16Codec(), Bf16Codec(), Int8BlockwiseCodec(), Fp8E4M3Codec())
}


def _contiguous(array: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """C-contiguous, little-endian, shape kept (np.ascontiguousarray turns 0-d into 1-d)."""
    array = np.asarray(array, dtype=dtype)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _frombuffer(buf: memoryview, dtype: np.dtype) -> np.ndarray:
    """Zero-copy view when aligned; a copy otherwise (tensors follow each other unpadded)."""
    array = np.frombuffer(buf, dtype)
    return array if array.flags.aligned else array.copy()

