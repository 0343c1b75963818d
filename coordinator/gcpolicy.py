"""Garbage-collector pauses kept off the heartbeat path of a large swarm.

CPython's full (generation 2) collection scans every tracked object. A coordinator of 5,000
peers holds a few hundred thousand (members, stats, events, grpc's own), and each heartbeat
replaces a member's stats, so objects keep reaching the old generation and full collections
come every few seconds, each stopping the event loop for tens of milliseconds (measured: 42 ms
for a bare 5,000-member Membership on a loaded 2-core machine): every heartbeat that arrives
meanwhile waits, which is what a p99 sees.

`GcPolicy.tick` (called from the coordinator's once-a-second tick) therefore moves what
survived into the permanent generation every FREEZE_EVERY_S (`gc.freeze`, after a young
collection so that fresh garbage is not frozen): later full collections scan only what was
allocated since (at most FREEZE_EVERY_S of survivors: with a 30 s freeze the collector still
paused 49 ms at 5,000 peers on a loaded machine). Frozen objects are still freed by reference
counting; only garbage *cycles* among them wait for the next thaw. Every THAW_EVERY_S the
policy unfreezes and runs one full collection (one pause an hour rather than one every few
seconds), then freezes again.

Each collection's duration (gc.callbacks) goes into the worst of its second, in one slot per
second of the last PAUSE_WINDOW_S; /metrics shows the worst of the last minute
(coordinator/metrics.py). The slots are a list of fixed length whose items are only replaced:
gc callbacks run in whichever thread collects, at any allocation, so a reader iterating a
growing record (the deque this replaced) could see it change under it and fail the scrape with
"deque mutated during iteration" (a 500 from /metrics, seen in CI).
"""

from __future__ import annotations

import gc
import time

FREEZE_EVERY_S = 5.0
THAW_EVERY_S = 3600.0
PAUSE_WINDOW_S = 60
SLOTS = PAUSE_WINDOW_S


class GcPolicy:
    """Periodic freezing of long-lived objects, and a record of collection pauses."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.frozen_at = clock()
        self.thawed_at = clock()
        self.freezes = 0
        # slot i: (the second, worst pause in it) for the seconds s with s % SLOTS == i
        self.slots: list[tuple[int, float]] = [(-1, 0.0)] * SLOTS
        self._started: float | None = None
        gc.callbacks.append(self._callback)

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        elif self._started is not None:
            pause, second = now - self._started, int(self.clock())
            self._started = None
            at, worst = self.slots[second % SLOTS]
            self.slots[second % SLOTS] = (second, max(worst, pause) if at == second else pause)

    def worst_pause_s(self) -> float:
        """The longest collection of the last PAUSE_WINDOW_S (whole seconds)."""
        now = int(self.clock())
        return max((w for at, w in list(self.slots) if 0 <= now - at < PAUSE_WINDOW_S),
                   default=0.0)

    def tick(self) -> None:
        now = self.clock()
        if now - self.thawed_at >= THAW_EVERY_S:
            self.thawed_at = now
            gc.unfreeze()
            gc.collect()
        elif now - self.frozen_at < FREEZE_EVERY_S:
            return
        self.frozen_at = now
        gc.collect(1)
        gc.freeze()
        self.freezes += 1
