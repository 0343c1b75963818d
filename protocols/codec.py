"""The tensor wire codec: named numpy arrays <-> (CallHeader fields, one payload).

Every tensor-carrying call (activations, gradients, sync payloads, stage states) describes its
tensors in a `CallHeader` (a `TensorHeader` per tensor: name, dtype, shape, encoding,
payload_bytes, block_size; `total_bytes`; `sha256` over the whole payload) and then ships one
payload: the tensors' encoded bytes concatenated in header order, with no padding.

Encodings (one `Codec` subclass each, in the shape of hivemind's `compression/base.py`):

| encoding         | carries             | payload per tensor                                    |
|------------------|---------------------|-------------------------------------------------------|
| `RAW`            | every dtype below   | the array's bytes, little-endian                      |
| `FP16`           | float32/64/16, bf16 | IEEE half (numpy's round-to-nearest-even)             |
| `BF16`           | float32/64/16, bf16 | upper 16 bits of fp32, round-to-nearest-even (ints)   |
| `INT8_BLOCKWISE` | float32/64/16, bf16 | an fp32 absmax scale per block, then an int8 per value |

`TensorHeader.dtype` is the dtype the receiver rebuilds, so a float32 tensor sent as `BF16`
comes back as float32. numpy has no bfloat16: a bf16 tensor travels as `np.uint16` bit patterns
with the dtype label "bfloat16" (pass `labels={"name": "bfloat16"}` to `encode`; `decode` returns
it as `np.uint16` and the header says "bfloat16"). Peers convert torch tensors at their edge.

Nothing from the network is trusted: `check_header` validates the header alone (known dtype and
encoding, shapes, each payload_bytes against what its encoding needs, their sum against
total_bytes, size limits, expected names/dtypes/shapes) so a receiver can refuse before it
allocates; `decode` then checks the payload's length and SHA-256, and only then builds arrays,
checking finiteness when asked. Each refusal is a specific `CodecError` naming what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from protocols import shoal_pb2 as pb

Encoding = int  # a protocols.shoal_pb2.Encoding value: RAW, FP16, BF16, INT8_BLOCKWISE
Shape = tuple[int, ...]

DEFAULT_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 1 << 20  # bounds the padding a decoder allocates for the last block
MAX_NDIM = 32

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
    return float32_to_bf16_bits(values) if label == "bfloat16" else values.astype(DTYPES[label])


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


class Int8BlockwiseCodec(Codec):
    """Absmax int8 per block (SWARM-style 8-bit activations): scales first, then the values.

    A value x in a block with absmax s is sent as q = round(127 x / s); the receiver rebuilds
    q s / 127, so |error| <= s / 254 per value. NaN/Inf would poison a scale: `encode` refuses.
    """

    encoding = pb.INT8_BLOCKWISE

    def payload_bytes(self, label: str, numel: int, block_size: int) -> int:
        return 4 * math.ceil(numel / block_size) + numel

    def encode(self, array: np.ndarray, label: str, block_size: int) -> np.ndarray:
        flat = _as_float32(array, label).reshape(-1)
        n = flat.size
        blocks = np.pad(flat, (0, -n % block_size)).reshape(-1, block_size)
        absmax = np.abs(blocks).max(axis=1) if n else np.zeros(0, np.float32)
        if not np.isfinite(absmax).all():
            raise NonFinite("INT8_BLOCKWISE cannot encode NaN/Inf")
        inv = np.divide(127.0, absmax, out=np.zeros_like(absmax), where=absmax > 0)
        q = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
        return np.concatenate([absmax.astype("<f4").view(np.uint8), q.view(np.uint8)])

    def decode(self, buf: memoryview, label: str, shape: Shape, block_size: int) -> np.ndarray:
        n = math.prod(shape)
        nblocks = math.ceil(n / block_size)
        scales = _frombuffer(buf[: 4 * nblocks], np.dtype("<f4"))
        if not np.isfinite(scales).all():
            raise NonFinite("an INT8_BLOCKWISE block scale is NaN/Inf")
        q = np.frombuffer(buf[4 * nblocks:], np.int8)
        blocks = np.pad(q, (0, -n % block_size)).reshape(nblocks, block_size)
        values = (blocks * (scales / np.float32(127.0))[:, None]).reshape(-1)[:n]
        return _from_float32(values.astype(np.float32, copy=False), label).reshape(shape)


CODECS: dict[int, Codec] = {
    c.encoding: c for c in (RawCodec(), Fp16Codec(), Bf16Codec(), Int8BlockwiseCodec())
}


def _contiguous(array: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """C-contiguous, little-endian, shape kept (np.ascontiguousarray turns 0-d into 1-d)."""
    array = np.asarray(array, dtype=dtype)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _frombuffer(buf: memoryview, dtype: np.dtype) -> np.ndarray:
    """Zero-copy view when aligned; a copy otherwise (tensors follow each other unpadded)."""
    array = np.frombuffer(buf, dtype)
    return array if array.flags.aligned else array.copy()


# ------------------------------------------------------------------ encode


@dataclass
class Encoded:
    """What `encode` produced: the TensorHeaders, the payload, and its SHA-256."""

    tensors: list[pb.TensorHeader]
    payload: bytes
    sha256: bytes

    @property
    def total_bytes(self) -> int:
        return len(self.payload)


def encode(arrays: Mapping[str, np.ndarray], encoding: Encoding | Mapping[str, Encoding] = pb.RAW,
           block_size: int = DEFAULT_BLOCK_SIZE, labels: Mapping[str, str] | None = None
           ) -> Encoded:
    """Encode named arrays, in mapping order, into TensorHeaders + one payload + its SHA-256.

    Args:
        arrays: name -> array (any layout; copied once into the payload).
        encoding: one encoding for all, or name -> encoding (missing names travel RAW).
        block_size: INT8_BLOCKWISE block length (1..MAX_BLOCK_SIZE).
        labels: name -> dtype label where numpy cannot say it: "bfloat16" for uint16 bits.
    Raises UnsupportedEncoding, or NonFinite where an encoding cannot represent a value.
    """
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise UnsupportedEncoding(f"block_size {block_size} is outside 1..{MAX_BLOCK_SIZE}")
    tensors: list[pb.TensorHeader] = []
    parts: list[memoryview] = []
    for name, value in arrays.items():
        array = np.asarray(value)
        label = (labels or {}).get(name) or ("bool" if array.dtype == np.bool_ else
                                             array.dtype.name)
        storage = DTYPES.get(label)
        if storage is None or (array.dtype.kind, array.dtype.itemsize) != (storage.kind,
                                                                           storage.itemsize):
            raise UnsupportedEncoding(f"tensor {name!r}: a {array.dtype} array cannot travel as "
                                      f"{label!r}; sendable: {sorted(DTYPES)}")
        enc = encoding.get(name, pb.RAW) if isinstance(encoding, Mapping) else encoding
        codec = CODECS.get(enc)
        if codec is None or not codec.accepts(label):
            raise UnsupportedEncoding(f"tensor {name!r}: {_enc_name(enc)} cannot carry {label}")
        array = _contiguous(array, storage)
        try:
            data = _contiguous(codec.encode(array, label, block_size)).reshape(-1)
        except NonFinite as exc:
            raise NonFinite(f"tensor {name!r}: {exc}") from None
        parts.append(memoryview(data.view(np.uint8)))
        tensors.append(pb.TensorHeader(
            name=name, dtype=label, shape=array.shape, encoding=enc, payload_bytes=data.nbytes,
            block_size=block_size if enc == pb.INT8_BLOCKWISE else 0))
    payload = b"".join(parts)
    return Encoded(tensors, payload, hashlib.sha256(payload).digest())


def fill_header(header: pb.CallHeader, encoded: Encoded) -> pb.CallHeader:
    """Write `encoded`'s tensors, total_bytes and sha256 into `header`; returns it."""
    del header.tensors[:]
    header.tensors.extend(encoded.tensors)
    header.total_bytes, header.sha256 = encoded.total_bytes, encoded.sha256
    return header


# ------------------------------------------------------------------ validate and decode


@dataclass
class Limits:
    """What a receiver accepts. `expected` maps name -> (dtype label, shape); a shape entry of
    -1 or None matches any length (e.g. a variable microbatch dimension). With `expected` set,
    exactly those names must arrive."""

    max_total_bytes: int = 1 << 30
    max_tensors: int = 4096
    expected: Mapping[str, tuple[str, Sequence[int | None]]] | None = None
    check_finite: bool = True


def _enc_name(enc: int) -> str:
    return pb.Encoding.Name(enc) if enc in pb.Encoding.values() else f"encoding #{enc}"


def check_header(header: pb.CallHeader, limits: Limits) -> None:
    """Validate everything the header says, before any payload byte is read or allocated.

    Raises OversizedPayload, MislabeledPayload or UnexpectedTensor.
    """
    if len(header.tensors) > limits.max_tensors:
        raise OversizedPayload(f"{len(header.tensors)} tensors declared; limit is "
                               f"{limits.max_tensors}")
    if header.total_bytes > limits.max_total_bytes:
        raise OversizedPayload(f"payload of {header.total_bytes} bytes declared; limit is "
                               f"{limits.max_total_bytes}")
    if len(header.sha256) != 32:
        raise MislabeledPayload(f"sha256 field holds {len(header.sha256)} bytes, not 32")
    seen: set[str] = set()
    for t in header.tensors:
        where = f"tensor {t.name!r}"
        if not t.name or t.name in seen:
            raise MislabeledPayload(f"{where}: tensor names must be non-empty and unique")
        seen.add(t.name)
        if t.dtype not in DTYPES:
            raise MislabeledPayload(f"{where}: unknown dtype {t.dtype!r}")
        codec = CODECS.get(t.encoding)
        if codec is None or not codec.accepts(t.dtype):
            raise MislabeledPayload(f"{where}: {_enc_name(t.encoding)} cannot carry {t.dtype}")
        if len(t.shape) > MAX_NDIM or any(d < 0 for d in t.shape):
            raise MislabeledPayload(f"{where}: invalid shape {list(t.shape)}")
        if t.encoding == pb.INT8_BLOCKWISE and not 1 <= t.block_size <= MAX_BLOCK_SIZE:
            raise MislabeledPayload(f"{where}: block_size {t.block_size} not in "
                                    f"1..{MAX_BLOCK_SIZE}")
        need = codec.payload_bytes(t.dtype, math.prod(t.shape), t.block_size)
        if need != t.payload_bytes:
            raise MislabeledPayload(f"{where}: {t.dtype}{list(t.shape)} as {_enc_name(t.encoding)}"
                                    f" needs {need} bytes, header says {t.payload_bytes}")
    declared = sum(t.payload_bytes for t in header.tensors)
    if declared != header.total_bytes:
        raise MislabeledPayload(f"tensors declare {declared} bytes in all, total_bytes says "
                                f"{header.total_bytes}")
    if limits.expected is not None:
        _check_expected(header, limits.expected)


def _check_expected(header: pb.CallHeader,
                    expected: Mapping[str, tuple[str, Sequence[int | None]]]) -> None:
    names = {t.name for t in header.tensors}
    if missing := [n for n in expected if n not in names]:
        raise UnexpectedTensor(f"tensors {missing} are expected but missing")
    for t in header.tensors:
        if t.name not in expected:
            raise UnexpectedTensor(f"tensor {t.name!r} is not expected here")
        dtype, shape = expected[t.name]
        fits = len(shape) == len(t.shape) and all(
            w is None or w < 0 or w == g for w, g in zip(shape, t.shape, strict=True))
        if dtype != t.dtype or not fits:
            raise UnexpectedTensor(f"tensor {t.name!r}: got {t.dtype}{list(t.shape)}, "
                                   f"expected {dtype}{list(shape)}")


def decode(header: pb.CallHeader, payload: bytes | bytearray | memoryview, limits: Limits, *,
           computed_sha256: bytes | None = None) -> dict[str, np.ndarray]:
    """Validate header and payload, then rebuild the arrays (views into `payload` where possible).

    Args:
        computed_sha256: the SHA-256 of `payload` when the caller hashed it while it arrived
            (tensor_stream, dataplane), to save a second pass; it is still compared to the header.
    Returns arrays, read-only when `payload` is bytes; bfloat16 arrives as np.uint16.
    Raises the CodecError subclass that names the first problem found.
    """
    check_header(header, limits)
    view = memoryview(payload).cast("B")
    if len(view) != header.total_bytes:
        error = TruncatedPayload if len(view) < header.total_bytes else OversizedPayload
        raise error(f"payload has {len(view)} bytes, header declares {header.total_bytes}")
    digest = computed_sha256 if computed_sha256 is not None else hashlib.sha256(view).digest()
    if not hmac.compare_digest(digest, header.sha256):
        raise DigestMismatch(f"payload SHA-256 {digest.hex()[:16]}… differs from the header's "
                             f"{header.sha256.hex()[:16]}…")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for t in header.tensors:
        part = view[offset: offset + t.payload_bytes]
        offset += t.payload_bytes
        try:
            out[t.name] = CODECS[t.encoding].decode(part, t.dtype, tuple(t.shape), t.block_size)
            if limits.check_finite:
                _check_finite(out[t.name], t.dtype)
        except CodecError as exc:
            raise type(exc)(f"tensor {t.name!r}: {exc}") from None
    return out


def _check_finite(array: np.ndarray, label: str) -> None:
    """Raise NonFinite on NaN/Inf; 1M-value slices keep the temporaries small."""
    if label not in FLOAT_LABELS:
        return
    flat, bad = array.reshape(-1), 0
    for start in range(0, flat.size, 1 << 20):
        part = flat[start: start + (1 << 20)]
        bad += (np.count_nonzero(part & 0x7F80 == 0x7F80) if label == "bfloat16"
                else part.size - np.count_nonzero(np.isfinite(part)))
    if bad:
        raise NonFinite(f"{bad} of {flat.size} values are NaN or Inf")
