"""Verified SPSA, the coordinator's half: who recomputes whose contribution, and the verdict.

A contribution is (step, peer, seed, codes), and the seed and the batch are derived from shared
information (run, step, peer, j; the peer's data shard), so any stage-0 peer holding the step's
weights can recompute it (ALGORITHMS.md §6b). With `sync.spsa.verify = p` the coordinator assigns
each step's contributions to verifiers, each verifier recomputes its assigned contributions in
the same step as its own (the step's weights are still in place everywhere, since no replica
applies step t before the coordinator closes it) and posts the codes it got with its own post;
`SpsaLedger.close_due` then strikes every contribution whose recomputation contradicts it, before
any replica sees the closed set, so every replica applies the same, verified set.

Selection. Time is cut into windows of W = round(1/p) steps. In each window every contributor is
checked at exactly one step, at a position drawn from a keyed hash (blake2b with a key the
coordinator draws at start and never sends); its verifier is drawn the same way among the other
stage-0 members. A contributor the coordinator has not seen before is on probation: checked at
every step until it passes PROBATION checks, so a peer that joins (or rejoins under a new
identity) to lie is caught at its first step. Past probation a contributor that lies at every
step is caught within W steps, a single lie is checked with probability 1/W, and since neither
the selection nor the passing verdicts are published (only flags are), a contributor cannot tell
which of its steps are checked. The verifier learns its assignment when it starts the step
(`SpsaLedgerReply.check_peers`), before the contributor has posted, and works on it while
computing its own contribution. A flagged
contributor becomes a suspect: every contribution of it is checked (by a drawn verifier) until
it passes SUSPECT_CLEAR checks in a row (a failed check starts the count again).

Verdict. The verifier encodes its recomputed g exactly as the contributor must have (the
ledger's scale, the seed's dither), so an honest pair of codes is equal up to floating-point
noise moving g across a code boundary; a code further than `tolerance` from the recomputed one
is a lie (`consistent`). Recomputations made on another batch (the two peers' views of the
stage-0 set differed, so their shard arithmetic did) are inconclusive and ignored.

Limits: the verifier is trusted for the contributions it is assigned: a lying verifier can strike
an honest contribution (that costs the step one direction and makes the victim a suspect, whose
later checks go to other verifiers), and a verifier colluding with the contributor can pass a lie.
A contributor that abstains (no codes) is never checked; one whose microbatches did not all
finish abstains while verification is on, so that its batch is the one a verifier rebuilds.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

SUSPECT_CLEAR = 20  # passed checks in a row that clear a suspect
PROBATION = 3  # a contributor the ledger has not seen yet is checked at its first steps


def consistent(posted: bytes, recomputed: bytes, tolerance: int) -> bool:
    """Whether every int8 code of `posted` is within `tolerance` of the recomputed one."""
    if len(posted) != len(recomputed):
        return False
    signed = [(a - 256 if a > 127 else a, b - 256 if b > 127 else b)
              for a, b in zip(posted, recomputed, strict=True)]
    return all(abs(a - b) <= tolerance for a, b in signed)


@dataclass
class VerifyStats:
    """What verification did so far (for the coordinator's log, metrics and the bench)."""

    assigned: int = 0  # contributions assigned to a verifier
    checked: int = 0  # contributions that got a comparable recomputation
    flagged: int = 0  # of those, contradicted and struck
    inconclusive: int = 0  # recomputed on another batch (views differed)
    missing: int = 0  # assigned, contributor posted codes, no recomputation came
    flagged_by_peer: dict[str, int] = field(default_factory=dict)


class Verification:
    """Assignments, suspects and verdicts of verified SPSA (see the module docstring)."""

    def __init__(self, fraction: float, tolerance: int, key: bytes | None = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"verify fraction must be in (0, 1], got {fraction}")
        self.window = max(1, round(1.0 / fraction))
        self.tolerance = tolerance
        self._key = key if key is not None else secrets.token_bytes(16)
        self._assign: dict[int, dict[str, str]] = {}  # step -> contributor -> verifier
        self._members: dict[int, set[str]] = {}  # step -> members the assignment considered
        self.suspects: dict[str, int] = {}  # peer -> passes still needed to clear
        self._seen: set[str] = set()  # contributors past their arrival (probation given)
        self.stats = VerifyStats()

    def _draw(self, *parts: object) -> int:
        h = hashlib.blake2b(key=self._key, digest_size=8, person=b"shoal-spsa-vrfy")
        for p in parts:
            b = str(p).encode()
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        return int.from_bytes(h.digest(), "little")

    def assignment(self, step: int, stage0: list[str]) -> dict[str, str]:
        """contributor -> verifier at `step`. Fixed for the members it was first asked with;
        a member listed later in the same step (it joined meanwhile) is added then."""
        out = self._assign.setdefault(step, {})
        known = self._members.setdefault(step, set())
        members = sorted(set(stage0))
        new = [x for x in members if x not in known]
        if not new:
            return out
        known.update(new)
        for x in new:  # newcomers start on probation: checked until PROBATION passes
            if x not in self._seen:
                if len(self._seen) >= 100_000:
                    self._seen.clear()
                self._seen.add(x)
                self.suspects.setdefault(x, PROBATION)
        if len(members) >= 2:
            w = self.window
            for x in new:
                if x in self.suspects or self._draw("when", step // w, x) % w == step % w:
                    others = [m for m in members if m != x]
                    out[x] = others[self._draw("who", step, x) % len(others)]
                    self.stats.assigned += 1
        return out

    def checks_for(self, verifier: str, step: int, stage0: list[str]) -> list[str]:
        """The contributors `verifier` recomputes at `step`, sorted."""
        return sorted(x for x, v in self.assignment(step, stage0).items() if v == verifier)

    def assigned(self, step: int, contributor: str, verifier: str) -> bool:
        return self._assign.get(step, {}).get(contributor) == verifier

    def judge(self, step: int, posted: dict[str, bytes], shards: dict[str, tuple[int, int]],
              checks: dict[str, tuple[str, bytes, tuple[int, int]]]) -> list[str]:
        """The contributors of a closing step to strike; updates suspects and stats.

        posted: contributor -> codes (non-empty); shards: contributor -> its (shard, shards);
        checks: contributor -> (verifier, recomputed codes, the (shard, shards) it used)."""
        flagged = []
        for x, vcheck in sorted(self._assign.pop(step, {}).items()):
            if x not in posted:
                continue  # abstained or absent: nothing applied, nothing to check
            got = checks.get(x)
            if got is None or got[0] != vcheck:
                self.stats.missing += 1
                continue
            _, codes, used = got
            if shards.get(x) != used:
                self.stats.inconclusive += 1
                continue
            self.stats.checked += 1
            if consistent(posted[x], codes, self.tolerance):
                left = self.suspects.get(x)
                if left is not None:
                    if left <= 1:
                        del self.suspects[x]
                    else:
                        self.suspects[x] = left - 1
                continue
            flagged.append(x)
            self.stats.flagged += 1
            self.stats.flagged_by_peer[x] = self.stats.flagged_by_peer.get(x, 0) + 1
            self.suspects[x] = SUSPECT_CLEAR
        self._members.pop(step, None)
        for old in [s for s in self._assign if s < step]:
            del self._assign[old]
            self._members.pop(old, None)
        return flagged
