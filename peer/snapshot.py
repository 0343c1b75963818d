"""Snapshot buffers for state downloads: kept between downloads, never reused while in use.

Why: a state download's sender copies the stage's state into one buffer (peer/state_service.py
`encode_state`) so that the next optimizer step cannot change what is being sent. A fresh
buffer's pages must be faulted in during that copy, and on this project's VMs freed memory goes
back to the host within seconds, so faulting it in again was most of the snapshot: 256 MiB
copied warm took 0.025 s and into a fresh buffer 0.08-0.75 s (load ~1.5). A buffer kept from
the previous download of the same size is already mapped.

Rules (`SnapshotBuffers`):
- `take(nbytes)` hands out a buffer of exactly `nbytes` that nobody holds: an idle one of that
  size, else a fresh one (its pages faulted in on a helper thread while the caller copies:
  protocols.dataplane.Prefault). The caller holds it until it calls `give_back` once, which it
  does only when nothing reads the buffer any more (peer/state_service.py: when the data plane has
  sent it, failed to, or dropped its ticket). A held buffer is never handed out again, so a
  snapshot being sent is never overwritten by the next one.
- Idle buffers are freed `keep_s` after they were given back (a timer thread), and at most
  `max_idle_bytes` are kept idle (the oldest go first); buffers in use are not bounded here
  (the data plane's `max_tickets` bounds them).
Thread-safe: `take` runs on a worker thread, `give_back` on a data-plane worker or the loop.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

#: idle snapshot buffers are freed this long after their last download
KEEP_S = float(os.environ.get("SHOAL_SNAPSHOT_KEEP_S", "") or 30.0)
#: at most this many bytes of idle snapshot buffers are kept (per StateService)
MAX_IDLE_BYTES = int(os.environ.get("SHOAL_SNAPSHOT_MAX_IDLE_BYTES", "") or 4 << 30)


@dataclass
class _Idle:
    buffer: np.ndarray
    since: float


class SnapshotBuffers:
    """Reusable uint8 buffers, one per snapshot in use (see the module docstring).

    Args:
        keep_s: seconds an idle buffer is kept before it is freed.
        max_idle_bytes: bound on the bytes of idle buffers kept (0: none are kept).
        clock: monotonic seconds (tests pass a fake one; the timer still uses real time).
    """

    def __init__(self, keep_s: float = KEEP_S, max_idle_bytes: int = MAX_IDLE_BYTES,
                 clock=time.monotonic) -> None:
        self.keep_s, self.max_idle_bytes, self._clock = keep_s, max_idle_bytes, clock
        self._lock = threading.Lock()
        self._idle: list[_Idle] = []  # oldest first
        self._held: dict[int, np.ndarray] = {}  # id -> buffer, while someone holds it
        self._timer: threading.Timer | None = None
        self.fresh = self.reused = 0  # counters: buffers allocated, buffers handed out again

    def take(self, nbytes: int) -> tuple[np.ndarray, bool]:
        """A buffer of `nbytes` bytes held by the caller until `give_back`, and whether it is
        fresh (its pages not faulted in yet: the caller may prefault it). Any thread."""
        with self._lock:
            for i, idle in enumerate(self._idle):
                if idle.buffer.nbytes == nbytes:
                    del self._idle[i]
                    self._held[id(idle.buffer)] = idle.buffer
                    self.reused += 1
                    return idle.buffer, False
        buffer = np.empty(nbytes, np.uint8)  # untouched pages: no memset
        with self._lock:
            self._held[id(buffer)] = buffer
            self.fresh += 1
        return buffer, True

    def give_back(self, buffer: np.ndarray) -> None:
        """`buffer` (from `take`) is read by nobody any more: it may be handed out again.
        Raises ValueError for a buffer not held (given back twice, or not from `take`)."""
        with self._lock:
            if self._held.pop(id(buffer), None) is not buffer:
                raise ValueError("give_back of a snapshot buffer that is not held")
            self._idle.append(_Idle(buffer, self._clock()))
            self._trim_locked()
            if self._idle and self._timer is None:
                self._arm_locked()

    def holds(self, buffer: object) -> bool:
        """Whether `buffer` is one of these, handed out and not given back yet."""
        with self._lock:
            return self._held.get(id(buffer)) is buffer

    def trim(self) -> None:
        """Free idle buffers older than `keep_s` (the timer calls it; tests may)."""
        with self._lock:
            self._timer = None
            self._trim_locked()
            if self._idle:
                self._arm_locked()

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(i.buffer.nbytes for i in self._idle)

    @property
    def held(self) -> int:
        """Buffers handed out and not given back yet."""
        with self._lock:
            return len(self._held)

    def close(self) -> None:
        """Free the idle buffers and stop the timer (held ones are freed when given back)."""
        with self._lock:
            self._idle.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _trim_locked(self) -> None:
        now = self._clock()
        self._idle = [i for i in self._idle if now - i.since < self.keep_s]
        total = sum(i.buffer.nbytes for i in self._idle)
        while self._idle and total > self.max_idle_bytes:
            total -= self._idle.pop(0).buffer.nbytes

    def _arm_locked(self) -> None:
        """The timer fires when the oldest idle buffer is due (lock held)."""
        due = self._idle[0].since + self.keep_s - self._clock()
        self._timer = threading.Timer(max(0.0, due) + 0.01, self.trim)
        self._timer.daemon = True
        self._timer.start()


__all__ = ["KEEP_S", "MAX_IDLE_BYTES", "SnapshotBuffers"]
