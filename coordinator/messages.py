"""What the coordinator takes from peers and gives them, as messages: bounded checks of every
field a peer chooses (texts, rates, addresses, benchmarks, heartbeat stats), and a member as the
wire's `PeerInfo`.

A check raises `BadRequest` naming the field and the accepted range; the service answers
INVALID_ARGUMENT with that message and carries on serving everyone else.

Addresses: a peer's address is where every other peer will connect, so it is a place the swarm
may be steered to. Refused: unspecified (0.0.0.0, ::), link-local (169.254.0.0/16, fe80::/10:
cloud metadata services live there), multicast, broadcast, the "this network" block 0.0.0.0/8,
numeric host forms other than a canonical IP literal (2852039166, 0xa9fea9fe, 0251.0376.0251.0376,
which resolvers read as IPv4 addresses), and loopback (127.0.0.0/8, ::1, localhost) unless the
Join itself came over loopback (a swarm on one machine). Limit: a DNS name is not resolved here,
so a name that resolves to such an address is not caught (the metadata host names are).

Heartbeat byte counters (`bytes_by_kind`) come from a fixed set of keys (`heartbeat_kinds`):
what peers count ("activations", "state", "sync:<the run's mode>") and one `recovery:` report of
a known method over block stages; anything else is INVALID_ARGUMENT, so no peer can grow the
status document or the persisted totals with keys of its own choosing.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse

from coordinator.member import Member
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import PEER_STATES, Benchmark, PeerStats
from protocols.recovery_report import is_report_key, parse_wire_key

MAX_RATE = 1e9  # samples/s, tokens/s: anything above is a bug or a lie
MAX_STEP = 2**53
MAX_KINDS = 32
_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")
_HEX_RE = re.compile(r"^[0-9a-f]*$")
_NUMERIC_HOST_RE = re.compile(r"^(0x[0-9a-fA-F]+|[0-9.]+)$")
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "instance-data",
                             "instance-data.ec2.internal"})
#: the methods a `recovery:` report may name (protocols/recovery_report.py)
RECOVERY_METHODS = frozenset({"weighted_average", "copy_neighbor", "edge_copy", "snapshot",
                              "copy_nearest", "initial"})


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
                               device=b.device, memory_bytes=b.memory_bytes, declared=b.declared,
                               memory_available_bytes=b.memory_available_bytes))


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


def check_address(value: str, caller_is_loopback: bool = False) -> str:
    """A peer's HOST:PORT, refused where it would steer the swarm somewhere it must not go
    (see the module docstring); loopback only for a caller that is itself on loopback."""
    check_text("address", value, 256)
    match = _ADDRESS_RE.match(value)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise BadRequest(f"address must be HOST:PORT where other peers reach this one "
                         f"(port 1-65535), got {value!r:.80}")
    host = match.group(1)
    literal = host[1:-1] if host.startswith("[") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        ip = None
    if ip is None:
        name = host.lower().rstrip(".")
        if _NUMERIC_HOST_RE.match(name):
            raise BadRequest(f"address host {host!r:.80} is a numeric form resolvers read as an "
                             f"IPv4 address; write the address as a dotted quad")
        if name in _METADATA_HOSTS:
            raise BadRequest(f"address host {host!r:.80} is a cloud metadata service, not a peer")
        if (name == "localhost" or name.endswith(".localhost")) and not caller_is_loopback:
            raise BadRequest("address is loopback (localhost), but this Join did not come "
                             "over loopback: advertise an address other peers can reach "
                             "(shoal peer --advertise HOST)")
        return value
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    why = ("unspecified" if ip.is_unspecified else
           "link-local" if ip.is_link_local else
           "multicast" if ip.is_multicast else
           "broadcast" if ip == ipaddress.IPv4Address("255.255.255.255") else
           "in 0.0.0.0/8 ('this network')" if ip in ipaddress.IPv4Network("0.0.0.0/8") else "")
    if why:
        raise BadRequest(f"address {value!r:.80} is {why}: other peers cannot reach a peer "
                         f"there; advertise a routable address (shoal peer --advertise HOST)")
    if ip.is_loopback and not caller_is_loopback:
        raise BadRequest(f"address {value!r:.80} is loopback, but this Join did not come over "
                         f"loopback: advertise an address other peers can reach "
                         f"(shoal peer --advertise HOST)")
    return value


def is_loopback_peer(grpc_peer: str) -> bool:
    """Whether a gRPC `context.peer()` string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000",
    "unix:...") names a loopback connection."""
    kind, _, rest = urllib.parse.unquote(grpc_peer).partition(":")  # "ipv6:%5B::1%5D:5000"
    if kind == "unix":
        return True
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    else:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def heartbeat_kinds(sync_mode: str) -> frozenset[str]:
    """The byte-counter keys a heartbeat may carry (besides one `recovery:` report)."""
    return frozenset({"activations", "state", f"sync:{sync_mode}"})


def check_kinds(kinds, allowed: frozenset[str], n_stages: int) -> None:
    """`bytes_by_kind` keys from `allowed`, plus at most one well-formed `recovery:` report."""
    reports = 0
    for kind in kinds:
        if kind in allowed:
            continue
        parsed = parse_wire_key(kind) if is_report_key(kind) else None
        if parsed is not None and len(kind) <= 64:
            method, sources = parsed
            if (method in RECOVERY_METHODS and len(sources) <= 2
                    and all(1 <= x < n_stages for x in sources)):
                reports += 1
                if reports > 1:
                    raise BadRequest("stats.bytes_by_kind carries more than one recovery report")
                continue
        raise BadRequest(f"stats.bytes_by_kind key {kind!r:.80} is not one this coordinator "
                         f"counts; the keys are {', '.join(sorted(allowed))} and one "
                         f"recovery:<method>:<stages> report")


def check_benchmark(b: pb.Benchmark) -> Benchmark:
    if not (math.isfinite(b.samples_per_s) and 0 < b.samples_per_s <= MAX_RATE):
        raise BadRequest(f"benchmark.samples_per_s must be a finite number in (0, {MAX_RATE:g}]"
                         f" (run the self-benchmark), got {b.samples_per_s!r}")
    check_rate("benchmark.bandwidth_mbps", b.bandwidth_mbps, 1e7)
    check_text("benchmark.device", b.device, 128)
    return Benchmark.from_proto(b)


def stats_from_wire(s: pb.PeerStats, kinds: frozenset[str] | None = None,
                    n_stages: int = 0) -> PeerStats:
    """Validated heartbeat stats. `loss` may be NaN (unknown); nothing else may be. With
    `kinds`, bytes_by_kind keys must come from it (see `check_kinds`)."""
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
    if s.HasField("held_stage") and not (
            s.held_stage >= 0 and (n_stages <= 0 or s.held_stage < n_stages)):
        raise BadRequest(f"stats.held_stage must be a stage of this run (0.."
                         f"{max(n_stages - 1, 0)}) or unset, got {s.held_stage}")
    if kinds is not None:
        check_kinds(s.bytes_by_kind, kinds, n_stages)
    return PeerStats.from_proto(s)
