"""The swarm view the coordinator sends, serialized once per build and re-encoded only in part.

A SwarmView lists every live member (PeerInfo) and every stage (StageInfo). At 5,000 peers a
view is ~650 kB and building it from scratch (one PeerInfo message per member, then one
serialization of the whole) took tens of milliseconds of the event loop, four times a second
while the epoch moves (a join storm). Most members did not change between two builds, so each
member's *serialized* entry is kept with the values it was made from, and a build re-encodes
only the members whose entry changed (a heartbeat replaces the member's stats and lease, so a
member that beat since the last build is re-encoded; one that did not is copied as bytes).

The view's bytes are the concatenation of a serialized SwarmView holding only the epoch and
swarm id, each member's entry (a serialized SwarmView holding that one peer: the field tag, the
length and the PeerInfo), and a SwarmView holding the stages and the revoked list: protobuf
parses concatenated messages as their merge, and a repeated field's entries append in order, so
a peer parses an ordinary SwarmView, the members in the membership's order.

`ViewSnapshot` also keeps the same bytes framed as JoinReply.view and HeartbeatReply.view, so a
reply is its own small serialization followed by those bytes (coordinator/service.py).

Deltas (issue #19): a whole view to every peer whose known epoch is stale makes view traffic
grow with N² under churn (each change, a 650 kB view to each of 5,000 peers). A client that
applies deltas (HeartbeatRequest.view_deltas; CoordinatorClient) is sent what changed since the
epoch it holds instead: the members changed since (Membership.changes, a log of (epoch, peer)
of every membership change), the ids removed, and the stages and revocations whole. A member's
stats and lease in a view held by deltas are those of its last change (the epoch does not move
for them; a stage-0 driver asks GetSwarmView for fresh ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.membership import Member, Membership
from coordinator.messages import member_to_wire
from protocols import shoal_pb2 as pb

# deltas kept per snapshot, one per distinct known epoch asked from (after a join storm there
# are hundreds: every peer got its view at another moment), at most this many bytes in all
MAX_DELTA_BYTES = 32 << 20


@dataclass(frozen=True)
class ViewSnapshot:
    """One serialized swarm view and the same bytes framed as JoinReply / HeartbeatReply.view."""

    epoch: int
    built_at: float
    raw: bytes  # a serialized SwarmView
    join_field: bytes  # a serialized JoinReply holding only `view`
    heartbeat_field: bytes  # a serialized HeartbeatReply holding only `view`
    peers: int = 0  # how many members it lists
    tail: bytes = b""  # the serialized stages and revoked list (shared with its deltas)


def _framed(tag: int, payload: bytes) -> bytes:
    """`payload` as a length-delimited field `tag` (what SerializeToString writes for a
    message-typed field holding those bytes)."""
    out = bytearray([(tag << 3) | 2])
    n = len(payload)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def stage_info(s: object) -> pb.StageInfo:
    return pb.StageInfo(stage=s.stage, replicas=s.replicas, throughput=s.throughput,
                        grad_norm=s.grad_norm, step=s.step, rebuild=s.rebuild,
                        attested_hash=s.attested_hash, attested_step=s.attested_step)


class ViewCache:
    """Each live member's serialized SwarmView entry, kept until the member changes."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, bytes, object]] = {}  # id -> key, bytes, stats
        self.encoded = 0  # member entries encoded (for the tests and the bench)
        self._deltas_of: ViewSnapshot | None = None  # the snapshot `_deltas` lead to
        self._deltas: dict[int, bytes | None] = {}  # since -> framed delta (None: send whole)
        self._delta_bytes = 0

    def _key(self, m: Member) -> tuple:
        # the stats object is replaced by every heartbeat; the rest changes with joins, moves,
        # state and reach changes
        return (m.lease_expires, m.state, m.stage, m.address, m.reach, m.relay,
                m.joined_at, m.public_key)

    def entry(self, m: Member) -> bytes:
        key = self._key(m)
        got = self._entries.get(m.peer_id)
        if got is not None and got[0] == key and got[2] is m.stats:
            return got[1]
        info = member_to_wire(m, full_stats=False)
        info.reach, info.relay = m.reach, m.relay
        raw = pb.SwarmView(peers=[info]).SerializeToString()
        self._entries[m.peer_id] = (key, raw, m.stats)
        self.encoded += 1
        return raw

    def build(self, membership: Membership, swarm_id: str) -> bytes:
        """The whole view (live members only) as a serialized SwarmView."""
        return self._build(membership, swarm_id)[0]

    def _build(self, membership: Membership, swarm_id: str) -> tuple[bytes, bytes]:
        live = membership.live_members()
        parts = [pb.SwarmView(epoch=membership.epoch, swarm_id=swarm_id).SerializeToString()]
        parts.extend(self.entry(m) for m in live)
        tail = pb.SwarmView(stages=[stage_info(s) for s in membership.stage_summaries()],
                            revoked=membership.revoked()).SerializeToString()
        parts.append(tail)
        if len(self._entries) > len(live):  # forget departed members
            keep = {m.peer_id for m in live}
            self._entries = {k: v for k, v in self._entries.items() if k in keep}
        return b"".join(parts), tail

    def snapshot(self, membership: Membership, swarm_id: str, now: float) -> ViewSnapshot:
        raw, tail = self._build(membership, swarm_id)
        return ViewSnapshot(membership.epoch, now, raw, _framed(8, raw), _framed(5, raw),
                            membership.live_count(), tail)

    def delta(self, membership: Membership, snap: ViewSnapshot, since: int) -> bytes | None:
        """What changed from the view of epoch `since` to `snap`, as a serialized SwarmView
        with delta_from = `since` (see the proto), or None when a delta cannot say it (`since`
        is older than the change log, from before a restart, or not behind `snap`) or would not
        be much smaller than the whole view (more than an eighth of the members changed: a
        delta costs the coordinator O(its changes) to make, once per snapshot and epoch asked
        from, against a whole view's O(1) bytes already made).

        The members listed carry their entry as it is now, which may be newer than `snap`: a
        change after `snap` is sent again in the next delta, so a peer's view is never older
        than the epoch it is told."""
        if not membership.changes_from <= since < snap.epoch:
            return None
        changed: dict[str, None] = {}
        limit = snap.peers // 8 + 8
        for scanned, (epoch, peer_id) in enumerate(reversed(membership.changes)):
            if epoch <= since:
                break
            if scanned > 2 * limit:  # the log since `since` is longer than the view
                return None
            if epoch <= snap.epoch:
                changed[peer_id] = None
                if len(changed) > limit:
                    return None
        parts, removed = [], []
        for peer_id in changed:
            m = membership.get(peer_id)
            if m is not None and m.live:
                parts.append(self.entry(m))
            else:
                removed.append(peer_id)
        head = pb.SwarmView(epoch=snap.epoch, delta_from=since, removed=removed)
        return head.SerializeToString() + b"".join(parts) + snap.tail

    def delta_field(self, membership: Membership, snap: ViewSnapshot, since: int
                    ) -> bytes | None:
        """`delta` framed as HeartbeatReply.view, made once per (snapshot, `since`): the
        peers that hold one epoch all get the same bytes, and a heartbeat stays O(1)."""
        if self._deltas_of is not snap:
            self._deltas_of, self._deltas, self._delta_bytes = snap, {}, 0
        if since in self._deltas:
            return self._deltas[since]
        raw = self.delta(membership, snap, since)
        field = None if raw is None else _framed(5, raw)
        self._deltas[since] = field
        self._delta_bytes += len(field or b"")
        while self._delta_bytes > MAX_DELTA_BYTES and len(self._deltas) > 1:  # oldest first
            self._delta_bytes -= len(self._deltas.pop(next(iter(self._deltas))) or b"")
        return field
