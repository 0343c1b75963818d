"""The coordinator's memory of what happened: an event log and the training-curve history.

Both are bounded in memory so a coordinator that runs for weeks on a tiny VM keeps a flat
footprint. Both are also persisted (coordinator/store.py), so the dashboard of a restarted
coordinator still shows the run so far.

- `EventLog` keeps the last `capacity` events (join, leave, expire, drain, move, rebuild,
  skip: a block stage emptied and paths bypass it, restart, ...). Events are appended by the
  membership logic and picked up by the journal that
  writes them to SQLite together with the membership change they describe.
- `History` keeps the loss / throughput curve reported by stage-0 peers. It never drops the start
  of the run: when it is full it halves its resolution (keeps every other point and doubles the
  minimum spacing), so the whole run stays visible at a coarser grain.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

EVENT_KINDS = (
    "join", "rejoin", "leave", "expire", "drain", "move", "rebuild", "skip", "state", "restart",
    "start", "ban", "refuse",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to the swarm, as shown on the dashboard."""

    t: float
    kind: str
    peer_id: str = ""
    stage: int = -1
    detail: str = ""

    def to_json(self) -> dict:
        return {"t": self.t, "kind": self.kind, "peer_id": self.peer_id, "stage": self.stage,
                "detail": self.detail}


class EventLog:
    """The last `capacity` events, oldest first, plus the ones not yet persisted.

    Invariant: every event appended is handed exactly once to `take_unsaved()`, in order.
    """

    def __init__(self, capacity: int = 1000) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._unsaved: list[Event] = []

    def append(self, event: Event) -> None:
        self._events.append(event)
        self._unsaved.append(event)

    def restore(self, events: Iterable[Event]) -> None:
        """Load events read back from the store (they are already saved)."""
        self._events.extend(events)

    def take_unsaved(self) -> list[Event]:
        out, self._unsaved = self._unsaved, []
        return out

    def recent(self, n: int | None = None) -> list[Event]:
        items = list(self._events)
        return items if n is None else items[-n:]

    def __len__(self) -> int:
        return len(self._events)


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """The swarm's training progress at one moment (loss is NaN when no stage-0 peer knows it)."""

    t: float
    step: int
    loss: float
    tokens_per_s: float
    bytes_per_step: float

    def to_json(self) -> dict:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {"t": self.t, "step": self.step, "loss": num(self.loss),
                "tokens_per_s": num(self.tokens_per_s), "bytes_per_step": num(self.bytes_per_step)}


class History:
    """A training curve of at most `capacity` points that thins itself instead of forgetting.

    `offer()` accepts a point only when the step moved and at least `spacing_s` passed since the
    last accepted point; when full, every other point is dropped and the spacing doubles.
    """

    def __init__(self, capacity: int = 2000, spacing_s: float = 1.0) -> None:
        if capacity < 4:
            raise ValueError(f"History capacity must be >= 4, got {capacity}")
        self.capacity = capacity
        self.spacing_s = spacing_s
        self._points: list[HistoryPoint] = []
        self._unsaved: list[HistoryPoint] = []

    def offer(self, point: HistoryPoint) -> bool:
        if self._points:
            last = self._points[-1]
            if point.step == last.step or point.t - last.t < self.spacing_s:
                return False
        self._append(point)
        self._unsaved.append(point)
        return True

    def restore(self, points: Iterable[HistoryPoint]) -> None:
        for p in points:
            self._append(p)

    def _append(self, point: HistoryPoint) -> None:
        self._points.append(point)
        if len(self._points) >= self.capacity:
            self._points = self._points[::2]
            self.spacing_s *= 2

    def take_unsaved(self) -> list[HistoryPoint]:
        out, self._unsaved = self._unsaved, []
        return out

    def points(self) -> list[HistoryPoint]:
        return list(self._points)

    def __len__(self) -> int:
        return len(self._points)
