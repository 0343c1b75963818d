"""Member: one peer as the coordinator knows it.

The record the coordinator's modules share: coordinator/membership.py keeps one per peer (live
and recently departed), coordinator/stages.py sums and attests them per stage, views, reach,
the store and /metrics read them. It lives apart from Membership so that the modules Membership
is built from (stages.py, traffic.py, departure.py) can name it without importing Membership.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.coordinator_client import READY_STATES, Benchmark, PeerStats

HEALTHY_STATES = frozenset(READY_STATES)


@dataclass(slots=True)
class Member:
    """One peer as the coordinator knows it."""

    peer_id: str
    public_key: bytes
    address: str
    stage: int
    state: str
    benchmark: Benchmark
    joined_at: float
    last_seen: float
    lease_expires: float
    cert_expires: float = 0.0
    stats: PeerStats = field(default_factory=PeerStats)
    live: bool = True
    pending_action: str = ""  # "" | "move": delivered with the next heartbeat reply
    beat_tokens: float = -1.0  # heartbeat rate limit (service.py); < 0 until the first beat
    beat_at: float = 0.0
    # reachability (coordinator/reach.py; not persisted: a restarted coordinator checks again)
    reach: str = ""  # "" not checked yet | "direct" | "relayed" | "unreachable"
    relay: bool = False  # offers to relay for unreachable peers (shoal peer --relay)
    relayed_by: str = ""  # the relay `address` is a port of (HeartbeatRequest.relayed_by)
    has_leaf: bool = False  # holds a swarm TLS leaf (sent a CSR at join): serves mTLS off-host
    relay_told: str = ""  # the relay this member was last told to attach to
    # placed by an operator (a stage hint honoured under trust_stage_hints, the lab's --place):
    # relay-aware placement never moves it (not persisted)
    placed: bool = False

    @property
    def throughput(self) -> float:
        """Measured samples/s once the peer reports it, its join benchmark until then."""
        measured = self.stats.samples_per_s
        return measured if measured > 0 else self.benchmark.samples_per_s
