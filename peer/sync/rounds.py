"""Sync rounds: how the replicas of one stage agree on one aggregate per optimizer step.

Design (leader-collects, everyone-applies-the-same-bytes):
- The round's aggregator is the first live replica of the stage in leader order: directly
  reachable replicas before relayed ones, then seniority (earliest joined_at in the swarm view,
  then peer id: peer/consistency.py's `leader_order`; a key that sorts first buys nothing).
  Every other
  replica sends it its contribution over `Sync.Exchange` and waits for the reply.
- The aggregator waits until every replica it expects has contributed, or `timeout` passes, or
  the expected ones leave the swarm view; it then aggregates *in peer-id order* and answers every
  caller with the same serialized aggregate, and `meta["included"]` naming who is in it. A
  contribution that arrives after that gets the same aggregate back (its own gradient is lost,
  its weights stay identical to the others').
- If the aggregator cannot be reached, a replica tries the next candidate; a candidate that is
  itself next in line becomes the aggregator. Replicas that disagreed about the view can then end
  up with two aggregates: the state-hash check in heartbeats catches that, and the replica whose
  hash is not the attested one (or the majority's) re-downloads its stage.
- A replica whose view left the aggregator out finishes the round alone; the aggregator stops
  waiting for it as soon as it contributes to a later round (at a swarm's start, when views
  differ for a second, this used to cost one full timeout).

- Each part carries its sender's state hash from before the round. Replicas at the same step must
  hash equal; the aggregator names those that do not (`meta["diverged"]`, all but the lowest
  id's hash) and they re-download the stage after applying the round. This catches what the
  heartbeat check cannot see on a peer whose swarm view is old (its stats are snapshots). The
  right hash is the coordinator's attested one when it attests step - 1, else the majority's,
  a tie going to the most senior replica (peer/consistency.py's `winning_hash`).
- Parts are keyed by the *signing caller* of Sync.Exchange (peer/authz.py admits only live
  replicas of the stage), never by a field of the message: one part per replica and round.

Invariant: every replica that completes round `step` applies byte-identical aggregate arrays, so
replicas stay bit-identical. A dead or frozen replica delays a round by at most `timeout`, and
once a few rounds have been measured by much less: the aggregator closes a round a few times
the median time its last part took to come in recent complete rounds (peer/pipeline/deadline.py).
A replica left out that way replays the round, and is not waited for in the next rounds until
it is heard from again (any part or replay request of its own): a freeze costs one deadline,
not one per round. One whose port refuses connections (killed) is not waited for at all.

Catch-up by replay: every replica keeps the aggregates of its last KEEP_ROUNDS rounds (at most
KEEP_BYTES of them), each with the state hash it had after applying it (`keep`). A replica that
missed rounds asks the others for them, one round at a time, with a part whose meta is REPLAY
(`fetch`): the holder answers with the kept aggregate and `state_hash_after`, or, when it keeps
none for that round, with meta `not_kept` and its own step (`after_step`), from which the asker
tells "no one is there yet" (it has caught up) from "too old" (it must download the stage).
peer/sync/replay.py applies what comes back.

The arithmetic of each round-based sync mode lives behind `RoundMode` (peer/sync/base.py; the
modes in allreduce.py, demo.py and diloco.py, over the math in optim/); this module knows only its
`aggregate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np

from peer.consistency import leader_order, winning_hash
from peer.pipeline import stalls, wire
from peer.pipeline.deadline import MeasuredDeadline
from peer.pipeline.unreachable import UnreachableLog
from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.sync")

Arrays = dict[str, np.ndarray]
Meta = dict[str, str]
#: the meta `apply` gets on a step where `exchanges(step)` is False
LOCAL_STEP: Meta = {"local": "1"}
#: the contribution of a replica that sits a round out (see `SyncRounds.abstain`)
ABSTAIN: Meta = {"abstain": "1", "samples": "0"}
#: the part of a replica asking for a finished round's aggregate (see `SyncRounds.fetch`)
REPLAY: Meta = {"replay": "1"}
#: how many finished rounds a replica keeps for the replicas that missed them, and the most
#: bytes of aggregates it keeps (a dense allreduce aggregate is the size of the stage's
#: gradients; the newest round is always kept)
KEEP_ROUNDS = 32
KEEP_BYTES = 256 << 20
#: the initial-metadata key an aggregator sends as soon as a round's part is in (see `_send`)
ACK_KEY = "shoal-part-in"
#: how long an aggregator missing parts waits for each missing replica to say whether it
#: closed the round without it (`_closed_elsewhere`)
PROBE_S = 1.0
DEAD_PROBE_AFTER_S = 0.5  # a part this late: ask whether the missing replicas' ports refuse


class SyncFailed(RuntimeError):
    """No aggregator could be reached for this round."""


class RoundAggregator(Protocol):
    """What the rounds use of a sync mode: its name (the byte counter's `sync:<name>`) and its
    aggregate (peer/sync/base.py's `RoundMode.aggregate` documents the contract)."""

    name: str

    def aggregate(self, parts: Mapping[str, tuple[Meta, Arrays]]) -> tuple[Arrays, Meta]: ...


@dataclass
class _Round:
    parts: dict[str, tuple[Meta, Arrays]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: tuple[Arrays, Meta] | None = None
    created: float = field(default_factory=time.monotonic)
    sent_at: dict[str, float] = field(default_factory=dict)  # sender -> its header's sent_at


class SyncRounds:
    """The rounds of one replica's stage; serves `Sync.Exchange` and runs its own side."""

    def __init__(
        self,
        *,
        me: str,
        stage: int,
        mode: RoundAggregator,
        candidates: Callable[[], list[str]],
        exchange_stub: Callable[[str], object],
        departed: Callable[[], set[str]] = set,
        counter: wire.ByteCounter,
        timeout: float,
        max_bytes: int,
        joined: Callable[[], Mapping[str, float]] = dict,
        attested: Callable[[], tuple[int, str]] = lambda: (0, ""),
        step_now: Callable[[], int] = lambda: 0,
        relayed: Callable[[], set[str]] = set,
        unreachable: UnreachableLog | None = None,
    ) -> None:
        self.me = me
        self.unreachable = unreachable  # refusing replicas go to the coordinator (heartbeat)
        self.relayed = relayed  # replicas reached through a relay: last in the leader order
        self.step_now = step_now  # the step this replica is after (told to a replay asker)
        self.joined = joined  # peer id -> joined_at from the swarm view (seniority)
        self.attested = attested  # the coordinator's (step, hash) for this stage
        self.stage = stage
        self.mode = mode
        self.candidates = candidates  # live replicas of this stage, sorted, including me
        self.exchange_stub = exchange_stub  # peer id -> stub.Exchange multicallable
        self.departed = departed  # peers the swarm view says are gone: do not wait for them
        self.counter = counter
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.kind = f"sync:{mode.name}"
        self._rounds: dict[int, _Round] = {}
        # replicas whose part the last round closed without (frozen, cut off, or dead): the
        # next rounds do not wait for them until they are heard from again (any call of theirs)
        self._suspects: set[str] = set()
        self.last_included = 0
        # step -> the stage's replicas as the stage-0 driver listed them for that step: the
        # candidates every replica agrees on (its own view may lag). Falls back to `candidates`.
        self.agreed: dict[int, list[str]] = {}
        # step -> (aggregate, meta with `state_hash_after`): the rounds a laggard may replay
        self._kept: dict[int, tuple[Arrays, Meta]] = {}
        # from the aggregator's own part to the last expected one, in complete rounds
        self.deadline = MeasuredDeadline()
        # from sending a part to the aggregator's acknowledgement of it
        self.ack_deadline = MeasuredDeadline()

    def round_deadline_s(self) -> float:
        """How long the aggregator waits for the parts of a round now."""
        return self.deadline.seconds(self.timeout)

    @property
    def call_timeout_s(self) -> float:
        """How long a member waits for the aggregator's answer before it fails over."""
        return self.timeout * 2 + 10

    def _candidates(self, step: int) -> list[str]:
        agreed = self.agreed.get(step)
        if agreed:
            return leader_order(set(agreed) | {self.me}, self.joined(), self.relayed())
        return self.candidates()

    def _round(self, step: int) -> _Round:
        for old in [s for s in self._rounds if s < step - 4]:
            del self._rounds[old]
        for old in [s for s in self.agreed if s < step - 4]:
            del self.agreed[old]
        return self._rounds.setdefault(step, _Round())

    # ------------------------------------------------------------------ aggregator side

    async def serve(self, header: pb.CallHeader, arrays: Arrays, caller: str
                    ) -> tuple[Arrays, Meta]:
        """A contribution from `caller` (the call's signing identity, never a message field:
        peer/authz.py checked that it holds this stage) for round `header.step`; returns the
        result. One part per caller and round: a second one replaces the first."""
        if header.stage != self.stage:
            raise ValueError(f"sync for stage {header.stage} sent to a replica of stage "
                             f"{self.stage}")
        if not caller or caller == self.me:
            raise ValueError("a sync part must come from another replica of the stage")
        self._suspects.discard(caller)  # heard from: waited for again from the next round on
        if header.meta.get("replay") == "1":
            if header.meta.get("probe") == "1":  # only whether this replica keeps the round
                return {}, {"kept": "1" if header.step in self._kept else "0",
                            "after_step": str(self.step_now())}
            return self._kept_round(header.step)
        if header.step not in self._rounds and header.step <= self.step_now():
            # a part for a round this replica closed and forgot (its sender was frozen, or
            # slow): the same aggregate the others applied, never a new round that no one
            # else will join (the sender would wait out its call for nothing)
            kept = self._kept.get(header.step)
            if kept is None:
                raise ValueError(f"round {header.step} is over here (after step "
                                 f"{self.step_now()}) and no longer kept")
            return kept
        rnd = self._round(header.step)
        if rnd.result is None:
            rnd.parts[caller] = (dict(header.meta), arrays)
            rnd.sent_at[caller] = header.sent_at
            rnd.arrived.set()
        try:
            await asyncio.wait_for(rnd.done.wait(), self.call_timeout_s)
        except (asyncio.CancelledError, TimeoutError):
            if rnd.result is None:  # the caller gave up and fails over: its part is not in it
                rnd.parts.pop(caller, None)
            raise
        assert rnd.result is not None
        return rnd.result

    async def _aggregate_as_leader(self, step: int, own: tuple[Meta, Arrays],
                                   skip: set[str]) -> tuple[Arrays, Meta]:
        rnd = self._round(step)
        rnd.parts[self.me] = own
        started = time.monotonic()
        deadline = started + self.round_deadline_s()
        gone: set[str] = set()  # refused a connection this round: their process is dead
        probing: asyncio.Future | None = None
        try:
            while True:
                expected = (set(self._candidates(step)) - skip - self.departed()
                            - self._past(step) - gone - self._suspects)
                if expected <= set(rnd.parts):
                    self.deadline.complete(time.monotonic() - started)
                    break
                if time.monotonic() >= deadline:
                    break
                if probing is None and time.monotonic() - started >= DEAD_PROBE_AFTER_S:
                    probing = asyncio.ensure_future(self._refusing(step, expected - set(rnd.parts)))
                if probing is not None and probing.done() and not probing.cancelled():
                    gone |= probing.result()
                rnd.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rnd.arrived.wait(),
                                           min(0.25, max(0.0, deadline - time.monotonic())))
        finally:
            if probing is not None and not probing.done():
                probing.cancel()
        missing = (set(self._candidates(step)) - skip) - set(rnd.parts)
        ask = missing - self.departed()
        self._suspects = set(ask)  # the next round does not wait for them (see __init__)
        if time.monotonic() - started > self.call_timeout_s:  # this replica was frozen: the
            ask |= set(rnd.parts) - {self.me}  # callers gave up on it and may have failed over
        # a part sent long ago (by its sender's clock) may be one its sender gave up on while
        # this replica was frozen, read only now: that sender may have closed the round without
        # it. Asking costs a tiny bounded probe; a clock skew only makes it ask needlessly.
        ask |= {r for r, t in rnd.sent_at.items()
                if r in rnd.parts and r != self.me and time.time() - t > self.call_timeout_s / 2}
        elsewhere = await self._closed_elsewhere(step, ask)
        if elsewhere is not None:  # this replica was the one away: it applies what they did
            result = rnd.result = elsewhere
            rnd.done.set()
            return result
        # an abstaining replica (re-downloading its stage) said so: not waited for, not averaged
        parts = {r: p for r, p in rnd.parts.items() if p[0].get("abstain") != "1"}
        arrays, meta = self.mode.aggregate(parts)
        at, attested_hash = self.attested()
        diverged = _diverged({r: p[0].get("state_hash", "") for r, p in parts.items()},
                             self.joined(), attested_hash if at == step - 1 else "")
        if diverged:
            meta = {**meta, "diverged": ",".join(diverged)}
            log.warning("stage %d step %d: %s started the round from other weights than the "
                        "stage's; they re-download the stage", self.stage, step,
                        ",".join(r[:8] for r in diverged))
        result = rnd.result = (arrays, meta)
        rnd.done.set()
        if missing:
            log.warning("stage %d step %d: averaged %d replicas; missing %s", self.stage, step,
                        len(parts), ",".join(sorted(m[:8] for m in missing)))
        return result

    async def _refusing(self, step: int, missing: set[str]) -> set[str]:
        """The missing replicas whose address refuses a connection now (a killed or crashed
        process: nothing listens there). Until its lease lapses the swarm view still lists such
        a replica, and the round would wait its whole deadline for it at every step; a frozen or
        cut-off one does not refuse, it is only slow to answer, and is waited for as before."""
        probe_s = min(self.timeout, PROBE_S)
        order = sorted(missing)
        answers = await asyncio.gather(*(self._send(r, step, ({**REPLAY, "probe": "1"}, {}),
                                                    probe_s) for r in order),
                                       return_exceptions=True)
        refused = {r for r, a in zip(order, answers, strict=True)
                   if isinstance(a, grpc.aio.AioRpcError)
                   and a.code() == grpc.StatusCode.UNAVAILABLE}
        if refused:
            log.info("stage %d step %d: not waiting for %s (connection refused)", self.stage,
                     step, ",".join(sorted(r[:8] for r in refused)))
            for r in sorted(refused) if self.unreachable is not None else ():
                self.unreachable.note(r)  # and the coordinator, by the next heartbeat
        return refused

    async def _closed_elsewhere(self, step: int, missing: set[str]
                                ) -> tuple[Arrays, Meta] | None:
        """Round `step`'s aggregate as the missing replicas applied it, when they closed the
        round without this aggregator (it was frozen or cut off, they failed over to the next
        candidate); None when none of them is past the round. Without this, an aggregator back
        from a freeze closes the rounds it slept through alone, and the stage splits into two
        histories that only a re-download mends, often the wrong way round (a tie of two
        replicas goes to the senior one, the one that was away). The probe is tiny and bounded
        by a short timeout, so a replica that is merely frozen costs the round little."""
        if not missing:
            return None
        probe_s = min(self.timeout, PROBE_S)
        probes = await asyncio.gather(*(self._send(r, step, ({**REPLAY, "probe": "1"}, {}),
                                                   probe_s) for r in sorted(missing)),
                                      return_exceptions=True)
        for replica, answer in zip(sorted(missing), probes, strict=True):
            if isinstance(answer, BaseException) or answer[1].get("kept") != "1":
                continue
            try:
                arrays, meta = await self._send(replica, step, (dict(REPLAY), {}))
            except (grpc.aio.AioRpcError, TimeoutError, ValueError, KeyError) as exc:
                log.debug("stage %d: round %d not fetched from %s: %s", self.stage, step,
                          replica[:8], _short(exc))
                continue
            if meta.get("not_kept") == "1":
                continue
            log.warning("stage %d step %d: %s closed this round without this replica; "
                        "applying its aggregate", self.stage, step, replica[:8])
            return arrays, {k: v for k, v in meta.items() if k != "state_hash_after"}
        return None

    def _past(self, step: int) -> set[str]:
        """Replicas that already sent a part for a later round: they finished round `step`
        without this aggregator (their view left it out), so waiting for them is waiting out the
        timeout. Replicas run their rounds in order, so this never drops one still coming."""
        return {sender for s, r in self._rounds.items() if s > step for sender in r.parts}

    # ------------------------------------------------------------------ kept rounds (replay)

    def keep(self, step: int, result: tuple[Arrays, Meta], state_hash_after: str) -> None:
        """Remember round `step`'s aggregate, applied and giving `state_hash_after`, for the
        replicas that missed it; forget the oldest beyond KEEP_ROUNDS or KEEP_BYTES."""
        arrays, meta = result
        self._kept[step] = (arrays, {**meta, "state_hash_after": state_hash_after})
        size = sum(_nbytes(a) for a, _ in self._kept.values())
        for old in sorted(self._kept):
            if (len(self._kept) <= KEEP_ROUNDS and size <= KEEP_BYTES) or old == step:
                break
            size -= _nbytes(self._kept.pop(old)[0])

    def kept_steps(self) -> list[int]:
        return sorted(self._kept)

    def _kept_round(self, step: int) -> tuple[Arrays, Meta]:
        kept = self._kept.get(step)
        if kept is not None:
            return kept
        return {}, {"not_kept": "1", "after_step": str(self.step_now()),
                    "kept": ",".join(str(s) for s in self.kept_steps())}

    async def fetch(self, step: int) -> tuple[tuple[Arrays, Meta] | None, int]:
        """Round `step`'s aggregate from the first other replica (seniority order) that keeps it,
        and the newest step any asked replica is after (-1 when none answered). (None, newest)
        when none keeps it: newest < step means the round has not happened yet."""
        newest = -1
        for cand in self._candidates(step + 1):
            if cand == self.me:
                continue
            try:
                arrays, meta = await self._send(cand, step, (dict(REPLAY), {}), self.timeout)
            except (grpc.aio.AioRpcError, TimeoutError, ValueError, KeyError) as exc:
                log.debug("stage %d: round %d not fetched from %s: %s", self.stage, step,
                          cand[:8], _short(exc))
                continue
            if meta.get("not_kept") != "1":
                return (arrays, meta), max(newest, step)
            with contextlib.suppress(ValueError):
                newest = max(newest, int(meta.get("after_step", "-1")))
        return None, newest

    # ------------------------------------------------------------------ member side

    async def run(self, step: int, own: tuple[Meta, Arrays]) -> tuple[Arrays, Meta]:
        """Take part in round `step` with this replica's contribution; returns the aggregate."""
        tried: set[str] = set()
        for cand in self._candidates(step):
            if cand == self.me:
                result = await self._aggregate_as_leader(step, own, tried)
                break
            try:
                sent = time.monotonic()
                result = await self._send(cand, step, own)
                if set(self._candidates(step)) <= set(result[1].get("included", "").split(",")):
                    # a complete round, seen from a member: how long rounds take here, so that
                    # a member that must lead one (its aggregator cut off) waits a measured
                    # deadline, not the whole timeout, for the replica that is not coming
                    self.deadline.complete(time.monotonic() - sent)
                break
            except (grpc.aio.AioRpcError, TimeoutError, ValueError, KeyError) as exc:
                # KeyError: the candidate left the swarm view (killed) since the round began
                log.warning("stage %d step %d: aggregator %s unreachable (%s); trying the next",
                            self.stage, step, cand[:8], _short(exc))
                if self.unreachable is not None:
                    self.unreachable.note_error(cand, exc)
                tried.add(cand)
        else:
            result = await self._aggregate_as_leader(step, own, tried)
        self.last_included = len([p for p in result[1].get("included", "").split(",") if p])
        return result

    async def abstain(self, step: int) -> None:
        """Tell round `step`'s aggregator not to wait for this replica, which is re-downloading
        its stage and will not contribute: without it the round would wait out its timeout, the
        download (which waits for the step to end) with it, and the replica would be a step
        behind again when it is done. Best effort: the timeout still bounds the round."""
        try:
            await self.run(step, (dict(ABSTAIN), {}))
        except Exception as exc:  # the round goes on without this replica either way
            log.debug("stage %d step %d: abstaining failed: %s", self.stage, step, _short(exc))

    async def _send(self, cand: str, step: int, own: tuple[Meta, Arrays],
                    timeout: float | None = None) -> tuple[Arrays, Meta]:
        """One part to `cand` and its answer. A round's part (not a replay request) must be
        acknowledged: the aggregator sends ACK_KEY as soon as the part is in, and a member that
        hears nothing within the measured acknowledgement deadline fails over at once; a
        partitioned aggregator used to hold every member for the whole call timeout."""
        meta, arrays = own
        header = pb.CallHeader(kind="sync", step=step, stage=self.stage, sender=self.me,
                               sent_at=time.time())
        header.meta.update(meta)
        chunks = wire.encode_chunks(header, arrays, pb.RAW)
        call = self.exchange_stub(cand)(wire.send_iter(chunks, self.counter, self.kind),
                                        timeout=timeout or self.call_timeout_s)
        if meta.get("replay") != "1":
            await self._acknowledged(call, cand)
        reply, result = await wire.receive(call.__aiter__(), wire.limits_for(self.max_bytes),
                                           self.counter, self.kind)
        if reply.kind == "error":
            raise ValueError(reply.meta.get("error", "aggregator refused"))
        return result, dict(reply.meta)


    async def _acknowledged(self, call, cand: str) -> None:
        """Wait for the aggregator's acknowledgement of the part, a measured deadline; once
        more when this process was stopped meanwhile (peer/pipeline/stalls.py): the ack may
        have been in the socket all along, and a member that gave up on its aggregator would
        lead the round alone and diverge from the replicas that closed it."""
        sent = time.monotonic()
        wait = self.ack_deadline.seconds(self.call_timeout_s)
        head = asyncio.ensure_future(call.initial_metadata())
        done, _ = await asyncio.wait({head}, timeout=wait)
        if not done and stalls.WATCH.stalled_during(sent, time.monotonic()) > 0.0:
            done, _ = await asyncio.wait({head}, timeout=wait)
        if not done:
            head.cancel()
            call.cancel()
            raise TimeoutError(f"{cand[:8]} did not acknowledge the part within {wait:.1f} s")
        metadata = head.result()
        if any(k == ACK_KEY for k, _ in (metadata or ())):
            self.ack_deadline.complete(time.monotonic() - sent)


def _diverged(hashes: Mapping[str, str], joined: Mapping[str, float] | None = None,
              attested: str = "") -> list[str]:
    """The replicas whose state hash before the round differs from the right one: `attested`
    (the coordinator's, for the round's step - 1) when given, else the majority's, a tie going
    to the most senior (as in the heartbeat check); replicas that sent no hash are not judged."""
    known = {r: h for r, h in hashes.items() if h}
    if not known or (not attested and len(set(known.values())) < 2):
        return []
    reference = attested or winning_hash(known, joined)
    return sorted(r for r, h in known.items() if h != reference)


def _nbytes(arrays: Arrays) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
