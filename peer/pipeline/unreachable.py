"""The peers this peer could not reach since its last heartbeat, reported to the coordinator.

At scale the coordinator paces heartbeats slower and leases grow with them (coordinator/pacing.py:
a 10 s beat carries a lease of ten of them), so a killed replica would stay in every view for
that long, and every driver and sync round would try it first. The peers that call it learn
sooner: a connection refused (gRPC UNAVAILABLE) is what a dead process looks like from a
neighbour (a frozen or slow one accepts and then times out, and is not reported). So the
driver's hops, its EndSteps and the sync rounds `note` a peer that refused them, and the next
heartbeat carries what was noted (`take`); the coordinator expires a reported member only once
it has also missed its own heartbeats (coordinator/suspicion.py), so a report alone removes no
one.
"""

from __future__ import annotations

import grpc

#: the most peers one heartbeat names (the coordinator reads no more than that either)
MAX_REPORTED = 16


class UnreachableLog:
    """Peer ids that refused a call since the last `take`, oldest first, at most MAX_REPORTED."""

    def __init__(self) -> None:
        self._ids: dict[str, None] = {}

    def note(self, peer_id: str) -> None:
        if peer_id in self._ids or len(self._ids) >= MAX_REPORTED:
            return
        self._ids[peer_id] = None

    def note_error(self, peer_id: str, exc: BaseException) -> None:
        """`note` the peer when `exc` says its address refused the call."""
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.note(peer_id)

    def take(self) -> list[str]:
        out, self._ids = list(self._ids), {}
        return out

    def __len__(self) -> int:
        return len(self._ids)
