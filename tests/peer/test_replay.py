"""Catch-up by replay (peer/sync/replay.py over peer/sync/rounds.py's kept rounds), no network.

Replicas a and b train and run rounds as SyncRounds' members do (contribution, aggregate, apply,
then `keep`); replica c misses some rounds and replays them from a through the real
`SyncRounds.fetch` and `SyncRounds.serve` (only the gRPC call between them is replaced by a direct
call). Checked: c ends bit-identical to a at a's step for allreduce, DeMo and DiLoCo (whose inner
steps pass without touching the shared state); a round no longer kept, a replica whose weights
drifted, and a mode that cannot replay each end in "download", with the reason.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from peer.pipeline import wire
from peer.pipeline.stage_host import StageHost
from peer.sync import rounds as rounds_module
from peer.sync.base import SyncMode
from peer.sync.registry import make_sync_mode
from peer.sync.replay import replay_rounds
from peer.sync.rounds import LOCAL_STEP, SyncRounds
from protocols import shoal_pb2 as pb
from tests.peer.test_sync_modes import params_equal, spec_with, train_microbatch


class Swarm:
    """Replicas of one stage, each with its StageHost, sync mode and SyncRounds."""

    def __init__(self, **spec_changes: object) -> None:
        self.spec = spec_with(**spec_changes)
        self.ids = ("a", "b", "c")
        self.hosts = {p: StageHost(self.spec, 1) for p in self.ids}
        self.modes = {p: make_sync_mode(self.spec) for p in self.ids}
        self.rounds: dict[str, SyncRounds] = {}
        for p in self.ids:  # every replica reaches the others, by a direct call
            self.rounds[p] = SyncRounds(
                me=p, stage=1, mode=self.modes[p], candidates=lambda: list(self.ids),
                exchange_stub=lambda pid: None, counter=wire.ByteCounter(), timeout=5.0,
                max_bytes=1 << 30, step_now=lambda p=p: self.hosts[p].step)
            self.rounds[p]._send = _sender(p, self.rounds)  # type: ignore[method-assign]

    def step(self, members: tuple[str, ...]) -> None:
        """One optimizer step of `members` (the others miss it), as SyncRounds' members do."""
        step = self.hosts[members[0]].step + 1
        for i, p in enumerate(members):
            train_microbatch(self.hosts[p], seed=100 * step + i, step=step)
        mode = self.modes[members[0]]
        if not mode.exchanges(step):
            for p in members:
                self.modes[p].apply(self.hosts[p], {}, dict(LOCAL_STEP))
            return
        parts = {}
        for p in members:
            arrays, meta = self.modes[p].contribution(self.hosts[p])
            parts[p] = (meta, arrays)
        result, meta = self.modes[members[0]].aggregate(parts)
        for p in members:
            self.modes[p].apply(self.hosts[p], result, meta)
            self.rounds[p].keep(step, (result, meta), self.hosts[p].state_hash())

    def replay(self, who: str):
        ctx = SimpleNamespace(host=self.hosts[who], state_hash="")
        return asyncio.run(replay_rounds(ctx, self.modes[who], self.rounds[who]))


def _sender(me: str, all_rounds: dict[str, SyncRounds]):
    async def send(cand, step, own, timeout=None):
        meta, arrays = own
        h = pb.CallHeader(kind="sync", step=step, stage=1, sender=me)
        h.meta.update(meta)
        return await all_rounds[cand].serve(h, arrays, me)
    return send


@pytest.mark.parametrize("mode", ["allreduce", "demo"])
def test_a_replica_that_missed_rounds_replays_them_and_ends_identical(mode: str) -> None:
    s = Swarm(**{"sync.mode": mode})
    for _ in range(2):
        s.step(("a", "b", "c"))
    for _ in range(3):  # c is frozen for three rounds
        s.step(("a", "b"))
    assert s.hosts["c"].step == 2 and s.hosts["a"].step == 5
    got = s.replay("c")
    assert (got.rounds, got.download) == (3, "")
    assert s.hosts["c"].step == 5
    assert s.hosts["c"].state_hash() == s.hosts["a"].state_hash()
    assert params_equal(s.hosts["c"], s.hosts["a"])
    # c keeps what it replayed: it can serve the next laggard, and trains on with the others
    assert s.rounds["c"].kept_steps()[-3:] == [3, 4, 5]
    s.step(("a", "b", "c"))
    assert params_equal(s.hosts["c"], s.hosts["b"])
    # nothing newer anywhere: a second catch-up replays nothing and asks for no download
    assert s.replay("c") == type(got)(0, "")


def test_diloco_inner_steps_pass_and_the_outer_round_is_replayed() -> None:
    s = Swarm(**{"sync.mode": "diloco", "sync.diloco.inner_steps": 2})
    s.step(("a", "b", "c"))
    s.step(("a", "b", "c"))  # an outer step
    for _ in range(4):  # two more outer rounds without c
        s.step(("a", "b"))
    got = s.replay("c")
    assert got.download == "" and s.hosts["c"].step == s.hosts["a"].step == 6
    assert s.hosts["c"].state_hash() == s.hosts["a"].state_hash()


def test_a_round_no_longer_kept_means_a_download(monkeypatch) -> None:
    monkeypatch.setattr(rounds_module, "KEEP_ROUNDS", 2)
    s = Swarm(**{"sync.mode": "allreduce"})
    s.step(("a", "b", "c"))
    for _ in range(4):
        s.step(("a", "b"))
    assert s.rounds["a"].kept_steps() == [4, 5]
    got = s.replay("c")
    assert got.rounds == 0 and "round 2 is no longer kept" in got.download
    assert "after step 5" in got.download


def test_a_replica_that_drifted_stops_at_the_hash_check() -> None:
    s = Swarm(**{"sync.mode": "allreduce"})
    s.step(("a", "b", "c"))
    s.step(("a", "b"))
    import torch

    with torch.no_grad():
        next(s.hosts["c"].module.parameters()).add_(1e-3)  # c's weights are not the stage's
    got = s.replay("c")
    assert got.rounds == 0 and "state hash" in got.download


def test_the_holder_says_what_it_keeps_when_it_has_no_such_round() -> None:
    s = Swarm(**{"sync.mode": "allreduce"})
    s.step(("a", "b"))
    h = pb.CallHeader(kind="sync", step=7, stage=1, sender="c")
    h.meta.update({"replay": "1"})
    arrays, meta = asyncio.run(s.rounds["a"].serve(h, {}, "c"))
    assert arrays == {} and meta == {"not_kept": "1", "after_step": "1", "kept": "1"}


def test_a_mode_without_round_replay_downloads() -> None:
    class NoReplay(SyncMode):
        name = "none"

        def apply(self, host, result, meta):
            return 0.0

    s = Swarm(**{"sync.mode": "allreduce"})
    ctx = SimpleNamespace(host=s.hosts["c"], state_hash="")
    got = asyncio.run(replay_rounds(ctx, NoReplay(), s.rounds["c"]))
    assert got.rounds == 0 and "does not replay" in got.download


def test_a_late_part_for_a_forgotten_round_gets_the_kept_aggregate_at_once() -> None:
    """A replica frozen mid-round sends its part when it thaws: the aggregator, steps further
    and without that round in its live rounds, answers with the aggregate it kept instead of
    opening a round no one will close (the sender used to wait out its call)."""
    s = Swarm(**{"sync.mode": "allreduce"})
    for _ in range(6):
        s.step(("a", "b"))
    r = s.rounds["a"]
    h = pb.CallHeader(kind="sync", step=2, stage=1, sender="c")
    h.meta.update({"samples": "0"})
    arrays, meta = asyncio.run(asyncio.wait_for(r.serve(h, {}, "c"), 5))
    kept_arrays, kept_meta = r._kept[2]
    assert meta == kept_meta and sorted(arrays) == sorted(kept_arrays)
    h.step = 0  # before anything kept: refused at once, with the reason
    with pytest.raises(ValueError, match="round 0 is over"):
        asyncio.run(asyncio.wait_for(r.serve(h, {}, "c"), 5))


def test_an_aggregator_back_from_a_freeze_applies_the_round_closed_without_it() -> None:
    """a, the senior replica and so the aggregator, slept through round 2: b and c failed over
    and closed it without a. Back, a must not close round 2 alone (two histories of one stage,
    which a tie of two replicas would settle in favour of the one that was away): it asks the
    replicas that did not come, takes their aggregate, and ends on their weights."""
    s = Swarm(**{"sync.mode": "allreduce"})
    s.step(("a", "b", "c"))
    s.step(("b", "c"))
    a = s.rounds["a"]
    a.timeout = 0.5  # the round's wait for b and c, who will not come, is short here
    a.agreed[2] = ["a", "b", "c"]
    train_microbatch(s.hosts["a"], seed=7, step=2)
    arrays, meta = s.modes["a"].contribution(s.hosts["a"])
    result, result_meta = asyncio.run(a.run(2, (meta, arrays)))
    assert "a" not in result_meta.get("included", "a").split(",")
    s.modes["a"].apply(s.hosts["a"], result, result_meta)
    assert s.hosts["a"].step == 2 and params_equal(s.hosts["a"], s.hosts["b"])


def test_an_aggregator_missing_parts_closes_the_round_itself_when_no_one_is_past_it() -> None:
    s = Swarm(**{"sync.mode": "allreduce"})
    s.step(("a", "b", "c"))
    a = s.rounds["a"]
    a.timeout = 0.5
    a.agreed[2] = ["a", "b", "c"]
    arrays, meta = s.modes["a"].contribution(s.hosts["a"])
    _, result_meta = asyncio.run(a.run(2, (meta, arrays)))  # b and c are slow, not past it
    assert result_meta["included"] == "a"


def test_a_part_its_sender_gave_up_on_does_not_split_the_round() -> None:
    """a was frozen while b closed round 2 without it; b's part for round 2, sent long ago (its
    call timed out), is read by a only after the thaw. a must not average it with its own as if
    b were still waiting: it asks b, which kept round 2, and applies that."""
    s = Swarm(**{"sync.mode": "allreduce"})
    s.step(("a", "b", "c"))
    s.step(("b", "c"))
    a = s.rounds["a"]
    a.timeout = 0.5
    a.agreed[2] = ["a", "b"]
    train_microbatch(s.hosts["a"], seed=7, step=2)
    arrays, meta = s.modes["a"].contribution(s.hosts["a"])

    async def scenario():
        stale = pb.CallHeader(kind="sync", step=2, stage=1, sender="b",
                              sent_at=time.time() - 3600)
        late = asyncio.create_task(a.serve(stale, {}, "b"))
        await asyncio.sleep(0)
        result = await a.run(2, (meta, arrays))
        await late
        return result

    result, result_meta = asyncio.run(scenario())
    s.modes["a"].apply(s.hosts["a"], result, result_meta)
    assert params_equal(s.hosts["a"], s.hosts["b"])
