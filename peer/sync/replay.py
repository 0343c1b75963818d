"""Catch-up by replay: a replica that missed a few rounds applies their aggregates, in order,
instead of downloading its whole stage.

The other replicas keep the aggregates of their last rounds (peer/sync/rounds.py's `keep`), each
with the state hash they had after applying it. The laggard asks for its next round, applies it
exactly as the round's members did (the mode's `apply`, on the compute thread), and compares its
hash with the holder's `state_hash_after`; then the next round, until no replica has a newer
one. Steps that exchange nothing (DiLoCo's inner steps) advance the step counter without
touching the weights: the replica's own drift was lost with the steps it missed, the shared
state is not.

The outcome says what is left to do: nothing ("caught up"), or a full download of the stage
(the first missing round is no longer kept anywhere, a hash differs, or the mode cannot replay),
after which the rounds that passed during the download are replayed the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peer.context import PeerContext
from peer.sync.base import SyncMode, forget_pending
from peer.sync.rounds import SyncRounds

log = logging.getLogger("shoal.sync")

#: at most this many rounds replayed in one catch-up: a swarm that steps faster than this replica
#: can apply its rounds is not chased for ever (the heartbeat checks try again later)
MAX_REPLAY = 64


@dataclass(frozen=True)
class Replayed:
    """What a catch-up did: `rounds` applied; `download` says why the stage must be downloaded
    (empty: this replica is as far as any replica it asked)."""

    rounds: int
    download: str = ""


async def replay_rounds(ctx: PeerContext, mode: SyncMode, rounds: SyncRounds) -> Replayed:
    """Apply the rounds after this replica's step that the stage's other replicas keep.
    Event loop, with the step lock held; mutates the stage through the compute thread."""
    host = ctx.host
    assert host is not None
    if not mode.replays_rounds:
        return Replayed(0, f"sync mode {mode.name} does not replay rounds")
    done = 0
    while done < MAX_REPLAY:
        step = host.step + 1
        r = _next_round(mode, step)
        got, newest = await rounds.fetch(r)
        if got is None:
            if newest >= r:
                return Replayed(done, f"round {r} is no longer kept by the replicas "
                                      f"(they are after step {newest})")
            # round r has not happened yet: pass the local steps the others are past, if any
            while host.step < newest:
                await host.run(host.finish_step)
                done += 1
            return Replayed(done)  # nobody is further: caught up
        while host.step + 1 < r:  # local steps before the round: the weights stay
            await host.run(host.finish_step)
            done += 1
        result, meta = got
        forget_pending(host)
        await host.run(mode.apply, host, result, meta)
        ctx.state_hash = await host.run(host.state_hash)
        expected = meta.get("state_hash_after", "")
        if expected and ctx.state_hash != expected:
            return Replayed(done, f"after replaying round {r} the state hash is "
                                  f"{ctx.state_hash[:12]}, the replicas' {expected[:12]}")
        rounds.keep(r, (result, {k: v for k, v in meta.items() if k != "state_hash_after"}),
                    ctx.state_hash)
        done += 1
    return Replayed(done)


def _next_round(mode: SyncMode, step: int, horizon: int = 10_000) -> int:
    """The first step at or after `step` that runs a round (DiLoCo's next outer step)."""
    for s in range(step, step + horizon):
        if mode.exchanges(s):
            return s
    return step
