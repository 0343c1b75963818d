"""What the coordinator takes from peers and gives them, as messages: bounded checks of every
field a peer chooses (texts, rates, addresses, benchmarks, heartbeat stats), and a member as the
wire's `PeerInfo`.

A check raises `BadRequest` naming the field and the accepted range; the service answers
INVALID_ARGUMENT with that message and carries on serving everyone else.
"""

from __future__ import annotations

import math
import re

from coordinator.membership import Member
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import PEER_STATES, Benchmark, PeerStats

MAX_RATE = 1e9  # samples/s, tokens/s: anything above is a bug or a lie
MAX_STEP = 2**53
MAX_KINDS = 32
_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")
_HEX_RE = re.compile(r"^[0-9a-f]*$")


class BadRequest(ValueError):
    """A field of a request is malformed; the message names the field and the bound."""


def member_to_wire(m: Member, full_stats: bool = True) -> pb.PeerInfo:
    b, s = m.benchmark, m.stats
    stats = s.to_proto() if full_stats else pb.PeerStats(
        state=s.state, samples_per_s=s.samples_per_s, queue=s.queue, step=s.step, loss=s.loss,
        state_hash=s.state_hash)
    return pb.PeerInfo(
        peer_id=m.peer_id, public_key=m.public_key, address=m.address, stage=m.stage,
        state=m.state, stats=stats, lease_expires=m.lease_expires,
        joined_at=m.joined_at,
        benchmark=pb.Benchmark(samples_per_s=b.samples_per_s, bandwidth_mbps=b.bandwidth_mbps,
                               device=b.device, memory_bytes=b.memory_bytes, declared=b.declared))


def check_text(name: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise BadRequest(f"{name} is {len(value)} characters; at most {limit} are accepted")
    if not value.isprintable():
        raise BadRequest(f"{name} must be printable text")
    return value


def check_rate(name: str, value: float, limit: float = MAX_RATE) -> float:
    if not math.isfinite(value) or value < 0 or value > limit:
        raise BadRequest(f"{name} must be a finite number in [0, {limit:g}], got {value!r}")
    return value


def check_address(value: str) -> str:
    check_text("address", value, 256)
    match = _ADDRESS_RE.match(value)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise BadRequest(f"address must be HOST:PORT where other peers reach this one "
                         f"(port 1-65535), got {value!r:.80}")
    return value


def check_benchmark(b: pb.Benchmark) -> Benchmark:
    if not (math.isfinite(b.samples_per_s) and 0 < b.samples_per_s <= MAX_RATE):
        raise BadRequest(f"benchmark.samples_per_s must be a finite number in (0, {MAX_RATE:g}]"
                         f" (run the self-benchmark), got {b.samples_per_s!r}")
    check_rate("benchmark.bandwidth_mbps", b.bandwidth_mbps, 1e7)
    check_text("benchmark.device", b.device, 128)
    return Benchmark.from_proto(b)


def stats_from_wire(s: pb.PeerStats) -> PeerStats:
    """Validated heartbeat stats. `loss` may be NaN (unknown); nothing else may be."""
    if s.state not in PEER_STATES:
        raise BadRequest(f"stats.state must be one of {', '.join(PEER_STATES)}, "
                         f"got {s.state!r:.40}")
    check_rate("stats.samples_per_s", s.samples_per_s)
    check_rate("stats.tokens_per_s", s.tokens_per_s)
    check_rate("stats.grad_norm", s.grad_norm, 1e30)
    if not (math.isnan(s.loss) or 0 <= s.loss <= 1e6):
        raise BadRequest(f"stats.loss must be NaN (unknown) or in [0, 1e6], got {s.loss!r}")
    if s.step > MAX_STEP:
        raise BadRequest(f"stats.step must be < 2**53, got {s.step}")
    if s.queue > 1_000_000:
        raise BadRequest(f"stats.queue must be <= 1000000, got {s.queue}")
    if len(s.state_hash) > 128 or not _HEX_RE.match(s.state_hash):
        raise BadRequest("stats.state_hash must be a lowercase hex digest of at most 128 chars")
    if len(s.bytes_by_kind) > MAX_KINDS:
        raise BadRequest(f"stats.bytes_by_kind has {len(s.bytes_by_kind)} kinds; at most "
                         f"{MAX_KINDS} are accepted")
    for kind in s.bytes_by_kind:
        if len(kind) > 64 or not kind.isprintable():
            raise BadRequest(f"stats.bytes_by_kind key {kind!r:.80} must be printable, <= 64 "
                             f"characters")
    return PeerStats.from_proto(s)
