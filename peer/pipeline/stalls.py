"""Whether this process was stopped while a call was out: SIGSTOP, a paused VM, a laptop lid.

A call that times out while its caller was stopped says nothing about the replica it went to:
the answer may have been waiting in the socket all along. `StallWatch` ticks on the event loop;
a tick that comes much later than asked means the loop (the whole process, or blocking work
on the loop) did not run in between, and that span is kept. The driver asks `stalled_during`
before it holds a timeout against a replica (peer/pipeline/router.py: a timed-out replica is
measured slower and gets one call at a time until it answers), and a sync round's member before
it gives up on an aggregator whose acknowledgement did not come (peer/sync/rounds.py: it would
lead the round itself, alone, and diverge from the replicas that closed it).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

TICK_S = 0.25
STALL_S = 1.5  # a tick this much later than asked is a stall
KEEP = 32  # stalls remembered (a call older than the oldest of them is not asked about)


class StallWatch:
    def __init__(self, tick_s: float = TICK_S, stall_s: float = STALL_S,
                 clock=time.monotonic) -> None:
        self.tick_s, self.stall_s, self._clock = tick_s, stall_s, clock
        self._stalls: deque[tuple[float, float]] = deque(maxlen=KEEP)
        self._asked_at: float | None = None  # when the tick now asleep began
        self._task: asyncio.Task | None = None

    def note(self, asked_at: float, woke_at: float) -> None:
        """A sleep of `tick_s` from `asked_at` ended at `woke_at` (monotonic seconds)."""
        if woke_at - asked_at - self.tick_s >= self.stall_s:
            self._stalls.append((asked_at + self.tick_s, woke_at))

    def stalled_during(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] this process spent stopped (as far as the ticks saw). A stall
        that only just ended counts before its tick has woken: after a thaw, the timed-out
        calls and the tick are due in the same turn of the loop, in no set order."""
        spans = list(self._stalls)
        if self._asked_at is not None:
            late = self._clock()
            if late - self._asked_at - self.tick_s >= self.stall_s:
                spans.append((self._asked_at + self.tick_s, late))
        return sum(max(0.0, min(t1, b) - max(t0, a)) for a, b in spans)

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            asked = self._asked_at = self._clock()
            await asyncio.sleep(self.tick_s)
            self.note(asked, self._clock())

    def start(self) -> None:
        """Tick on the running loop, unless already ticking there (asyncio.run cancels the task
        with the loop's other tasks at its end)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._asked_at = None
            self._task = loop.create_task(self.run(), name="stall-watch")


#: this process's watch: started by the peer daemon (and a driver), read by the driver's hops
#: and the sync rounds' acknowledgement wait
WATCH = StallWatch()
