"""How long to wait for the rest of a group that usually comes quickly: a round's parts at its
aggregator, a step's EndSteps from the stage-0 drivers at a block replica.

A fixed wait (sync.timeout_s, 30 s by default) makes a single frozen or partitioned peer cost
every step that long. Instead, once `WARMUP` complete waits were measured, the wait is SPREAD
times their recent median (how long the last member of the group took to arrive after the
first), at least FLOOR_S, and never longer than the configured timeout. Only complete waits are
measured: the waits that a dead peer ended by the deadline do not stretch the next one. A peer
left out that way catches up (peer/sync/replay.py).
"""

from __future__ import annotations

from collections import deque
from statistics import median

SPREAD = 4.0
FLOOR_S = 2.0
MEASURED = 16
WARMUP = 3


class MeasuredDeadline:
    """The wait for one kind of group on one replica (see the module docstring)."""

    def __init__(self) -> None:
        self._waits: deque[float] = deque(maxlen=MEASURED)

    def seconds(self, timeout: float) -> float:
        """How long to wait now: `timeout` until WARMUP complete waits were measured."""
        if len(self._waits) < WARMUP:
            return timeout
        return min(timeout, max(FLOOR_S, SPREAD * median(self._waits)))

    def complete(self, waited_s: float) -> None:
        """The whole group arrived `waited_s` after the wait began."""
        self._waits.append(max(0.0, waited_s))
