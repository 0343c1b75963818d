"""bench/coordinator.py and its simulated peers (tests/sim_peer.py): heartbeats keep a fixed
schedule, so a stall shows as latency of the beats it delayed, never as beats that were skipped
(coordinated omission); the window counts due beats, answers and the achieved rate."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from types import SimpleNamespace

import pytest

from bench.coordinator import LATE_S, window_of
from tests.sim_peer import SimSwarm

PERIOD = 0.01


class StallingClient:
    """Answers at once, except call number `stall_at`, which waits for `release`."""

    heartbeat_s = PERIOD
    stage = 0

    def __init__(self, stall_at: int) -> None:
        self.stall_at = stall_at
        self.release = asyncio.Event()
        self.calls = 0

    async def heartbeat(self, stats: object) -> SimpleNamespace:
        self.calls += 1
        if self.calls == self.stall_at:
            await self.release.wait()
        return SimpleNamespace(action="ok")

    async def close(self) -> None:
        pass


def _swarm(stall_at: int) -> tuple[SimSwarm, StallingClient]:
    swarm = SimSwarm("127.0.0.1:9", None, 1, heartbeat_s=PERIOD)
    client = StallingClient(stall_at)
    swarm.peers[0].client = client  # type: ignore[assignment]
    return swarm, client


def _run(scenario: Coroutine[object, object, SimSwarm]) -> SimSwarm:
    """Run `scenario`; a peer task that died would leave it waiting, so it is bounded (a guard
    against a hang, not a measurement)."""
    return asyncio.run(asyncio.wait_for(scenario, 60))


def _due_slots(dues: list[float]) -> list[int]:
    return [round((d - dues[0]) / PERIOD) for d in sorted(dues)]


def test_beats_delayed_by_a_stall_are_sent_late_not_skipped() -> None:
    async def scenario() -> SimSwarm:
        swarm, client = _swarm(stall_at=3)
        swarm.start()
        while client.calls < 3:
            await asyncio.sleep(PERIOD)
        await asyncio.sleep(8 * PERIOD)  # the third beat is out: several more fall due
        client.release.set()
        while client.calls < 15:
            await asyncio.sleep(PERIOD)
        await swarm.stop()
        return swarm

    peer = _run(scenario()).peers[0]
    dues = [due for due, _, _ in peer.samples] + [due for due, _ in peer.unsent]
    slots = _due_slots(dues)
    assert slots == list(range(len(slots))), "a beat of the schedule was skipped"
    assert peer.heartbeats == len(peer.samples) >= 15 and not peer.failed
    for _due, latency, sent in peer.samples:  # measured from the due time, sending included
        assert latency >= sent >= 0.0


def test_beats_due_but_unsent_at_the_stop_are_reported() -> None:
    async def scenario() -> SimSwarm:
        swarm, client = _swarm(stall_at=2)
        swarm.start()
        while client.calls < 2:
            await asyncio.sleep(PERIOD)
        await asyncio.sleep(6 * PERIOD)
        stopping = asyncio.create_task(swarm.stop())
        await asyncio.sleep(0)
        client.release.set()
        await stopping
        return swarm

    peer = _run(scenario()).peers[0]
    assert len(peer.samples) == 2 and peer.unsent
    slots = _due_slots([due for due, _, _ in peer.samples] + [due for due, _ in peer.unsent])
    assert slots == list(range(len(slots)))
    assert all(at_least > 0 for _, at_least in peer.unsent)


def test_restarting_the_schedules_drops_what_was_owed_and_keeps_the_new_schedule_whole() -> None:
    async def scenario() -> tuple[SimSwarm, float]:
        swarm, client = _swarm(stall_at=2)
        swarm.start()
        while client.calls < 2:
            await asyncio.sleep(PERIOD)
        await asyncio.sleep(6 * PERIOD)  # several beats owed behind the stalled one
        restarted = time.time()
        swarm.restart_schedules()
        client.release.set()
        while client.calls < 10:
            await asyncio.sleep(PERIOD)
        await swarm.stop()
        return swarm, restarted

    swarm, restarted = _run(scenario())
    peer = swarm.peers[0]
    before = sorted(due for due, _, _ in peer.samples if due < restarted)
    after = [due for due, _, _ in peer.samples if due >= restarted]
    after += [due for due, _ in peer.unsent]
    assert len(before) == 2  # the owed beats were dropped, not sent back to back
    slots = _due_slots(after)
    assert len(slots) >= 8 and slots == list(range(len(slots)))


def test_a_silenced_peer_sends_nothing_and_reports_nothing_unsent() -> None:
    async def scenario() -> SimSwarm:
        swarm, _ = _swarm(stall_at=0)
        swarm.silence(1)
        swarm.start()
        await asyncio.sleep(5 * PERIOD)
        await swarm.stop()
        return swarm

    peer = _run(scenario()).peers[0]
    assert peer.samples == [] and peer.unsent == [] and peer.heartbeats == 0


def test_window_counts_due_beats_answers_and_late_sends() -> None:
    results = [
        {"samples": [(9.5, 0.7, 0.0),  # due before the window, answered inside it
                     (10.0, 0.002, 0.0), (11.0, 0.5, 0.4),  # due inside, the second sent late
                     (19.9, 0.3, LATE_S / 2)],  # due inside, answered after it
         "failed": [12.0, 25.0], "unsent": [(19.5, 1.0), (21.0, 0.1)]},
        {"samples": [(15.0, 0.010, 0.0)], "failed": [], "unsent": []},
    ]
    w = window_of(results, 10.0, 20.0)
    assert (w.answered, w.failed, w.unsent, w.due) == (4, 1, 1, 6)
    assert w.answered_in == 4  # 9.5 + 0.7, 10.0, 11.5, 15.01; not 19.9 + 0.3
    assert w.achieved_per_s == pytest.approx(0.4)
    assert w.sent_late == 1
    assert sorted(w.latencies) == pytest.approx([0.002, 0.010, 0.3, 0.5, 1.0])


class PacedClient(StallingClient):
    """Tells a slower period (as a large swarm's coordinator does) from its `slow_at`-th
    answer on."""

    def __init__(self, slow_at: int) -> None:
        super().__init__(stall_at=0)
        self.slow_at = slow_at
        self.heartbeat_s = PERIOD

    async def heartbeat(self, stats: object) -> SimpleNamespace:
        reply = await super().heartbeat(stats)
        if self.calls == self.slow_at:
            self.heartbeat_s = 3 * PERIOD
        return reply


def test_the_schedule_follows_the_period_the_coordinator_tells() -> None:
    async def scenario() -> SimSwarm:
        swarm = SimSwarm("127.0.0.1:9", None, 1)  # no forced period: the told one
        client = PacedClient(slow_at=4)
        swarm.peers[0].client = client  # type: ignore[assignment]
        swarm.start()
        while client.calls < 10:
            await asyncio.sleep(PERIOD)
        await swarm.stop()
        return swarm

    peer = _run(scenario()).peers[0]
    dues = sorted([due for due, _, _ in peer.samples] + [due for due, _ in peer.unsent])
    gaps = [round((b - a) / PERIOD) for a, b in itertools.pairwise(dues)]
    assert gaps[:3] == [1, 1, 1]  # beats 1-4 at the first period
    assert set(gaps[3:]) == {3}  # after the 4th answer, every beat one told period apart
