"""The tensor codec: every dtype x encoding round-trips, and every malformed payload is refused
with the specific CodecError before an array is built."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from protocols import codec
from protocols import shoal_pb2 as pb
from protocols.codec import (
    CodecError,
    DigestMismatch,
    Limits,
    MislabeledPayload,
    NonFinite,
    OversizedPayload,
    TruncatedPayload,
    UnexpectedTensor,
    UnsupportedEncoding,
)

RNG = np.random.default_rng(7)
LOSSY = [pb.FP16, pb.BF16, pb.INT8_BLOCKWISE, pb.FP8_E4M3]
SHAPES = [(), (0,), (5,), (3, 70), (2, 3, 4, 5)]


def sample(label: str, shape: tuple[int, ...]) -> np.ndarray:
    if label == "bool":
        return RNG.integers(0, 2, shape).astype(bool)
    if label == "bfloat16":
        return codec.float32_to_bf16_bits(RNG.standard_normal(shape).astype(np.float32))
    dtype = codec.DTYPES[label]
    if dtype.kind == "f":
        return (RNG.standard_normal(shape) * 3).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def spec_digest(payload: bytes) -> bytes:
    """The payload digest written out from its definition in protocols/digest.py's docstring."""
    leaves = b"".join(hashlib.sha256(payload[i: i + (1 << 20)]).digest()
                      for i in range(0, len(payload), 1 << 20))
    return hashlib.sha256(b"shoal/payload-sha256-tree/v1\0" + len(payload).to_bytes(8, "big")
                          + (1 << 20).to_bytes(4, "big") + leaves).digest()


def roundtrip(arrays: dict, encoding=pb.RAW, labels=None, limits=None, block_size=64):
    encoded = codec.encode(arrays, encoding, block_size=block_size, labels=labels)
    header = codec.fill_header(pb.CallHeader(kind="forward"), encoded)
    return header, encoded, codec.decode(header, encoded.payload, limits or Limits())


def as_float32(array: np.ndarray, label: str) -> np.ndarray:
    return codec.bf16_bits_to_float32(array) if label == "bfloat16" else array.astype(np.float32)


@pytest.mark.parametrize("label", sorted(codec.DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_raw_roundtrip_is_exact_for_every_dtype(label: str, shape: tuple[int, ...]) -> None:
    array = sample(label, shape)
    header, _, out = roundtrip({"t": array}, labels={"t": label})
    assert header.tensors[0].dtype == label
    assert out["t"].dtype == codec.DTYPES[label] and out["t"].shape == shape
    np.testing.assert_array_equal(out["t"], array)


@pytest.mark.parametrize("label", sorted(codec.FLOAT_LABELS))
@pytest.mark.parametrize("encoding", LOSSY)
@pytest.mark.parametrize("shape", SHAPES)
def test_lossy_roundtrip_within_bound(label: str, encoding: int, shape: tuple[int, ...]) -> None:
    array = sample(label, shape)
    _, encoded, out = roundtrip({"t": array}, encoding, labels={"t": label}, block_size=16)
    assert out["t"].dtype == codec.DTYPES[label] and out["t"].shape == shape
    x, y = as_float32(array, label), as_float32(out["t"], label)
    if encoding == pb.INT8_BLOCKWISE:
        flat = np.pad(np.abs(x).reshape(-1), (0, -x.size % 16)).reshape(-1, 16)
        bound = np.repeat(flat.max(axis=1) / 254, 16)[: x.size].reshape(shape)
        rounding = {"bfloat16": 2.0**-8, "float16": 2.0**-11}.get(label, 0.0)  # of the target
        assert np.all(np.abs(x - y) <= bound * 1.001 + np.abs(x) * rounding + 1e-6)
        assert encoded.total_bytes == x.size + 4 * -(-x.size // 16)
    elif encoding == pb.FP8_E4M3:
        # 3 mantissa bits: half a quantum is 2^-4 of the value; below 2^-6 of the block's scaled
        # range the quantum is fixed (subnormals): absmax * 2^-9 / 448, half of it at most
        flat = np.pad(np.abs(x).reshape(-1), (0, -x.size % 16)).reshape(-1, 16)
        floor = np.repeat(flat.max(axis=1) * 2.0**-10 / 448, 16)[: x.size].reshape(shape)
        rounding = {"bfloat16": 2.0**-8, "float16": 2.0**-11}.get(label, 0.0)
        assert np.all(np.abs(x - y) <= np.abs(x) * (2.0**-4 + rounding) * 1.001 + floor + 1e-9)
        assert encoded.total_bytes == x.size + 4 * -(-x.size // 16)
    else:
        rel = 2.0**-11 if encoding == pb.FP16 else 2.0**-8
        np.testing.assert_allclose(y, x, rtol=rel, atol=1e-7)
        assert encoded.total_bytes == 2 * x.size


def test_fp8_codes_are_torchs_float8_e4m3fn_cast() -> None:
    torch = pytest.importorskip("torch")
    values = np.concatenate([
        RNG.standard_t(2, 50_000) * 10.0 ** RNG.integers(-8, 8, 50_000),
        [0.0, -0.0, 1e-30, -1e-30, 448.0, -448.0, 3.0, 2.0**-9, 2.0**-10, 3 * 2.0**-10],
    ]).astype(np.float32)
    encoded = codec.encode({"v": values}, pb.FP8_E4M3, block_size=64)
    nblocks = -(-values.size // 64)
    codes = np.frombuffer(encoded.payload[4 * nblocks:], np.uint8)
    blocks = torch.from_numpy(np.pad(values, (0, -values.size % 64)).reshape(-1, 64))
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    inv = torch.where(absmax > 0, torch.tensor(448.0) / absmax, torch.zeros_like(absmax))
    cast = (blocks * inv).clamp(-448, 448).to(torch.float8_e4m3fn)
    expect = cast.view(torch.uint8).reshape(-1)[: values.size].numpy()
    np.testing.assert_array_equal(codes, expect)
    # and decoding is torch's widening of those codes times the block's step
    out = codec.decode(codec.fill_header(pb.CallHeader(), encoded), encoded.payload, Limits())
    widened = (cast.float() / torch.where(absmax > 0, inv, torch.ones_like(inv)))
    np.testing.assert_allclose(out["v"], widened.reshape(-1)[: values.size].numpy(),
                               rtol=1e-6, atol=0)


def test_fp8_nan_codes_and_bad_scales_are_refused() -> None:
    x = RNG.standard_normal(100).astype(np.float32)
    encoded = codec.encode({"x": x}, pb.FP8_E4M3, block_size=50)
    for at, byte in ((8 + 17, 0x7F), (8 + 99, 0xFF)):
        payload = bytearray(encoded.payload)
        payload[at] = byte
        header = codec.fill_header(pb.CallHeader(), encoded)
        header.sha256 = spec_digest(bytes(payload))
        with pytest.raises(NonFinite, match="FP8_E4M3 value is NaN"):
            codec.decode(header, bytes(payload), Limits())
    payload = bytearray(encoded.payload)
    payload[0:4] = np.float32(np.inf).tobytes()
    header = codec.fill_header(pb.CallHeader(), encoded)
    header.sha256 = spec_digest(bytes(payload))
    with pytest.raises(NonFinite, match="FP8_E4M3 block scale"):
        codec.decode(header, bytes(payload), Limits())
    with pytest.raises(NonFinite, match="'x'"):
        codec.encode({"x": np.array([1.0, np.inf], np.float32)}, pb.FP8_E4M3)


def test_lossy_encodings_refuse_integers() -> None:
    for encoding in LOSSY:
        with pytest.raises(UnsupportedEncoding, match="cannot carry int64"):
            codec.encode({"ids": np.arange(4)}, encoding)


def test_bf16_exact_for_representable_values_and_rounds_to_nearest_even() -> None:
    bits = RNG.integers(0, 1 << 16, 100_000, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]  # finite bf16 values
    values = codec.bf16_bits_to_float32(bits)
    _, _, out = roundtrip({"v": values}, pb.BF16)
    np.testing.assert_array_equal(out["v"].view(np.uint32), values.view(np.uint32))
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20], np.float32)
    expect = np.array([1.0, 1 + 2**-6, -1.0, 1 + 2**-7], np.float32)
    np.testing.assert_array_equal(codec.bf16_bits_to_float32(codec.float32_to_bf16_bits(ties)),
                                  expect)
    special = np.array([0x7F800001, 0xFF800000, 0x7F7FFFFF], np.uint32).view(np.float32)
    rounded = codec.bf16_bits_to_float32(codec.float32_to_bf16_bits(special))
    assert np.isnan(rounded[0]) and rounded[1] == -np.inf and rounded[2] == np.inf


def test_mixed_call_keeps_order_names_and_per_tensor_encodings() -> None:
    arrays = {"h": sample("float32", (4, 8)), "ids": np.arange(6, dtype=np.int32),
              "mask": sample("bool", (6,)), "g": sample("bfloat16", (3,))}
    header, _, out = roundtrip(arrays, {"h": pb.INT8_BLOCKWISE}, labels={"g": "bfloat16"})
    assert [t.name for t in header.tensors] == list(arrays)
    assert [t.encoding for t in header.tensors] == [pb.INT8_BLOCKWISE, pb.RAW, pb.RAW, pb.RAW]
    assert header.total_bytes == sum(t.payload_bytes for t in header.tensors)
    assert header.sha256 == spec_digest(codec.encode(arrays, {"h": pb.INT8_BLOCKWISE},
                                                     labels={"g": "bfloat16"}).payload)
    np.testing.assert_array_equal(out["ids"], arrays["ids"])
    np.testing.assert_array_equal(out["g"], arrays["g"])


def test_encode_refuses_bad_labels_dtypes_and_nan_for_int8() -> None:
    with pytest.raises(UnsupportedEncoding, match="cannot travel as 'bfloat16'"):
        codec.encode({"w": np.zeros(3, np.float32)}, labels={"w": "bfloat16"})
    with pytest.raises(UnsupportedEncoding, match="complex128"):
        codec.encode({"z": np.zeros(3, complex)})
    with pytest.raises(NonFinite, match="'a'"):
        codec.encode({"a": np.array([1.0, np.nan], np.float32)}, pb.INT8_BLOCKWISE)


# ------------------------------------------------------------------ refusals


@pytest.fixture
def good() -> tuple[pb.CallHeader, bytes]:
    encoded = codec.encode({"w": sample("float32", (16, 16)), "ids": np.arange(10)})
    return codec.fill_header(pb.CallHeader(kind="state"), encoded), encoded.payload


def test_truncated_and_oversized_payloads(good) -> None:
    header, payload = good
    with pytest.raises(TruncatedPayload, match="1103 bytes, header declares 1104"):
        codec.decode(header, payload[:-1], Limits())
    with pytest.raises(OversizedPayload, match="1105 bytes, header declares 1104"):
        codec.decode(header, payload + b"\0", Limits())
    with pytest.raises(OversizedPayload, match="limit is 1000"):
        codec.decode(header, payload, Limits(max_total_bytes=1000))
    with pytest.raises(OversizedPayload, match="2 tensors declared; limit is 1"):
        codec.decode(header, payload, Limits(max_tensors=1))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("shape", [16, 17], r"needs 1088 bytes, header says 1024"),
    ("shape", [-16, -16], "invalid shape"),
    ("dtype", "float16", "needs 512 bytes"),
    ("dtype", "complex64", "unknown dtype"),
    ("encoding", pb.INT8_BLOCKWISE, "block_size 0"),
    ("encoding", 9, "encoding #9 cannot carry"),
    ("payload_bytes", 1028, "needs 1024 bytes, header says 1028"),
    ("name", "ids", "non-empty and unique"),
])
def test_mislabeled_headers(good, field: str, value, message: str) -> None:
    header, payload = good
    tensor = header.tensors[0]
    if field == "shape":
        del tensor.shape[:]
        tensor.shape.extend(value)
    else:
        setattr(tensor, field, value)
    with pytest.raises(MislabeledPayload, match=message):
        codec.decode(header, payload, Limits())


def test_total_bytes_must_match_tensors_and_digest_must_be_32_bytes(good) -> None:
    header, payload = good
    header.total_bytes += 1
    with pytest.raises(MislabeledPayload, match="1104 bytes in all, total_bytes says 1105"):
        codec.decode(header, payload + b"\0", Limits())
    header.total_bytes -= 1
    header.sha256 = b"short"
    with pytest.raises(MislabeledPayload, match="5 bytes, not 32"):
        codec.decode(header, payload, Limits())


def test_digest_mismatch(good) -> None:
    header, payload = good
    tampered = bytearray(payload)
    tampered[100] ^= 1
    with pytest.raises(DigestMismatch, match="differs from the header"):
        codec.decode(header, tampered, Limits())


@pytest.mark.parametrize("label", ["float32", "float16", "bfloat16"])
def test_non_finite_refused_naming_the_tensor(label: str) -> None:
    bad = np.array([1.0, np.inf, np.nan], np.float32)
    array = codec.float32_to_bf16_bits(bad) if label == "bfloat16" else bad.astype(label)
    encoded = codec.encode({"ok": np.ones(2, np.float32), "act": array}, labels={"act": label})
    header = codec.fill_header(pb.CallHeader(), encoded)
    with pytest.raises(NonFinite, match="tensor 'act': 2 of 3 values are NaN or Inf"):
        codec.decode(header, encoded.payload, Limits())
    out = codec.decode(header, encoded.payload, Limits(check_finite=False))
    assert out["act"].shape == (3,)


def test_fp16_overflow_refused_at_the_sender() -> None:
    with pytest.raises(NonFinite, match="'big': 1 values exceed float16's range"):
        codec.encode({"big": np.array([1e6, 1.0], np.float32)}, pb.FP16)


def test_bool_payload_with_other_bytes_is_refused() -> None:
    payload = bytes([0, 1, 2])
    header = pb.CallHeader(total_bytes=3, sha256=spec_digest(payload))
    header.tensors.add(name="m", dtype="bool", shape=[3], encoding=pb.RAW, payload_bytes=3)
    with pytest.raises(MislabeledPayload, match="'m': bool tensor holds bytes"):
        codec.decode(header, payload, Limits())


def test_expected_names_dtypes_and_shapes(good) -> None:
    header, payload = good
    expected = {"w": ("float32", (16, -1)), "ids": ("int64", (None,))}
    assert set(codec.decode(header, payload, Limits(expected=expected))) == {"w", "ids"}
    cases = [
        ({"w": ("float32", (16, 16))}, "'ids' is not expected"),
        ({**expected, "b": ("float32", (1,))}, r"\['b'\] are expected but missing"),
        ({**expected, "w": ("bfloat16", (16, 16))}, "got float32.16, 16., expected bfloat16"),
        ({**expected, "w": ("float32", (16, 15))}, "expected float32.16, 15."),
    ]
    for wanted, message in cases:
        with pytest.raises(UnexpectedTensor, match=message):
            codec.decode(header, payload, Limits(expected=wanted))


def test_header_checks_run_before_the_payload_is_touched(good) -> None:
    header, _ = good
    header.total_bytes = 1 << 40
    with pytest.raises(OversizedPayload):
        codec.check_header(header, Limits())
    assert issubclass(OversizedPayload, CodecError) and issubclass(NonFinite, CodecError)


# ------------------------------------------------------------ hostile sizes (issue #12, row 12)


def int8_header(shape: list[int], block_size: int, payload: bytes, name: str = "x"
                ) -> pb.CallHeader:
    header = pb.CallHeader(total_bytes=len(payload), sha256=spec_digest(payload))
    header.tensors.add(name=name, dtype="float32", shape=shape, encoding=pb.INT8_BLOCKWISE,
                       payload_bytes=len(payload), block_size=block_size)
    return header


@pytest.mark.parametrize("block_size", [1 << 20, 1 << 16, 2])
def test_int8_block_longer_than_the_tensor_is_refused(block_size: int) -> None:
    payload = np.float32(1.0).tobytes() + b"\x7f"  # one scale, one value: 5 bytes
    with pytest.raises(MislabeledPayload, match=f"block_size {block_size} not in 1..1"):
        codec.decode(int8_header([1], block_size, payload), payload, Limits())


def test_int8_block_size_capped_even_for_big_tensors() -> None:
    n = (1 << 16) + 1
    payload = np.ones(1, "<f4").tobytes() + bytes(n)
    with pytest.raises(MislabeledPayload, match=f"block_size {n} not in 1..65536"):
        codec.decode(int8_header([n], n, payload), payload, Limits())


def test_int8_decode_without_padding_matches_a_padded_reference() -> None:
    x = RNG.standard_normal(1000).astype(np.float32)
    for block in (1, 7, 64, 999, 1000):
        encoded = codec.encode({"x": x}, pb.INT8_BLOCKWISE, block_size=block)
        header = codec.fill_header(pb.CallHeader(), encoded)
        out = codec.decode(header, encoded.payload, Limits())["x"]
        scales = np.frombuffer(encoded.payload[: 4 * -(-1000 // block)], "<f4")
        q = np.frombuffer(encoded.payload[4 * -(-1000 // block):], np.int8).astype(np.float32)
        reference = q * np.repeat(scales / np.float32(127.0), block)[:1000]
        np.testing.assert_array_equal(out, reference)


def test_encoder_never_writes_a_block_longer_than_the_tensor() -> None:
    encoded = codec.encode({"one": np.ones(1, np.float32), "big": np.ones(300, np.float32),
                            "none": np.ones(0, np.float32)}, pb.INT8_BLOCKWISE, block_size=256)
    assert [t.block_size for t in encoded.tensors] == [1, 256, 1]
    out = codec.decode(codec.fill_header(pb.CallHeader(), encoded), encoded.payload, Limits())
    assert out["one"].tolist() == [1.0] and out["none"].shape == (0,)


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**62, 2**62, 0], [2**31, 2**31],
                                   [0, 2**40], [2**63 - 1]])
@pytest.mark.parametrize("encoding", [pb.RAW, pb.INT8_BLOCKWISE, pb.FP8_E4M3])
def test_huge_shapes_refused_before_any_multiplication_overflows(shape, encoding) -> None:
    header = pb.CallHeader(total_bytes=0, sha256=spec_digest(b""))
    header.tensors.add(name="x", dtype="float32", shape=shape, encoding=encoding,
                       payload_bytes=0, block_size=1)
    with pytest.raises(OversizedPayload, match="larger than this receiver accepts"):
        codec.decode(header, b"", Limits())


def test_zero_sized_tensors_with_sane_shapes_still_travel() -> None:
    arrays = {"a": np.zeros((0, 16), np.float32), "b": np.zeros((4, 0, 3), np.int64)}
    _, _, out = roundtrip(arrays)
    assert out["a"].shape == (0, 16) and out["b"].shape == (4, 0, 3)


def test_hostile_message_of_many_tiny_int8_tensors_is_refused_as_codec_error() -> None:
    # the 20 kB message of the issue: 1-element INT8_BLOCKWISE tensors with blocks of 2**20
    one = np.float32(1.0).tobytes() + b"\x01"
    payload = one * 2000
    header = pb.CallHeader(total_bytes=len(payload), sha256=spec_digest(payload))
    for i in range(2000):
        header.tensors.add(name=f"t{i}", dtype="float32", shape=[1], encoding=pb.INT8_BLOCKWISE,
                           payload_bytes=5, block_size=1 << 20)
    with pytest.raises(MislabeledPayload, match="tensor 't0': block_size 1048576"):
        codec.decode(header, payload, Limits())


def test_errors_from_numpy_come_out_as_codec_errors(good, monkeypatch) -> None:
    header, payload = good

    def explode(*args, **kwargs):
        raise ValueError("numpy says no")

    monkeypatch.setattr(codec.CODECS[pb.RAW], "decode", explode)
    with pytest.raises(MislabeledPayload, match="tensor 'w': ValueError: numpy says no"):
        codec.decode(header, payload, Limits())
