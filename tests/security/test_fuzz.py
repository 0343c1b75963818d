"""Fuzz pass (issue #12): the codec and every request message, with hypothesis.

(a) The codec's decode of arbitrary headers and payloads (random dtypes, shapes, encodings,
    block sizes, sizes, digests; truncated and oversize payloads), and the chunk assembler of
    in-band tensor streams (peer.pipeline.wire.receive), only ever return valid arrays or raise
    `codec.CodecError`, which the services answer INVALID_ARGUMENT.
(b) Every request message of the Coordinator service (JoinRequest, HeartbeatRequest,
    LeaveRequest, SwarmViewRequest, SpsaPost, SpsaLedgerRequest), built from random field values
    (or random bytes that parse), signed by a real member (by its own key for Join) and sent to
    a real coordinator process, gets a clean status: never UNKNOWN or INTERNAL, never a hang, and
    the coordinator keeps serving an honest member. The coordinator's field checks
    (coordinator/messages.py) only ever return or raise `BadRequest`.
The peer's request messages (StateRequest, StepEnd, TensorChunk streams) are fuzzed against a
real peer in tests/security/test_wire_attacks.py, which already runs a swarm.

Runs are derandomized (CI reproducible) with modest example counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import codec
from protocols import shoal_pb2 as pb
from protocols.auth import CallSigner, token_proof
from protocols.coordinator_client import Benchmark, CoordinatorClient
from protocols.digest import payload_digest
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.sim_peer import CoordinatorProcess

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_RPC = settings(FUZZ, max_examples=40)

# ------------------------------------------------------------------ values and messages

INT_EDGES = [0, 1, 2, 3, 7, 64, 255, 1 << 16, (1 << 16) + 1, 1 << 20, 2**31 - 1, 2**32 - 1,
             2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1, -1, -(2**31), -(2**63)]


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in INT_EDGES if lo <= v <= hi]),
                     st.integers(lo, hi))


_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1), F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
TEXT = st.one_of(st.sampled_from(["", "x", "training", "127.0.0.1:1", "169.254.169.254:80",
                                  "localhost:0", "[::1]:7", "sync:allreduce", "a" * 300,
                                  "\x00", "é", "0x7f000001:80"]),
                 st.text(max_size=40))


def scalar(field) -> st.SearchStrategy:
    t = field.type
    if t in _RANGES:
        return ints(*_RANGES[t])
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True,
                         width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=48)
    if t == F.TYPE_ENUM:
        return st.integers(-3, 12)  # proto3 enums are open: unknown values parse
    raise AssertionError(f"no strategy for field type {t}")


def fill(draw, msg, field, depth: int) -> None:
    """Set `field` of `msg` to a random value (a random sub-message, list or map as it is)."""
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f, value_f = (field.message_type.fields_by_name["key"],
                          field.message_type.fields_by_name["value"])
        if value_f.message_type is None:
            target.update(draw(st.dictionaries(scalar(key_f), scalar(value_f), max_size=4)))
    elif field.message_type is not None:
        sub_cls = getattr(pb, field.message_type.name, None)
        if sub_cls is None or depth >= 2:
            return
        if field.is_repeated:
            for item in draw(st.lists(message(sub_cls, depth + 1), max_size=3)):
                target.add().CopyFrom(item)
        else:
            target.CopyFrom(draw(message(sub_cls, depth + 1)))
    elif field.is_repeated:
        target.extend(draw(st.lists(scalar(field), max_size=4)))
    else:
        setattr(msg, field.name, draw(scalar(field)))


@st.composite
def message(draw, cls, depth: int = 0):
    """A message of type `cls` with a random subset of its fields set to random values."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if draw(st.booleans()):
            fill(draw, msg, field, depth)
    return msg


@st.composite
def mutant(draw, base):
    """`base` (a valid request) with one field, at any depth, set to a random value: reaches
    the checks behind the ones a fully random message already fails."""
    msg = type(base)()
    msg.CopyFrom(base)
    fields = list(base.DESCRIPTOR.fields)
    if not fields:
        return msg
    field = draw(st.sampled_from(fields))
    inner = getattr(base, field.name)
    if (field.message_type is not None and not field.is_repeated and base.HasField(field.name)
            and draw(st.booleans())):
        getattr(msg, field.name).CopyFrom(draw(mutant(inner)))
    else:
        msg.ClearField(field.name)
        fill(draw, msg, field, 0)
    return msg


VALID = {  # a request of each type that a member of the fuzz coordinator sends honestly
    pb.HeartbeatRequest: pb.HeartbeatRequest(known_epoch=1, stats=pb.PeerStats(
        state="training", step=3, samples_per_s=5.0, loss=2.5, state_hash="ab" * 32,
        bytes_by_kind={"activations": 10})),
    pb.SpsaPost: pb.SpsaPost(step=1, codes=b"\x01\xff"),
    pb.SpsaLedgerRequest: pb.SpsaLedgerRequest(from_step=0, to_step=2),
    pb.LeaveRequest: pb.LeaveRequest(reason="done"),
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_body(draw, cls) -> bytes:
    """The bytes of a request: a random message, sometimes with fields this version does not
    know appended (numbers past the message's own, varint or length-delimited)."""
    base = VALID.get(cls)
    chosen = draw(mutant(base)) if base is not None and draw(st.booleans()) else \
        draw(message(cls))
    body = chosen.SerializeToString()
    for _ in range(draw(st.integers(0, 2))):
        number = draw(st.integers(64, 2**29 - 1))
        if draw(st.booleans()):
            body += _varint(number << 3) + _varint(draw(ints(0, 2**64 - 1)))
        else:
            blob = draw(st.binary(max_size=32))
            body += _varint(number << 3 | 2) + _varint(len(blob)) + blob
    cls.FromString(body)  # it parses: the server's checks, not protobuf, must answer it
    return body


# ------------------------------------------------------------------ (a) the codec

DTYPE_LABELS = [*codec.DTYPES, "complex64", "", "float8", "object"]
BLOCKS = [0, 1, 2, 3, 16, 64, 1000, 1 << 16, (1 << 16) + 1, 1 << 20, 2**32 - 1]
DIMS = [0, 1, 2, 3, 5, 16, 1000, 2**31, 2**40, 2**62, 2**63 - 1, -1, -(2**63)]


@st.composite
def tensor_header(draw, index: int) -> pb.TensorHeader:
    t = pb.TensorHeader(
        name=draw(st.sampled_from([f"t{index}", "x", "", "t0"])),
        dtype=draw(st.sampled_from(DTYPE_LABELS)),
        encoding=draw(st.integers(-1, 5)),
        block_size=draw(st.one_of(st.sampled_from(BLOCKS), st.integers(0, 2**32 - 1))),
    )
    t.shape.extend(draw(st.lists(st.one_of(st.sampled_from(DIMS), st.integers(0, 40)),
                                 max_size=4)))
    honest = codec.CODECS.get(t.encoding)
    numel = math.prod(t.shape)
    if draw(st.booleans()) and honest is not None and t.dtype in codec.DTYPES and \
            t.block_size and 0 <= numel < 1 << 20:
        t.payload_bytes = honest.payload_bytes(t.dtype, numel, t.block_size)
    else:
        t.payload_bytes = draw(ints(0, 2**64 - 1))
    return t


@st.composite
def call(draw) -> tuple[pb.CallHeader, bytes]:
    header = pb.CallHeader(kind="forward")
    for i in range(draw(st.integers(0, 4))):
        header.tensors.append(draw(tensor_header(i)))
    declared = sum(t.payload_bytes for t in header.tensors) % 2**64  # as a C sum would wrap
    header.total_bytes = declared if draw(st.booleans()) else draw(ints(0, 2**64 - 1))
    size = header.total_bytes if header.total_bytes <= 1 << 16 else draw(st.integers(0, 64))
    size = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1, 7])))
    payload = draw(st.binary(min_size=size, max_size=size)) if size <= 4096 else \
        np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    choice = draw(st.integers(0, 3))
    header.sha256 = (payload_digest(payload) if choice < 2 else
                     draw(st.binary(min_size=32, max_size=32)) if choice == 2 else
                     draw(st.binary(max_size=40)))
    return header, payload


@st.composite
def consistent_call(draw) -> tuple[pb.CallHeader, bytes]:
    """A header whose sizes, total and digest all agree (what a careful attacker sends): only
    the shapes and block sizes are hostile, so the decoder itself is reached."""
    header, parts = pb.CallHeader(kind="forward"), []
    for i in range(draw(st.integers(1, 3))):
        encoding = draw(st.sampled_from(sorted(codec.CODECS)))
        labels = [x for x in codec.DTYPES if codec.CODECS[encoding].accepts(x)]
        t = pb.TensorHeader(name=f"t{i}", dtype=draw(st.sampled_from(labels)),
                            encoding=encoding)
        t.shape.extend(draw(st.lists(st.sampled_from(DIMS[:6] + DIMS[7:11]), max_size=4)))
        numel = math.prod(t.shape)
        if encoding == pb.INT8_BLOCKWISE:
            t.block_size = draw(st.sampled_from(BLOCKS[1:]))
        t.payload_bytes = codec.CODECS[encoding].payload_bytes(t.dtype, max(numel, 0),
                                                              max(t.block_size, 1)) % 2**64
        parts.append(draw(st.binary(min_size=t.payload_bytes, max_size=t.payload_bytes))
                     if t.payload_bytes <= 4096 else bytes(0))
        header.tensors.append(t)
    payload = b"".join(parts)
    header.total_bytes = sum(t.payload_bytes for t in header.tensors) % 2**64
    header.sha256 = payload_digest(payload)
    return header, payload


def assert_valid(header: pb.CallHeader, out: dict[str, np.ndarray]) -> None:
    assert list(out) == [t.name for t in header.tensors]
    for t in header.tensors:
        array = out[t.name]
        assert array.shape == tuple(t.shape) and array.dtype == codec.DTYPES[t.dtype]


@FUZZ
@given(st.one_of(call(), consistent_call()), st.booleans())
def test_decode_returns_valid_arrays_or_raises_codec_error(case, check_finite: bool) -> None:
    header, payload = case
    limits = codec.Limits(max_total_bytes=1 << 20, check_finite=check_finite)
    try:
        out = codec.decode(header, payload, limits)
    except codec.CodecError:
        return
    assert_valid(header, out)


@FUZZ
@given(call())
def test_check_header_raises_only_codec_errors(case) -> None:
    header, _ = case
    for limits in (codec.Limits(), codec.Limits(max_total_bytes=2**63, max_tensors=2),
                   codec.Limits(expected={"x": ("float32", (-1, 3))})):
        with contextlib.suppress(codec.CodecError):
            codec.check_header(header, limits)


@st.composite
def chunk_stream(draw) -> list[pb.TensorChunk]:
    header, payload = draw(call())
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    stream = [pb.TensorChunk(header=header)] + [pb.TensorChunk(data=p) for p in pieces]
    mutation = draw(st.integers(0, 5))
    if mutation == 1:
        stream.insert(draw(st.integers(0, len(stream))), pb.TensorChunk())  # empty chunk
    elif mutation == 2:
        stream.append(pb.TensorChunk(header=header))  # second header
    elif mutation == 3:
        stream = stream[1:]  # no header
    elif mutation == 4:
        stream = stream[: draw(st.integers(0, len(stream)))]  # cut short
    return stream


@FUZZ
@given(chunk_stream())
def test_in_band_streams_return_valid_arrays_or_raise_codec_error(stream) -> None:
    from peer.pipeline import wire

    async def chunks():
        for chunk in stream:
            yield chunk

    limits = wire.limits_for(1 << 20)
    try:
        header, out = asyncio.run(wire.receive(chunks(), limits, wire.ByteCounter(), "fuzz"))
    except codec.CodecError:
        return
    assert_valid(header, out)


@FUZZ
@given(st.sampled_from([pb.RAW, pb.FP16, pb.BF16, pb.INT8_BLOCKWISE]),
       st.lists(st.integers(0, 9), max_size=3), st.sampled_from([1, 2, 3, 64, 1 << 16]),
       st.integers(0, 7), st.binary(min_size=1, max_size=8))
def test_valid_headers_over_random_bytes_decode_or_refuse(encoding, shape, block, at, junk):
    """A consistent header (sizes right, digest right) over arbitrary payload bytes: the values
    may be anything (NaN scales, bool bytes > 1), the answer is arrays or a CodecError."""
    label = "bool" if encoding == pb.RAW and at % 2 else "float32"
    numel = math.prod(shape)
    block = min(block, max(numel, 1))
    need = codec.CODECS[encoding].payload_bytes(label, numel, block)
    payload = (junk * (need // len(junk) + 1))[:need]
    header = pb.CallHeader(total_bytes=need, sha256=payload_digest(payload))
    header.tensors.add(name="x", dtype=label, shape=shape, encoding=encoding,
                       payload_bytes=need, block_size=block if encoding == pb.INT8_BLOCKWISE
                       else 0)
    try:
        out = codec.decode(header, payload, codec.Limits())
    except codec.CodecError:
        return
    assert_valid(header, out)


@FUZZ
@given(st.dictionaries(st.sampled_from(["dataplane", "ticket", "other"]),
                       st.one_of(TEXT, st.sampled_from(["00" * 32, "127.0.0.1:99999", "[::1]:7",
                                                        "h:0", ":5", "ab" * 31 + "zz"])),
                       max_size=3))
def test_data_plane_pointers_parse_or_raise_codec_error(meta) -> None:
    from protocols import dataplane

    header = pb.CallHeader()
    header.meta.update(meta)
    try:
        host, port, ticket = dataplane.endpoint(header)
    except codec.CodecError:
        return
    assert host and 0 < port < 65536 and len(ticket) == dataplane.TICKET_BYTES


# ------------------------------------------------------------------ (b) the coordinator's checks


def messages_module():
    from coordinator import messages

    return messages


@FUZZ
@given(TEXT, st.floats(allow_nan=True, allow_infinity=True), st.booleans())
def test_coordinator_field_checks_raise_only_bad_request(text, number, loopback) -> None:
    m = messages_module()
    for check in (lambda: m.check_text("field", text, 16), lambda: m.check_rate("rate", number),
                  lambda: m.check_address(text, loopback), lambda: m.is_loopback_peer(text),
                  lambda: m.check_kinds({text: 1}, m.heartbeat_kinds("allreduce"), 3)):
        with contextlib.suppress(m.BadRequest):
            check()


@FUZZ
@given(message(pb.Benchmark), message(pb.PeerStats))
def test_benchmark_and_stats_checks_raise_only_bad_request(benchmark, stats) -> None:
    m = messages_module()
    for check in (lambda: m.check_benchmark(benchmark), lambda: m.stats_from_wire(stats),
                  lambda: m.stats_from_wire(stats, m.heartbeat_kinds("diloco"), 2)):
        with contextlib.suppress(m.BadRequest):
            check()


# ------------------------------------------------------------------ (b) a real coordinator

CLEAN = frozenset(grpc.StatusCode) - {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                                      grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.UNAVAILABLE}
SERVICE = "/shoal.v1.Coordinator/"


class Member:
    """A real identity admitted by the coordinator, and a blocking channel to sign calls on."""

    def __init__(self, coordinator: CoordinatorProcess) -> None:
        self.identity = Identity.generate()
        self.coordinator = coordinator

        async def join():
            client = CoordinatorClient(coordinator.grpc_address, self.identity,
                                       token=coordinator.token)
            try:
                await client.join(Benchmark(samples_per_s=10.0, declared=True), "127.0.0.1:9")
                return client.certificate
            finally:
                await client.close()

        self.certificate = asyncio.run(join())
        self.signer = CallSigner(self.identity, lambda: self.certificate)
        self.channel = grpc.insecure_channel(coordinator.grpc_address)

    def call(self, method: str, body: bytes, signer: CallSigner | None = None
             ) -> grpc.StatusCode:
        rpc = self.channel.unary_unary(SERVICE + method)
        metadata = (signer or self.signer).metadata(SERVICE + method, body)
        try:
            rpc(body, metadata=metadata, timeout=15)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def heartbeat_ok(self) -> None:
        request = pb.HeartbeatRequest(stats=pb.PeerStats(state="joining"))
        code = self.call("Heartbeat", request.SerializeToString())
        assert code == grpc.StatusCode.OK, code


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> CoordinatorProcess:
    work: Path = tmp_path_factory.mktemp("fuzz-coordinator")
    config = work / "run.toml"
    config.write_text(RunSpec().replace(**{  # SPSA: the ledger's checks are reached too
        "membership.lease_s": 600.0, "membership.certificate_s": 3600.0,
        "pipeline.stages": 2, "sync.mode": "spsa"}).to_toml())
    process = CoordinatorProcess(work / "state", config=config).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def member(coordinator) -> Member:
    m = Member(coordinator)
    yield m
    m.channel.close()


def assert_clean(code: grpc.StatusCode, method: str, coordinator: CoordinatorProcess) -> None:
    assert code in CLEAN or code == grpc.StatusCode.OK, (
        f"{method} answered {code}\n" + "".join(coordinator.lines[-30:]))


@pytest.mark.parametrize(("method", "cls"), [
    ("Heartbeat", pb.HeartbeatRequest), ("GetSwarmView", pb.SwarmViewRequest),
    ("PostSpsa", pb.SpsaPost), ("GetSpsaLedger", pb.SpsaLedgerRequest),
])
def test_member_requests_get_clean_statuses(coordinator, member, method: str, cls) -> None:
    @FUZZ_RPC
    @given(wire_body(cls))
    def fuzz(body: bytes) -> None:
        assert_clean(member.call(method, body), method, coordinator)

    fuzz()
    member.heartbeat_ok()  # still serving members
    assert coordinator.proc is not None and coordinator.proc.poll() is None


def test_join_requests_get_clean_statuses(coordinator, member) -> None:
    @FUZZ_RPC
    @given(st.data())
    def fuzz(data) -> None:
        stranger = Identity.generate()
        if data.draw(st.booleans()):  # admission passes: the field checks behind it are reached
            now = time.time()
            honest = pb.JoinRequest(
                public_key=stranger.public_key, timestamp=now, address="127.0.0.1:9",
                token_proof=token_proof(coordinator.token, stranger.public_key, now),
                stage_hint=-1, benchmark=pb.Benchmark(samples_per_s=10.0, declared=True))
            request = data.draw(mutant(honest))
        else:
            request = data.draw(message(pb.JoinRequest))
        code = member.call("Join", request.SerializeToString(), CallSigner(stranger,
                                                                            lambda: None))
        assert_clean(code, "Join", coordinator)

    fuzz()
    member.heartbeat_ok()


def test_leave_requests_get_clean_statuses(coordinator, member) -> None:
    @settings(FUZZ_RPC, max_examples=10)
    @given(wire_body(pb.LeaveRequest))
    def fuzz(body: bytes) -> None:
        leaver = Member(coordinator)  # a member of its own: each Leave ends one membership
        try:
            assert_clean(leaver.call("Leave", body), "Leave", coordinator)
        finally:
            leaver.channel.close()

    fuzz()
    member.heartbeat_ok()


def test_bodies_that_are_not_protobuf_get_invalid_argument(coordinator, member) -> None:
    """Bytes no protobuf parser accepts (a truncated varint): refused with a clean status."""
    body = b"\x08" + struct.pack("B", 0x80)
    code = member.call("Heartbeat", body)
    member.heartbeat_ok()  # serving goes on either way
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code
