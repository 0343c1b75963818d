"""The SPSA ledger the coordinator keeps: which (step, peer, codes) messages each step contains.

Shared-seed SPSA (ALGORITHMS.md §4) needs exactly one piece of agreement: the *set* of messages
M_t of step t. Every replica of every stage applies M_t (peer/sync/spsa.py), and the scale of the
codes of step t+1 is a function of M_1..M_t, so two replicas that applied different sets would
drift apart for good. This store fixes M_t and keeps the history for replicas that replay it.

Closure rule. A stage-0 replica posts its codes of step t (or abstains, with no codes) and the
stage-0 replicas it expects to post t; the driver sends an empty list, and the coordinator's
service then fills in the stage-0 members it sees training. Step t closes when every expected
replica has posted, or `timeout_s` after its first post (a replica that died mid-step is a
missing direction, nothing worse). Steps close in order; a post for a closed step changes
nothing and gets the closed set back, so a late replica applies what everyone applied.

Bounds (issue #12): a post is for the open step only, the ledger's next step or the one after
it (a driver a step ahead of a slow peer); anything further is refused. Each peer posts once per
step: the same codes again are a retry and change nothing, other codes are refused. A post that
would start the ledger afresh (nothing held yet: the coordinator restarted, the run resumed from
exported weights; or nothing open and the post beyond the open steps: stage 0 was rebuilt from
a snapshot) is taken only up to `max_start`, the coordinator's attested swarm step + 2: a post
with step 1e15 cannot wipe the history. Only while the ledger holds nothing, a start up to
START_SLACK steps further is asked to retry (`LedgerBehind`): after a coordinator restart its
attested step may lag a driver's for a heartbeat. Older steps cannot be replayed from here.

Verified SPSA (`sync.spsa.verify` = p > 0, coordinator/spsa_verify.py): the ledger assigns
some contributions of each step to other stage-0 peers, which post their recomputations with
their own codes; when the step closes, a contribution its recomputation contradicts is struck
from the closed set and listed in `flagged`, so no replica ever applies it; with
`sync.spsa.verify_repair` the struck direction stays in the set with the verifier's codes instead
(the step keeps N directions, as if the contributor had been honest). The closure rule is
unchanged: a verifier is an expected poster anyway, so the step waits for its checks.

Torch-free, like everything in coordinator/: messages are peer ids and int8 codes, kept as
bytes. The ledger holds the last `keep_steps` closed steps in memory (a late joiner needs only
the steps since the replica snapshot it downloads, at most sync.spsa.hash_every old), and the
coordinator's journal persists each closed step (`take_unsaved`, coordinator/store.py's `spsa`
table), so a restarted coordinator goes on from its last saved step (`restore`) and a replica
that missed steps across the restart still replays them instead of downloading its stage. A
SIGKILL loses at most the steps of the journal's last few seconds; then the first post beyond
the saved steps starts the ledger afresh, as before.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.spsa_verify import Verification
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import READY_STATES

if TYPE_CHECKING:
    from coordinator.membership import Membership

MAX_EXPECT = 4096  # stage-0 replicas one post may name
START_SLACK = 10_000  # steps past max_start a (re)start may be retried for (see LedgerBehind)


class LedgerRefused(ValueError):
    """A post the ledger cannot take (bad codes, bad step); the message says why."""


class LedgerBehind(LedgerRefused):
    """A (re)start a little beyond what the coordinator attests: most likely the coordinator's
    view of the swarm's step lags (it just restarted and the driver's heartbeat is on its way),
    so the poster should retry shortly (the service answers UNAVAILABLE, which clients retry);
    a liar retries forever and changes nothing."""


@dataclass(frozen=True)
class ClosedStep:
    """The message set of one closed step: peers in sorted order, J codes each."""

    step: int
    peers: tuple[str, ...]
    codes: bytes  # len(peers) * directions int8 codes, peer-major
    flagged: tuple[str, ...] = ()  # verified SPSA: struck from peers and codes


@dataclass
class _OpenStep:
    opened_at: float
    expected: set[str] = field(default_factory=set)
    posted: dict[str, bytes] = field(default_factory=dict)
    shards: dict[str, tuple[int, int]] = field(default_factory=dict)
    # contributor -> (verifier, recomputed codes, the (shard, shards) it used)
    checks: dict[str, tuple[str, bytes, tuple[int, int]]] = field(default_factory=dict)


class SpsaLedger:
    """Closes SPSA steps and keeps the recent history (see the module docstring)."""

    def __init__(self, directions: int, timeout_s: float, keep_steps: int = 10_000,
                 verify: float = 0.0, tolerance: int = 2, key: bytes | None = None,
                 repair: bool = False) -> None:
        if directions < 1:
            raise ValueError(f"directions must be >= 1, got {directions}")
        self.directions = directions
        #: verified SPSA (sync.spsa.verify > 0): assignments, verdicts, suspects
        self.verification = Verification(verify, tolerance, key) if verify > 0 else None
        self.repair = repair  # sync.spsa.verify_repair
        self.timeout_s = timeout_s
        self.keep_steps = keep_steps
        self.base_step = 1  # first step held
        self.next_step = 1  # first step not closed
        self._closed: list[ClosedStep] = []  # increasing steps
        self._open: dict[int, _OpenStep] = {}
        self.started = False
        # for the journal: steps closed since the last `take_unsaved`, and whether the saved
        # history must be dropped first (the ledger started afresh)
        self._unsaved: list[ClosedStep] = []
        self._reset = False

    def restore(self, closed: list[ClosedStep]) -> None:
        """Go on from persisted closed steps (consecutive, increasing), after a restart."""
        closed = closed[-self.keep_steps:]
        for i in range(len(closed) - 1, 0, -1):  # only the newest consecutive run is usable
            if closed[i].step != closed[i - 1].step + 1:
                closed = closed[i:]
                break
        if not closed:
            return
        self.started = True
        self._closed = list(closed)
        self.base_step = closed[0].step
        self.next_step = closed[-1].step + 1
        self._open.clear()

    def take_unsaved(self) -> tuple[bool, list[ClosedStep]]:
        """(reset, steps) to persist since the last call: with reset, the persisted history is
        dropped first."""
        out = (self._reset, self._unsaved)
        self._reset, self._unsaved = False, []
        return out

    def post(self, step: int, peer: str, codes: bytes, expect: list[str], now: float,
             max_start: int | None = None, shard: tuple[int, int] = (0, 0),
             checks: list[tuple[str, bytes, tuple[int, int]]] | None = None) -> None:
        """Record `peer`'s codes for `step` (empty codes: it abstains). Closed steps ignore it.

        LedgerRefused for a step that is not open (see the module docstring) or a second,
        different post by `peer` for one step. `max_start`: the furthest step the ledger may
        (re)start at (None: any). Verified SPSA: `shard` is the poster's (shard, shards);
        `checks` its recomputations (contributor, codes, (shard, shards) used) of the
        contributions it was assigned; others are ignored."""
        for contributor, recomputed, _ in checks or []:
            if len(recomputed) != self.directions:
                raise LedgerRefused(f"a check of {contributor:.40} must carry {self.directions} "
                                    f"codes, got {len(recomputed)}")
        if len(codes) not in (0, self.directions):
            raise LedgerRefused(f"codes must be {self.directions} bytes (one int8 per direction, "
                                f"sync.spsa.samples_per_step) or empty, got {len(codes)}")
        if len(expect) > MAX_EXPECT:
            raise LedgerRefused(f"expect names {len(expect)} replicas; at most {MAX_EXPECT}")
        if step < 1:
            raise LedgerRefused(f"step must be >= 1, got {step}")
        if not self.started or (step > self.next_step + 1 and not self._open):
            if max_start is not None and step > max_start:
                kind = (LedgerBehind if not self.started and step <= max_start + START_SLACK
                        else LedgerRefused)
                raise kind(
                    f"step {step} is not open: it is beyond the swarm's step (the ledger may "
                    f"start at step {max_start} at most now); post the step you are training")
            self._restart_at(step)
        self.close_due(now)
        if step < self.next_step:
            return  # closed already: the poster will apply the closed set
        if step > self.next_step + 1:
            raise LedgerRefused(f"step {step} is not open: the ledger takes posts for steps "
                                f"{self.next_step} and {self.next_step + 1} only")
        rnd = self._open.setdefault(step, _OpenStep(opened_at=now))
        before = rnd.posted.get(peer)
        if before is not None:
            if before != bytes(codes):
                raise LedgerRefused(f"peer {peer} already posted other codes for step {step}; "
                                    f"one post per peer per step")
            return  # a retry of the same post
        rnd.posted[peer] = bytes(codes)
        rnd.shards[peer] = shard
        if self.verification is not None:
            for contributor, recomputed, used in checks or []:
                if self.verification.assigned(step, contributor, peer):
                    rnd.checks[contributor] = (peer, bytes(recomputed), used)
        rnd.expected.update(expect)
        rnd.expected.add(peer)
        self.close_due(now)

    def close_due(self, now: float) -> None:
        """Close the next steps, in order, while they are complete or past their deadline."""
        while True:
            rnd = self._open.get(self.next_step)
            if rnd is None:
                return
            if not (rnd.expected <= set(rnd.posted) or now - rnd.opened_at >= self.timeout_s):
                return
            flagged: list[str] = []
            if self.verification is not None:
                flagged = self.verification.judge(
                    self.next_step, {p: c for p, c in rnd.posted.items() if c}, rnd.shards,
                    rnd.checks)
            if self.repair:  # a struck direction is applied with its verifier's codes
                for x in flagged:
                    rnd.posted[x] = rnd.checks[x][1]
            peers = tuple(sorted(p for p, c in rnd.posted.items()
                                 if c and (self.repair or p not in flagged)))
            codes = b"".join(rnd.posted[p] for p in peers)
            self._closed.append(ClosedStep(self.next_step, peers, codes, tuple(flagged)))
            self._unsaved.append(self._closed[-1])
            del self._open[self.next_step]
            self.next_step += 1
            if len(self._closed) > self.keep_steps:
                drop = len(self._closed) - self.keep_steps
                del self._closed[:drop]
                self.base_step = self._closed[0].step

    def steps(self, from_step: int, to_step: int = 0, limit: int = 1000) -> list[ClosedStep]:
        """Closed steps in [from_step, to_step) (to_step 0: to the newest), at most `limit`."""
        i = bisect.bisect_left([c.step for c in self._closed], from_step)
        out = []
        for c in self._closed[i:]:
            if (to_step and c.step >= to_step) or len(out) >= limit:
                break
            out.append(c)
        return out

    def checks_for(self, verifier: str, step: int, stage0: list[str]) -> list[str]:
        """The contributions `verifier` recomputes at `step` (an open step), else none."""
        if self.verification is None or not self.next_step <= step <= self.next_step + 1:
            return []
        return self.verification.checks_for(verifier, step, stage0)

    def _restart_at(self, step: int) -> None:
        self.started = True
        self.base_step = self.next_step = step
        self._closed.clear()
        self._open.clear()
        self._reset, self._unsaved = True, []


def training_stage0(membership: Membership) -> list[str]:
    """The stage-0 members the coordinator sees training: whom a step waits for by default."""
    return [m.peer_id for m in membership.live_members()
            if m.stage == 0 and m.state in READY_STATES]


def ledger_reply(ledger: SpsaLedger, from_step: int, to_step: int) -> pb.SpsaLedgerReply:
    """The closed steps [from_step, to_step) as the wire's SpsaLedgerReply."""
    reply = pb.SpsaLedgerReply(next_step=ledger.next_step, base_step=ledger.base_step)
    for c in ledger.steps(from_step, to_step):
        reply.steps.append(pb.SpsaLedgerStep(step=c.step, peers=c.peers,
                                             codes=pb.SpsaCodes(codes=c.codes),
                                             flagged=c.flagged))
    return reply
