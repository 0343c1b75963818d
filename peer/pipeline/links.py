"""What the SkipPipe planner needs to know about each replica, measured by the sender on its own
calls: compute time, link latency, link bandwidth and the queue there (ALGORITHMS.md §2: a hop
costs latency + bytes/bandwidth, a forward its compute time).

The router (peer/pipeline/router.py) measures each replica's *whole-call* speed, network and
queue included, which is what SWARM's choice of the next replica needs. A plan needs them apart:
the planner adds link time between hops itself, and a replica that is far away is a worse
choice for a long path than one that is merely slow. Three measurements give them apart:

- **compute**: a replica answers every Forward and Backward with the seconds its compute thread
  spent on the call (reply header meta `compute_s`, peer/services.py), the seconds from having
  the whole request to sending the reply (`server_s`: its wait for the compute thread too) and
  how many calls were still queued or running there (`queued`). Forward compute per sample is an
  EMA of `compute_s`.
- **latency**: every step, the driver's EndStep to each replica comes back with the seconds the
  replica spent answering it (`StepDone.server_s`); the round trip less that is two one-way
  latencies of a message of a few hundred bytes. One-way latency is an EMA of half of it.
- **bandwidth**: a tensor call's network time is its wall time less `server_s`: two latencies
  plus the bytes of request and reply over the link's bandwidth. With the latency known, what is
  left is the transfer: bandwidth = bytes / (network time - 2 x latency). When that is too small
  to measure (a fast link), the bandwidth is taken as infinite; when no latency has been measured
  yet, all the network time counts as transfer, which makes the link time of a message of the
  size measured right either way.

All are EMAs (alpha 0.2) per replica; nothing reads a clock here (times are passed in). A
replica never measured gets zero latency, infinite bandwidth and no compute figure (the planner
then uses the router's whole-call estimate), i.e. exactly what the planner assumed before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

ALPHA = 0.2
#: reply header meta keys a replica fills in (peer/services.py)
COMPUTE_S = "compute_s"
SERVER_S = "server_s"
QUEUED = "queued"
#: network time below this share of a call's wall time is noise, not a measurable transfer
_MEASURABLE = 1e-4


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1.0 - ALPHA) * old + ALPHA * new


@dataclass
class LinkTiming:
    """A replica as a plan sees it (the fields of paths.ReplicaTiming it fills)."""

    forward_s: float | None  # one forward of the asked samples there; None: not measured
    latency_s: float = 0.0  # one way
    bandwidth_Bps: float = math.inf
    queued: int = 0  # calls queued or running there at its last reply


@dataclass
class _Replica:
    forward_per_sample: float | None = None
    rtt_s: float | None = None
    seconds_per_byte: float | None = None  # EMA; its inverse is the bandwidth
    queued: int = 0


class LinkEstimates:
    """Per-replica compute, latency and bandwidth from this sender's calls (module docstring)."""

    def __init__(self) -> None:
        self._peers: dict[str, _Replica] = {}

    def _get(self, peer_id: str) -> _Replica:
        return self._peers.setdefault(peer_id, _Replica())

    def record_round_trip(self, peer_id: str, wall_s: float, server_s: float) -> None:
        """A small call (EndStep) took `wall_s` here, of which the replica spent `server_s`."""
        if not (math.isfinite(wall_s) and math.isfinite(server_s)) or server_s < 0:
            return
        r = self._get(peer_id)
        r.rtt_s = _ema(r.rtt_s, max(0.0, wall_s - server_s))

    def record_call(self, peer_id: str, kind: str, samples: int, wall_s: float,
                    meta: Mapping[str, str], nbytes: int) -> None:
        """A Forward or Backward of `samples` took `wall_s`, moved `nbytes` (request and reply)
        and its reply header carried `meta`. A reply without the figures (an older peer, a sync
        mode's own stream) changes nothing; a figure that does not parse is ignored."""
        try:
            compute_s = float(meta.get(COMPUTE_S, "nan"))
            server_s = float(meta.get(SERVER_S, "nan"))
            queued = int(meta.get(QUEUED, "0"))
        except (TypeError, ValueError):
            return
        if (not (math.isfinite(compute_s) and math.isfinite(server_s))
                or not 0.0 <= compute_s <= server_s <= wall_s + 1e-3 or samples <= 0):
            return
        r = self._get(peer_id)
        r.queued = max(0, queued)
        if kind == "forward":
            r.forward_per_sample = _ema(r.forward_per_sample, compute_s / samples)
        network = wall_s - server_s - (r.rtt_s or 0.0)
        if nbytes > 0:
            per_byte = max(network, 0.0) / nbytes if network > _MEASURABLE * wall_s else 0.0
            r.seconds_per_byte = _ema(r.seconds_per_byte, per_byte)

    def timing(self, peer_id: str, samples: int) -> LinkTiming:
        r = self._peers.get(peer_id)
        if r is None:
            return LinkTiming(None)
        forward = None if r.forward_per_sample is None else r.forward_per_sample * samples
        spb = r.seconds_per_byte
        bandwidth = math.inf if not spb else 1.0 / spb
        return LinkTiming(forward, (r.rtt_s or 0.0) / 2.0, bandwidth, r.queued)

    def keep_only(self, peer_ids: set[str]) -> None:
        """Forget the replicas that left the view."""
        for gone in set(self._peers) - peer_ids:
            del self._peers[gone]
