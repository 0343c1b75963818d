"""Failure detection from neighbours' reports (issue #19).

A paced coordinator gives a large swarm slow heartbeats and leases to match (coordinator/
pacing.py): at a 10 s beat, a killed replica stays in the view for a lease of ten beats, and the
drivers and sync rounds that call it keep trying it. Its neighbours know much sooner: its address
refuses their calls (peer/pipeline/unreachable.py), and their heartbeats say so
(`HeartbeatRequest.unreachable`).

A report alone removes no one: a member is expired on a report only when it has also been
silent for SILENT_BEATS of its own heartbeat periods (the period that goes with the lease it was
last given). So a peer that lies about others can at most hurry the loss of a member that has
missed its beats anyway, and a member whose beats arrive is never touched, whoever reports it. A
member expired this way that was only cut off from its neighbours re-joins with its next beat
and keeps its stage and counters (Membership.join).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.membership import Membership

#: a reported member is expired once it missed this many of its own beats
SILENT_BEATS = 2.0
#: the most peer ids one heartbeat may report (peer/pipeline/unreachable.py sends no more)
MAX_REPORTED = 16


def expire_reported(membership: Membership, reporter: str, reported: Sequence[str],
                    now: float, grace_s: float = 0.0) -> list[str]:
    """Expire the members in `reported` (by `reporter`, a live member) that are silent for
    SILENT_BEATS of their periods plus `grace_s` (the coordinator's own lag, as for a lapsed
    lease); the others are left alone. Returns the expired ids."""
    spec = membership.spec.membership
    out = []
    for peer_id in reported[:MAX_REPORTED]:
        m = membership.get(peer_id)
        if peer_id == reporter or m is None or not m.live:
            continue
        period = (m.lease_expires - m.last_seen) * spec.heartbeat_s / spec.lease_s
        silent = now - m.last_seen
        if silent < SILENT_BEATS * period + grace_s:
            continue
        membership.counters["reported_lost"] += 1
        membership.expire(peer_id, f"unreachable (reported by peer {reporter}), silent for "
                                   f"{silent:.1f} s ({silent / period:.1f} heartbeats)", now)
        out.append(peer_id)
    return out
