"""Heartbeat pacing: the period and lease the coordinator tells each peer (issue #19).

A heartbeat costs the coordinator ~0.6 ms of CPU (gRPC, the Ed25519 check, the handler:
docs/benchmarks.md, bench.coordinator), so a fixed 1 Hz beat stops fitting one core somewhere
past a thousand peers. The coordinator therefore tells every peer, in each JoinReply and
HeartbeatReply, the period to beat at and the lease that goes with it, from the swarm's size and
its own measured cost per beat:

    rate budget  R = min(cpu_budget / cost_per_beat,     (beats/s the coordinator allows itself)
                         max_beats_per_s)
    period       P = max(spec heartbeat_s, live / R)      quantized up to quarter multiples of it
    lease        L = spec lease_s * P / spec heartbeat_s  (covers as many missed beats as the spec)

so the total heartbeat rate stays under R whatever the swarm's size, and a lease still tolerates
the same number of lost beats. `max_beats_per_s` is there because CPU is not the first limit: a
grpc.aio server takes its calls from gRPC core one at a time, each through a hand-off from its
poller thread to the event loop, and on this 2-core machine that accepted ~500-620 calls/s at
5000 peers while the coordinator used a third of a core; past that, calls queue inside gRPC
before any handler (measured: the delay from a heartbeat's signing to the server's
authentication grew to 470-800 ms, the whole of its latency).

Never faster than the run spec's `membership.heartbeat_s`, never slower than `max_heartbeat_s`.
Swarms of at most `min_paced_peers` live members always get the spec's values exactly (every
test swarm and every small run), whatever was measured.

`cost_per_beat` starts at `DEFAULT_CPU_PER_BEAT_S` and follows the measurement the coordinator's
tick feeds in (`observe`: process CPU seconds and heartbeats handled since the last call), an
exponential average over samples of at least `MIN_SAMPLE_BEATS` beats, clamped to a sane range.
Process CPU includes joins, views and the dashboard: a busy coordinator paces its peers slower.

Views: a Join reply, and a heartbeat reply to a peer that knows an old epoch, carry the whole
swarm view, so while the epoch moves (joins, state and reach changes) view bytes grow with N²
(every peer, a view of N members). At 5000 peers a view is ~650 kB and a join storm alone would
push gigabytes: the Join replies queued behind one another, members' leases lapsed before their
first beat got through, and they joined again (measured: 13,843 joins of 5000 peers in a
minute, 61 heartbeats). `ViewBudget` bounds it: in a swarm of more than `min_paced_peers`, the
views sent with Join and Heartbeat replies together stay under VIEW_BYTES_PER_S (a token
bucket); a reply that finds the bucket empty goes without, and the peer gets the view with a
later heartbeat (its known epoch stays old) or asks for it (GetSwarmView). Small swarms are not
limited. A client that applies deltas is sent only what changed since its known epoch
(coordinator/views.py) while few members changed; the budget still bounds the whole views.

Hysteresis: the period rises as soon as the swarm needs it, and falls only when a period at most
`FALL_BELOW` of the current one would do, so a swarm near a boundary does not flap.

Also here, the limits that keep one peer from taking more than its share: `JoinGate` (Joins
admitted at a measured rate, the others told when to retry) and `BeatLimit` (each member's
heartbeat token bucket).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.member import Member

DEFAULT_CPU_PER_BEAT_S = 0.0007  # measured on main before pacing (bench.coordinator, 1000 peers)
CPU_BUDGET = 0.5  # of one core, for heartbeats
MAX_BEATS_PER_S = 250.0  # about half the calls/s the grpc.aio server accepted here (see above)
MIN_PACED_PEERS = 64
MAX_HEARTBEAT_S = 60.0
MIN_SAMPLE_BEATS = 200
COST_RANGE_S = (0.0001, 0.02)
EWMA = 0.3  # weight of a new sample
FALL_BELOW = 0.8
STEPS_PER_PERIOD = 4  # quantization: multiples of heartbeat_s / 4
VIEW_BYTES_PER_S = 5e6  # swarm views sent with Join and Heartbeat replies, all peers together


@dataclass(frozen=True, slots=True)
class Pace:
    """What a peer is told: beat every `heartbeat_s`; the lease lasts `lease_s` from a beat."""

    heartbeat_s: float
    lease_s: float


class Pacer:
    """The coordinator's current pace for its swarm (see the module docstring)."""

    def __init__(self, heartbeat_s: float, lease_s: float, *, cpu_budget: float = CPU_BUDGET,
                 cost_s: float = DEFAULT_CPU_PER_BEAT_S, min_paced_peers: int = MIN_PACED_PEERS,
                 max_heartbeat_s: float = MAX_HEARTBEAT_S,
                 max_beats_per_s: float = MAX_BEATS_PER_S) -> None:
        if not heartbeat_s > 0 or not lease_s > 0:
            raise ValueError(f"heartbeat_s and lease_s must be > 0, got {heartbeat_s}, {lease_s}")
        if not cpu_budget > 0:
            raise ValueError(f"cpu_budget must be > 0, got {cpu_budget}")
        if not max_beats_per_s > 0:
            raise ValueError(f"max_beats_per_s must be > 0, got {max_beats_per_s}")
        self.max_beats_per_s = max_beats_per_s
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
        """Heartbeats per second the coordinator allows itself: at the measured cost, and at
        most `max_beats_per_s`."""
        return min(self.cpu_budget / self.cost_s, self.max_beats_per_s)

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

    def update(self, live: int) -> Pace:
        """Recompute the current pace for `live` members (rises at once, falls with
        hysteresis) and return it."""
        want = self.target(live)
        if want.heartbeat_s > self.pace.heartbeat_s or live <= self.min_paced_peers or \
                want.heartbeat_s <= FALL_BELOW * self.pace.heartbeat_s:
            self.pace = want
        return self.pace


class ViewBudget:
    """A token bucket of swarm-view bytes per second, for large swarms (see the module
    docstring). It holds one second's worth, or one view if a view is bigger than that."""

    def __init__(self, bytes_per_s: float = VIEW_BYTES_PER_S,
                 min_peers: int = MIN_PACED_PEERS) -> None:
        self.bytes_per_s = bytes_per_s
        self.min_peers = min_peers
        self.tokens = bytes_per_s
        self.at: float | None = None
        self.withheld = 0  # views not sent for want of budget (for the tests and the bench)

    def empty(self, now: float, live: int) -> bool:
        """Whether nothing at all may go out now (a reply then goes without a view, counted
        as withheld, before anything is made for it)."""
        if live <= self.min_peers or self.at is None:
            return False
        if self.tokens + max(0.0, now - self.at) * self.bytes_per_s >= 1.0:
            return False
        self.withheld += 1
        return True

    def take(self, n_bytes: int, now: float, live: int) -> bool:
        """Whether a view of `n_bytes` may go out now (`now`: a monotonic clock)."""
        if live <= self.min_peers:
            return True
        cap = max(self.bytes_per_s, float(n_bytes))
        if self.at is not None:
            self.tokens = min(cap, self.tokens + max(0.0, now - self.at) * self.bytes_per_s)
        self.at = now
        if self.tokens >= n_bytes:
            self.tokens -= n_bytes
            return True
        self.withheld += 1
        return False


# ---------------------------------------------------------------------- join admission

MAX_JOINS_IN_FLIGHT = 64  # Joins admitted and not answered yet (waiting for the journal)
JOIN_LAG_LIMIT_S = 0.5  # the event loop this late: new Joins are turned away
JOIN_CPU_BUDGET = 0.5  # of one core, for Joins
JOIN_RATE_START = 100.0  # Joins/s (5 ms each) until measured
JOIN_COST_RANGE_S = (0.0005, 0.05)  # so the rate stays within 10..1000 Joins/s
JOIN_BURST_S = 0.5
MIN_SAMPLE_JOINS = 20
RETRY_AFTER_RANGE_S = (0.2, 60.0)
# the retry slots handed out reach at most this far ahead: a client keeps trying for 300 s
# (CoordinatorClient.join's retry_s), so one that is told to come back at most 60 s later and
# then admitted at its slot never gives up; a longer queue raises the admission rate instead
JOIN_HORIZON_S = 60.0
# the joiners waiting are all admitted within this long of the oldest one's first refusal (the
# client's 300 s retry window less a margin): the gate admits at least (how many wait) / (the
# time left of it), never counting on less than JOIN_MIN_LEFT_S
JOIN_WINDOW_S = 240.0
JOIN_MIN_LEFT_S = 20.0
MAX_JOIN_RATE = 1000.0
MAX_WAITING = 100_000  # joiners remembered as waiting (a bound on what strangers can fill)
STORM_GRACE_S = 10.0  # how long after the last Join turned away the coordinator counts as busy


class JoinGate:
    """Admission with back-pressure for Join storms (a coordinator restart in front of a large
    swarm: every peer re-joins at once).

    Once the swarm has more than `min_peers` live members (small swarms never meet it), a Join
    is turned away (RESOURCE_EXHAUSTED with a retry-after, coordinator/service.py) while
    `max_in_flight` admitted Joins are still unanswered, while the event loop runs more than
    `lag_limit_s` late, or beyond `rate` Joins per second (a token bucket holding JOIN_BURST_S
    of them). `rate` keeps Joins under JOIN_CPU_BUDGET of a core at the CPU a Join costs, as
    `observe` measures it (JOIN_RATE_START until then). The rate limit matters most: grpc core
    queues calls before any handler sees them, so a storm shows neither as loop lag nor as
    Joins in flight, only as every call (heartbeats too) waiting behind thousands of Joins.
    Turned-away joiners get retry slots `1 / rate` apart, so a storm of N joiners comes back
    spread over about N / rate seconds instead of all at once; the client adds a little jitter.
    The slots reach at most JOIN_HORIZON_S ahead (well inside the client's retry window), and
    while more joiners are waiting (turned away, by key, not admitted since, told to come back
    less than a horizon ago) than `rate` admits in what is left of JOIN_WINDOW_S since the
    oldest of them was first turned away, the gate admits faster, at (joiners waiting) / (time
    left), up to MAX_JOIN_RATE, and spaces their slots to match, rather than let a client's
    window run out: Joins then take more than JOIN_CPU_BUDGET (the heartbeats' leases have storm
    grace meanwhile), but only as much more as the window needs. Simulated
    (tests/coordinator/test_pacing.py): 10,000 joiners at a measured 20 Joins/s all get in
    within the client's 300 s.
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
        self.cost_s = JOIN_CPU_BUDGET / rate
        self.in_flight = 0
        self.turned_away = 0  # total, for /metrics and the tests
        self.admitted = 0  # total, for /metrics
        self.busy_until = 0.0  # monotonic: a Join turned away then, plus STORM_GRACE_S
        self._tokens = max(1.0, rate * JOIN_BURST_S)
        self._at: float | None = None
        self._next_slot = 0.0
        self._waiting: dict[str, float] = {}  # joiner -> the retry slot it was told
        self._told: deque[tuple[float, str]] = deque()  # (slot, joiner), in the order told
        self._first: dict[str, float] = {}  # joiner -> when first turned away (oldest first)

    def admit(self, now: float, live: int, lag_s: float, who: str = "") -> float | None:
        """None: admitted (call `done` when answered); otherwise the seconds to wait before
        retrying. `now`: a monotonic clock; `who`: the joining key's peer id ("" unknown)."""
        if live > self.min_peers:
            rate = self.admit_rate(now)
            if self._at is not None:
                self._tokens = min(max(1.0, rate * JOIN_BURST_S),
                                   self._tokens + max(0.0, now - self._at) * rate)
            self._at = now
            if self.in_flight >= self.max_in_flight or lag_s > self.lag_limit_s or \
                    self._tokens < 1.0:
                self.turned_away += 1
                self.busy_until = now + STORM_GRACE_S
                self._next_slot = min(max(self._next_slot, now) + 1.0 / rate,
                                      now + JOIN_HORIZON_S)
                if who and (who in self._waiting or len(self._waiting) < MAX_WAITING):
                    self._waiting[who] = self._next_slot
                    self._told.append((self._next_slot, who))
                    self._first.setdefault(who, now)
                lo, hi = RETRY_AFTER_RANGE_S
                return min(hi, max(lo, self._next_slot - now))
            self._tokens -= 1.0
            self._waiting.pop(who, None)
            self._first.pop(who, None)
        self.in_flight += 1
        self.admitted += 1
        return None

    def admit_rate(self, now: float) -> float:
        """Joins/s admitted now: `rate`, or faster while more joiners wait for a slot than
        `rate` admits within JOIN_HORIZON_S (see the class docstring)."""
        told, waiting = self._told, self._waiting
        while told and told[0][0] < now - JOIN_HORIZON_S:  # a joiner that gave up, or joined
            slot, who = told.popleft()
            if waiting.get(who) == slot:
                del waiting[who]
                self._first.pop(who, None)
        if not waiting:
            return self.rate
        left = JOIN_WINDOW_S - (now - next(iter(self._first.values())))
        return min(MAX_JOIN_RATE, max(self.rate, len(waiting) / max(JOIN_MIN_LEFT_S, left)))

    def busy(self, now: float) -> bool:
        """Whether the coordinator counts as in a join storm at `now` (monotonic): a Join was
        turned away less than STORM_GRACE_S ago, or joiners told to come back have not yet."""
        self.admit_rate(now)  # forgets the joiners that gave up
        return now < self.busy_until or bool(self._waiting)

    @property
    def waiting(self) -> int:
        """Joiners turned away and not admitted since (for /metrics)."""
        return len(self._waiting)

    def done(self) -> None:
        """An admitted Join was answered."""
        self.in_flight = max(0, self.in_flight - 1)

    def observe(self, cpu_s: float, joins: int) -> None:
        """A measurement: `cpu_s` CPU seconds went to `joins` Joins (service.py: the process's
        CPU in a second with Joins, less its heartbeats' share). Sets `rate`."""
        if joins < MIN_SAMPLE_JOINS or not cpu_s >= 0 or not math.isfinite(cpu_s):
            return
        lo, hi = JOIN_COST_RANGE_S
        self.cost_s += EWMA * (min(hi, max(lo, cpu_s / joins)) - self.cost_s)
        self.rate = JOIN_CPU_BUDGET / self.cost_s


# ---------------------------------------------------------------------- heartbeat rate limit

# Heartbeat rate limit per member, a token bucket: it refills at BEAT_RATE_FACTOR times the
# spec's rate (1 / membership.heartbeat_s) and holds a lease's worth of beats twice over plus
# BEAT_BURST_SLACK (retries, a client catching up after a stall), so an honest peer never
# meets it; a peer beating much faster gets RESOURCE_EXHAUSTED (coordinator/service.py).
BEAT_RATE_FACTOR = 2.0
BEAT_BURST_SLACK = 4.0


class BeatLimit:
    """Each member's heartbeat token bucket, kept on the Member (`beat_tokens`, `beat_at`: a
    re-join does not refill it). A Join by a live member counts as a beat."""

    def __init__(self, heartbeat_s: float, lease_s: float) -> None:
        """`heartbeat_s`, `lease_s`: the run spec's (membership.*), not the paced ones."""
        self.rate = BEAT_RATE_FACTOR / heartbeat_s
        self.burst = 2.0 * lease_s / heartbeat_s + BEAT_BURST_SLACK

    def allow(self, member: Member, now: float) -> bool:
        """Take one token from `member`'s bucket; False (and no token taken) when it is empty.
        Mutates the member's bucket fields."""
        tokens = self.burst if member.beat_tokens < 0 else min(
            self.burst, member.beat_tokens + max(0.0, now - member.beat_at) * self.rate)
        member.beat_at = now
        if tokens < 1.0:
            member.beat_tokens = tokens
            return False
        member.beat_tokens = tokens - 1.0
        return True
