"""Heartbeat pacing: the period and lease the coordinator tells each peer (issue #19).

A heartbeat costs the coordinator ~0.6 ms of CPU (gRPC, the Ed25519 check, the handler:
docs/benchmarks.md, bench.coordinator), so a fixed 1 Hz beat stops fitting one core somewhere
past a thousand peers. The coordinator therefore tells every peer, in each JoinReply and
HeartbeatReply, the period to beat at and the lease that goes with it, from the swarm's size and
its own measured cost per beat:

    rate budget  R = cpu_budget / cost_per_beat          (beats/s the coordinator allows itself)
    period       P = max(spec heartbeat_s, live / R)      quantized up to quarter multiples of it
    lease        L = spec lease_s * P / spec heartbeat_s  (covers as many missed beats as the spec)

so the total heartbeat rate stays under R whatever the swarm's size, and a lease still tolerates
the same number of lost beats. Never faster than the run spec's `membership.heartbeat_s`, never
slower than `max_heartbeat_s`. Swarms of at most `min_paced_peers` live members always get the
spec's values exactly (every test swarm and every small run), whatever was measured.

`cost_per_beat` starts at `DEFAULT_CPU_PER_BEAT_S` and follows the measurement the coordinator's
tick feeds in (`observe`: process CPU seconds and heartbeats handled since the last call), an
exponential average over samples of at least `MIN_SAMPLE_BEATS` beats, clamped to a sane range.
Process CPU includes joins, views and the dashboard: a busy coordinator paces its peers slower.

Views: a heartbeat whose peer knows an old epoch carries the whole swarm view, so while the
epoch moves (joins, state and reach changes) view bytes grow with N² (every peer, a view of N
members, every beat). `view_interval_s` bounds that: a peer gets a view in a heartbeat reply at
most every `live * view_bytes / view_bytes_per_s` seconds (capped at MAX_VIEW_INTERVAL_S), so
the views all peers pull by heartbeat stay under VIEW_BYTES_PER_S; small swarms are not limited.
A peer that needs a fresher view asks for it (GetSwarmView). Views by epoch deltas, which would
remove the N² term, are issue #19's remaining part.

Hysteresis: the period rises as soon as the swarm needs it, and falls only when a period at most
`FALL_BELOW` of the current one would do, so a swarm near a boundary does not flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_CPU_PER_BEAT_S = 0.0007  # measured on main before pacing (bench.coordinator, 1000 peers)
CPU_BUDGET = 0.5  # of one core, for heartbeats
MIN_PACED_PEERS = 64
MAX_HEARTBEAT_S = 60.0
MIN_SAMPLE_BEATS = 200
COST_RANGE_S = (0.0001, 0.02)
EWMA = 0.3  # weight of a new sample
FALL_BELOW = 0.8
STEPS_PER_PERIOD = 4  # quantization: multiples of heartbeat_s / 4
VIEW_BYTES_PER_S = 20e6  # swarm views sent in heartbeat replies, all peers together
MAX_VIEW_INTERVAL_S = 120.0


@dataclass(frozen=True, slots=True)
class Pace:
    """What a peer is told: beat every `heartbeat_s`; the lease lasts `lease_s` from a beat."""

    heartbeat_s: float
    lease_s: float


class Pacer:
    """The coordinator's current pace for its swarm (see the module docstring)."""

    def __init__(self, heartbeat_s: float, lease_s: float, *, cpu_budget: float = CPU_BUDGET,
                 cost_s: float = DEFAULT_CPU_PER_BEAT_S, min_paced_peers: int = MIN_PACED_PEERS,
                 max_heartbeat_s: float = MAX_HEARTBEAT_S) -> None:
        if not heartbeat_s > 0 or not lease_s > 0:
            raise ValueError(f"heartbeat_s and lease_s must be > 0, got {heartbeat_s}, {lease_s}")
        if not cpu_budget > 0:
            raise ValueError(f"cpu_budget must be > 0, got {cpu_budget}")
        self.spec = Pace(heartbeat_s, lease_s)
        self.cpu_budget = cpu_budget
        self.cost_s = cost_s
        self.min_paced_peers = min_paced_peers
        self.max_heartbeat_s = max(max_heartbeat_s, heartbeat_s)
        self.pace = self.spec
        self._cpu_acc = 0.0
        self._beats_acc = 0

    @property
    def budget_per_s(self) -> float:
        """Heartbeats per second the coordinator allows itself at the measured cost."""
        return self.cpu_budget / self.cost_s

    def observe(self, cpu_s: float, beats: int) -> None:
        """Add a measurement: `cpu_s` process CPU seconds spent while `beats` heartbeats were
        handled. Samples are pooled until they hold MIN_SAMPLE_BEATS beats (a handful of beats
        says nothing about their cost: the tick and the dashboard dominate)."""
        if cpu_s < 0 or beats < 0 or not math.isfinite(cpu_s):
            return
        self._cpu_acc += cpu_s
        self._beats_acc += beats
        if self._beats_acc < MIN_SAMPLE_BEATS:
            return
        lo, hi = COST_RANGE_S
        sample = min(hi, max(lo, self._cpu_acc / self._beats_acc))
        self.cost_s += EWMA * (sample - self.cost_s)
        self._cpu_acc, self._beats_acc = 0.0, 0

    def target(self, live: int) -> Pace:
        """The pace `live` members need at the measured cost, without hysteresis."""
        if live <= self.min_paced_peers:
            return self.spec
        base = self.spec.heartbeat_s
        want = live / self.budget_per_s
        if want <= base:
            return self.spec
        factor = math.ceil(want / base * STEPS_PER_PERIOD) / STEPS_PER_PERIOD
        factor = min(factor, self.max_heartbeat_s / base)
        return Pace(base * factor, self.spec.lease_s * factor)

    def view_interval_s(self, live: int, view_bytes: int) -> float:
        """The least time between two views sent to one peer in heartbeat replies (0: no
        limit, small swarms)."""
        if live <= self.min_paced_peers or view_bytes <= 0:
            return 0.0
        return min(MAX_VIEW_INTERVAL_S, live * view_bytes / VIEW_BYTES_PER_S)

    def update(self, live: int) -> Pace:
        """Recompute the current pace for `live` members (rises at once, falls with
        hysteresis) and return it."""
        want = self.target(live)
        if want.heartbeat_s > self.pace.heartbeat_s or live <= self.min_paced_peers or \
                want.heartbeat_s <= FALL_BELOW * self.pace.heartbeat_s:
            self.pace = want
        return self.pace


# ---------------------------------------------------------------------- join admission

MAX_JOINS_IN_FLIGHT = 64  # Joins admitted and not answered yet (waiting for the journal)
JOIN_LAG_LIMIT_S = 0.5  # the event loop this late: new Joins are turned away
JOIN_RATE_START = 100.0  # Joins/s assumed until a back-pressured second measures it
JOIN_RATE_FLOOR = 10.0
RETRY_AFTER_RANGE_S = (0.2, 60.0)
STORM_GRACE_S = 10.0  # how long after the last Join turned away the coordinator counts as busy


class JoinGate:
    """Admission with back-pressure for Join storms (a coordinator restart in front of a large
    swarm: every peer re-joins at once).

    A Join is turned away (RESOURCE_EXHAUSTED with a retry-after, coordinator/service.py) while
    `max_in_flight` admitted Joins are still unanswered or the event loop runs more than
    `lag_limit_s` late, once the swarm has more than `min_peers` live members (small swarms never
    meet it). Turned-away joiners are handed out retry slots `1 / rate` apart, `rate` being the
    Joins per second the coordinator managed in the last second it was turning some away (an
    exponential average; JOIN_RATE_START until measured), so a storm of N joiners comes back
    spread over about N / rate seconds instead of all at once; the client adds its own jitter.
    Heartbeats of joined members are never turned away by this: the gate keeps their latency.
    While it turns Joins away (and STORM_GRACE_S after), the coordinator knows it is behind, so
    it expires no lease that lapsed less than one lease ago (service.py): in a storm a member's
    silence is the coordinator's own queue more often than a dead peer.
    """

    def __init__(self, *, max_in_flight: int = MAX_JOINS_IN_FLIGHT,
                 lag_limit_s: float = JOIN_LAG_LIMIT_S, min_peers: int = MIN_PACED_PEERS,
                 rate: float = JOIN_RATE_START) -> None:
        self.max_in_flight = max_in_flight
        self.lag_limit_s = lag_limit_s
        self.min_peers = min_peers
        self.rate = rate
        self.in_flight = 0
        self.turned_away = 0  # total, for /metrics and the tests
        self._next_slot = 0.0
        self.busy_until = 0.0  # monotonic: a Join turned away then, plus STORM_GRACE_S
        self._admitted_window = 0
        self._turned_window = 0

    def admit(self, now: float, live: int, lag_s: float) -> float | None:
        """None: admitted (call `done` when answered); otherwise the seconds to wait before
        retrying."""
        if live > self.min_peers and (self.in_flight >= self.max_in_flight
                                      or lag_s > self.lag_limit_s):
            self.turned_away += 1
            self.busy_until = now + STORM_GRACE_S
            self._turned_window += 1
            self._next_slot = max(self._next_slot, now) + 1.0 / self.rate
            lo, hi = RETRY_AFTER_RANGE_S
            return min(hi, max(lo, self._next_slot - now))
        self.in_flight += 1
        return None

    def done(self, joined: bool) -> None:
        """An admitted Join was answered (`joined`: it succeeded)."""
        self.in_flight = max(0, self.in_flight - 1)
        self._admitted_window += joined

    def tick(self, seconds: float) -> None:
        """Once a second: learn the Join rate the coordinator sustains under back-pressure."""
        if self._turned_window and self._admitted_window and seconds > 0:
            sample = max(JOIN_RATE_FLOOR, self._admitted_window / seconds)
            self.rate += EWMA * (sample - self.rate)
        self._admitted_window = self._turned_window = 0
