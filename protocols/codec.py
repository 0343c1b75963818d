"""The tensor wire codec: named numpy arrays <-> (CallHeader fields, one payload).

Every tensor-carrying call (activations, gradients, sync payloads, stage states) describes its
tensors in a `CallHeader` (a `TensorHeader` per tensor: name, dtype, shape, encoding,
payload_bytes, block_size; `total_bytes`; `sha256`, the payload digest) and then ships one
payload: the tensors' encoded bytes concatenated in header order, with no padding. The digest
is SHA-256-based but not one flat SHA-256: it is the SHA-256 over the SHA-256 of each 1 MiB leaf
of the payload, with the length bound in (defined exactly in protocols.digest), so that
receivers can hash a bulk payload on several threads while it arrives. `CallHeader.digest` names
the algorithm (protocols.digest: "" is that SHA-256 tree; "blake3", which bulk state downloads
use toward receivers that accept it, is BLAKE3-256); a header naming another is refused.

Encodings (one `Codec` subclass each: `RAW`, `FP16`, `BF16`, `INT8_BLOCKWISE`, `FP8_E4M3`) live in
protocols.encodings, with the table of what each carries and the `CodecError` hierarchy; this
module re-exports all of it, so `from protocols.codec import X` works for every name there.

`TensorHeader.dtype` is the dtype the receiver rebuilds, so a float32 tensor sent as `BF16`
comes back as float32. numpy has no bfloat16: a bf16 tensor travels as `np.uint16` bit patterns
with the dtype label "bfloat16" (pass `labels={"name": "bfloat16"}` to `encode`; `decode` returns
it as `np.uint16` and the header says "bfloat16"). Peers convert torch tensors at their edge.

Nothing from the network is trusted: `check_header` validates the header alone (known dtype and
encoding, shapes, each payload_bytes against what its encoding needs, their sum against
total_bytes, size limits, expected names/dtypes/shapes) so a receiver can refuse before it
allocates; `decode` then checks the payload's length and digest, and only then builds arrays,
checking finiteness when asked. Each refusal is a specific `CodecError` naming what was wrong.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from protocols import shoal_pb2 as pb
from protocols.digest import (
    SHA256_TREE,
    UnknownDigest,
    algorithm_of,
    check_algorithm,
    payload_digest,
)
from protocols.encodings import (
    BLOCKED,
    CODECS,
    DEFAULT_BLOCK_SIZE,
    DTYPES,
    FLOAT_LABELS,
    Bf16Codec,
    Codec,
    CodecError,
    DigestMismatch,
    Encoding,
    Fp8E4M3Codec,
    Fp16Codec,
    Int8BlockwiseCodec,
    MislabeledPayload,
    NonFinite,
    OversizedPayload,
    RawCodec,
    Shape,
    TruncatedPayload,
    UnexpectedTensor,
    UnsupportedEncoding,
    _contiguous,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
)

__all__ = [
    "BLOCKED", "CODECS", "DEFAULT_BLOCK_SIZE", "DTYPES", "FLOAT_LABELS", "MAX_BLOCK_SIZE",
    "MAX_ELEMENTS",
    "MAX_NDIM", "Bf16Codec", "Codec", "CodecError", "DigestMismatch", "Encoded", "Encoding",
    "FiniteScan", "Fp8E4M3Codec", "Fp16Codec",
    "Int8BlockwiseCodec", "Limits", "MislabeledPayload", "NonFinite", "OversizedPayload",
    "RawCodec", "Shape", "TruncatedPayload", "UnexpectedTensor", "UnsupportedEncoding",
    "bf16_bits_to_float32", "check_header", "decode", "encode", "fill_header",
    "float32_to_bf16_bits",
]

MAX_BLOCK_SIZE = 1 << 16  # BLOCKED encodings' blocks: 1..this, never longer than the tensor
MAX_NDIM = 32
MAX_ELEMENTS = 1 << 48  # no tensor extent beyond this, whatever a receiver's byte limit says


# ------------------------------------------------------------------ encode


@dataclass
class Encoded:
    """What `encode` produced: the TensorHeaders, the payload, and its digest (protocols.digest)."""

    tensors: list[pb.TensorHeader]
    payload: bytes
    sha256: bytes  # the digest, of algorithm `alg` (the field keeps its old name)
    alg: str = SHA256_TREE

    @property
    def total_bytes(self) -> int:
        return len(self.payload)


def encode(arrays: Mapping[str, np.ndarray], encoding: Encoding | Mapping[str, Encoding] = pb.RAW,
           block_size: int = DEFAULT_BLOCK_SIZE, labels: Mapping[str, str] | None = None,
           digest: str = SHA256_TREE) -> Encoded:
    """Encode named arrays, in mapping order, into TensorHeaders + one payload + its digest.

    Args:
        arrays: name -> array (any layout; copied once into the payload).
        encoding: one encoding for all, or name -> encoding (missing names travel RAW).
        block_size: INT8_BLOCKWISE block length (1..MAX_BLOCK_SIZE).
        labels: name -> dtype label where numpy cannot say it: "bfloat16" for uint16 bits.
        digest: the payload digest's algorithm (protocols.digest.ALGORITHMS); only name one
            other than SHA256_TREE toward a receiver that said it accepts it.
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
        # a block never outgrows its tensor (same payload: a tensor shorter than a block is one
        # block either way), so receivers can refuse blocks longer than the tensor
        tensors.append(pb.TensorHeader(
            name=name, dtype=label, shape=array.shape, encoding=enc, payload_bytes=data.nbytes,
            block_size=min(block_size, max(1, array.size)) if enc in BLOCKED else 0))
    payload = b"".join(parts)
    return Encoded(tensors, payload, payload_digest(payload, alg=digest), check_algorithm(digest))


def fill_header(header: pb.CallHeader, encoded: Encoded) -> pb.CallHeader:
    """Write `encoded`'s tensors, total_bytes and sha256 into `header`; returns it."""
    del header.tensors[:]
    header.tensors.extend(encoded.tensors)
    header.total_bytes, header.sha256 = encoded.total_bytes, bytes(encoded.sha256)
    header.digest = "" if encoded.alg == SHA256_TREE else encoded.alg
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

    Every size is checked with Python integers against the limits before numpy sees it: each
    dimension >= 0, the tensor's extent (the product of its dimensions, zeros counted as one, so
    that `[0, 2**62, 2**62]` is refused too) within the byte limit, block sizes within
    1..min(MAX_BLOCK_SIZE, elements). Raises OversizedPayload, MislabeledPayload or
    UnexpectedTensor, and nothing else, whatever the header holds.
    """
    try:
        _check_header(header, limits)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:  # defence in depth
        raise MislabeledPayload(f"header refused: {type(exc).__name__}: {exc}") from None


def _extent(shape: Sequence[int], cap: int) -> int | None:
    """The product of `shape` with zeros counted as one, or None once it passes `cap`."""
    extent = 1
    for d in shape:
        extent *= max(d, 1)
        if extent > cap:
            return None
    return extent


def _check_header(header: pb.CallHeader, limits: Limits) -> None:
    if len(header.tensors) > limits.max_tensors:
        raise OversizedPayload(f"{len(header.tensors)} tensors declared; limit is "
                               f"{limits.max_tensors}")
    if header.total_bytes > limits.max_total_bytes:
        raise OversizedPayload(f"payload of {header.total_bytes} bytes declared; limit is "
                               f"{limits.max_total_bytes}")
    try:
        check_algorithm(header.digest)
    except UnknownDigest as exc:
        raise MislabeledPayload(str(exc)) from None
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
            raise MislabeledPayload(f"{where}: invalid shape {_shape_text(t.shape)}")
        if _extent(t.shape, min(limits.max_total_bytes, MAX_ELEMENTS)) is None:
            raise OversizedPayload(f"{where}: shape {_shape_text(t.shape)} is larger than this "
                                   f"receiver accepts ({limits.max_total_bytes} bytes)")
        numel = math.prod(t.shape)
        if t.encoding in BLOCKED:
            top = min(MAX_BLOCK_SIZE, max(numel, 1))
            if not 1 <= t.block_size <= top:
                raise MislabeledPayload(f"{where}: block_size {t.block_size} not in 1..{top} "
                                        f"(at most {MAX_BLOCK_SIZE}, and not past the tensor's "
                                        f"{numel} values)")
        need = codec.payload_bytes(t.dtype, numel, t.block_size)
        if need != t.payload_bytes:
            raise MislabeledPayload(f"{where}: {t.dtype}{list(t.shape)} as {_enc_name(t.encoding)}"
                                    f" needs {need} bytes, header says {t.payload_bytes}")
    declared = sum(t.payload_bytes for t in header.tensors)
    if declared != header.total_bytes:
        raise MislabeledPayload(f"tensors declare {declared} bytes in all, total_bytes says "
                                f"{header.total_bytes}")
    if limits.expected is not None:
        _check_expected(header, limits.expected)


def _shape_text(shape: Sequence[int]) -> str:
    text = str(list(shape))
    return text if len(text) <= 120 else text[:117] + "..."


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
           computed_sha256: bytes | None = None,
           non_finite: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Validate header and payload, then rebuild the arrays (views into `payload` where possible).

    Args:
        computed_sha256: the digest of `payload` (`protocols.digest`) when the caller hashed it
            while it arrived (tensor_stream, dataplane), to save a second pass; it is still
            compared to the header's. One of another algorithm than the header names (plain
            bytes are SHA-256 tree) is not used: the payload is hashed again here.
        non_finite: NaN/Inf counts per tensor that the caller took from these same bytes while
            they arrived (`FiniteScan`); those tensors are not scanned again, and a count above
            zero is refused here, after the digest matched, exactly as a scan here would.
    Returns arrays, read-only when `payload` is bytes; bfloat16 arrives as np.uint16.
    Raises the CodecError subclass that names the first problem found, and no other exception
    (an error from numpy or the buffer protocol becomes MislabeledPayload).
    """
    try:
        return _decode(header, payload, limits, computed_sha256, non_finite)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, ArithmeticError, KeyError, IndexError) as exc:
        raise MislabeledPayload(f"payload refused: {type(exc).__name__}: {exc}") from None


def _decode(header: pb.CallHeader, payload: bytes | bytearray | memoryview, limits: Limits,
            computed_sha256: bytes | None, non_finite: Mapping[str, int] | None
            ) -> dict[str, np.ndarray]:
    check_header(header, limits)
    view = memoryview(payload).cast("B")
    if len(view) != header.total_bytes:
        error = TruncatedPayload if len(view) < header.total_bytes else OversizedPayload
        raise error(f"payload has {len(view)} bytes, header declares {header.total_bytes}")
    alg = check_algorithm(header.digest)
    digest = (computed_sha256 if computed_sha256 is not None and
              algorithm_of(computed_sha256) == alg else payload_digest(view, alg=alg))
    if not hmac.compare_digest(bytes(digest), header.sha256):
        name = "SHA-256 tree" if alg == SHA256_TREE else "BLAKE3"
        raise DigestMismatch(f"payload {name} digest {digest.hex()[:16]}… differs from the "
                             f"header's {header.sha256.hex()[:16]}…: corrupted or tampered in "
                             "transit; ask again")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for t in header.tensors:
        part = view[offset: offset + t.payload_bytes]
        offset += t.payload_bytes
        try:
            out[t.name] = CODECS[t.encoding].decode(part, t.dtype, tuple(t.shape), t.block_size)
            if limits.check_finite:
                bad = (non_finite[t.name] if non_finite is not None and t.name in non_finite
                       else _count_non_finite(out[t.name], t.dtype))
                if bad:
                    raise NonFinite(f"{bad} of {out[t.name].size} values are NaN or Inf")
        except CodecError as exc:
            raise type(exc)(f"tensor {t.name!r}: {exc}") from None
        except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            raise MislabeledPayload(f"tensor {t.name!r}: {type(exc).__name__}: {exc}") from None
    return out


def _count_non_finite(array: np.ndarray, label: str) -> int:
    """NaN/Inf values in a decoded (or RAW) array; 1M-value slices keep the temporaries small."""
    if label not in FLOAT_LABELS:
        return 0
    flat, bad = array.reshape(-1), 0
    for start in range(0, flat.size, 1 << 20):
        part = flat[start: start + (1 << 20)]
        bad += (np.count_nonzero(part & 0x7F80 == 0x7F80) if label == "bfloat16"
                else part.size - np.count_nonzero(np.isfinite(part)))
    return bad


class FiniteScan:
    """Counts NaN/Inf in a payload's RAW float tensors while the payload is still arriving.

    A bulk receiver (protocols.dataplane) calls `filled(k)` whenever the first k bytes of
    `buffer` are final; each newly complete stretch of whole values (about SCAN_BYTES, or up to
    a tensor's end) is counted by `submit` (a worker thread), so the check overlaps the network
    instead of following it. Only counts are taken: the verdict is given by `decode(...,
    non_finite=counts())` after the digest matched, and no array leaves the receiver before.
    Tensors of other encodings are still checked by `decode` after they are decoded.
    """

    SCAN_BYTES = 1 << 20

    def __init__(self, header: pb.CallHeader, limits: Limits, buffer: memoryview,
                 submit: Callable[..., Future[int]]) -> None:
        self._view, self._submit = buffer, submit
        self._todo: list[list] = []  # [name, label, next byte, end byte]
        offset = 0
        for t in header.tensors:
            if limits.check_finite and t.encoding == pb.RAW and t.dtype in FLOAT_LABELS:
                self._todo.append([t.name, t.dtype, offset, offset + t.payload_bytes])
            offset += t.payload_bytes
        self._names = [entry[0] for entry in self._todo]
        self._jobs: list[tuple[str, Future[int]]] = []

    def filled(self, upto: int) -> None:
        while self._todo:
            name, label, start, end = self._todo[0]
            item = DTYPES[label].itemsize
            stop = start + (min(end, upto) - start) // item * item
            if stop < end and stop - start < self.SCAN_BYTES:
                return
            if stop > start:
                self._jobs.append((name, self._submit(_count_raw, self._view[start:stop],
                                                      label)))
            if stop < end:
                self._todo[0][2] = stop
                return
            self._todo.pop(0)

    def counts(self) -> dict[str, int]:
        """NaN/Inf per scanned tensor (waits for the workers); only once all bytes were filled."""
        if self._todo:
            raise TruncatedPayload(f"tensor {self._todo[0][0]!r} was not filled completely")
        counts = dict.fromkeys(self._names, 0)
        for name, job in self._jobs:
            counts[name] += job.result()
        return counts


def _count_raw(part: memoryview, label: str) -> int:
    return _count_non_finite(np.frombuffer(part, DTYPES[label]), label)
