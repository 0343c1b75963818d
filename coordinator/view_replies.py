"""View replies: the swarm view the coordinator's replies carry, built rarely, serialized once.

coordinator/service.py asks here what view bytes to append to a JoinReply or HeartbeatReply and
what to answer GetSwarmView; coordinator/views.py builds the bytes. The rules, and why:

- A heartbeat carries the swarm view only when the peer's known epoch is stale: to a client that
  applies them (HeartbeatRequest.view_deltas), only what changed since its known epoch.
- Views are built at most every VIEW_MIN_INTERVAL_S (a burst of joins would otherwise rebuild a
  thousand-peer view per heartbeat); a view carries its own epoch, so a peer sent a slightly
  older view simply receives the newer one on a later heartbeat.
- Each view is serialized once: a reply is a small message followed by the cached bytes of its
  `view` field (protobuf merges concatenated messages, so the peer parses an ordinary reply).
  Copying a thousand-peer view into every reply instead costs ~0.3 ms per heartbeat during a
  join storm.
- Views carry the stats a router needs (state, samples/s, queue, step, loss), not byte counters:
  the full numbers are on the HTTP status API. Stats change without moving the epoch, so a view
  asked for by GetSwarmView is also rebuilt once it is VIEW_STATS_MAX_AGE_S old (a swarm whose
  membership never changes would otherwise serve the steps and gradient norms of its start).
- In large swarms the views sent with Join and Heartbeat replies stay under a byte budget
  (coordinator/pacing.py's ViewBudget); a reply that finds it spent goes without.

Runs on the event loop only, like everything that reads Membership.
"""

from __future__ import annotations

import math
import time

from coordinator.membership import Membership
from coordinator.pacing import ViewBudget
from coordinator.views import ViewCache, ViewSnapshot
from protocols import shoal_pb2 as pb

VIEW_MIN_INTERVAL_S = 0.25
VIEW_STATS_MAX_AGE_S = 1.0


class ViewReplies:
    """The current view snapshot of one membership, and the view bytes each reply gets."""

    def __init__(self, membership: Membership, swarm_id: str) -> None:
        self.membership = membership
        self.swarm_id = swarm_id
        self.budget = ViewBudget()  # view bytes per second sent in large swarms
        self.sent = {"bytes": 0, "whole": 0, "deltas": 0}  # in replies, since the start
        self._view: ViewSnapshot | None = None
        self._cache = ViewCache()  # members' serialized view entries (coordinator/views.py)

    def view(self, now: float, max_age_s: float = VIEW_MIN_INTERVAL_S,
             stats_max_age_s: float = math.inf) -> ViewSnapshot:
        """The swarm view, rebuilt when the epoch moved (at most every `max_age_s`) or when its
        stats are older than `stats_max_age_s`."""
        snap = self._view
        if snap is None or (now - snap.built_at >= max_age_s
                            and (snap.epoch != self.membership.epoch
                                 or now - snap.built_at >= stats_max_age_s)):
            snap = self._view = self._cache.snapshot(self.membership, self.swarm_id, now)
        return snap

    def build(self) -> pb.SwarmView:
        """The current membership as a SwarmView message (live members only)."""
        return pb.SwarmView.FromString(self._cache.build(self.membership, self.swarm_id))

    def for_join(self, now: float) -> bytes:
        """The view field to append to a JoinReply; b"" when the budget is spent (the peer's
        heartbeats will get one)."""
        view = self.view(now)
        if not self.budget.take(len(view.join_field), time.monotonic(),
                                self.membership.live_count()):
            return b""
        self._count(len(view.join_field), delta=False)
        return view.join_field

    def for_heartbeat(self, now: float, known_epoch: int, deltas: bool) -> bytes:
        """The view field to append to a HeartbeatReply for a peer that knows `known_epoch`
        (0: none) and applies deltas when `deltas`: b"" when it is current or the budget is
        spent; else what changed since its epoch, or the whole view."""
        if known_epoch == self.membership.epoch or self.budget.empty(
                time.monotonic(), self.membership.live_count()):
            return b""
        view = self.view(now)
        if view.epoch == known_epoch:
            return b""
        field = (self._cache.delta_field(self.membership, view, known_epoch)
                 if deltas and known_epoch else None)
        field = field or view.heartbeat_field
        if not self.budget.take(len(field), time.monotonic(), self.membership.live_count()):
            return b""
        self._count(len(field), delta=field is not view.heartbeat_field)
        return field

    def for_request(self, now: float) -> bytes:
        """GetSwarmView's reply: asked for, so as fresh as is cheap, stats included."""
        raw = self.view(now, max_age_s=0.05, stats_max_age_s=VIEW_STATS_MAX_AGE_S).raw
        self._count(len(raw), delta=False)
        return raw

    def _count(self, n_bytes: int, *, delta: bool) -> None:
        """Count a view (or delta) of `n_bytes` sent in a reply (/metrics; bench.coordinator)."""
        self.sent["bytes"] += n_bytes
        self.sent["deltas" if delta else "whole"] += 1
