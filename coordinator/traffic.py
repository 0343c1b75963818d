"""Traffic: the swarm's byte and drop totals, summed from each peer's heartbeat counters.

A peer reports cumulative counters (bytes sent and received, by kind, dropped microbatches)
with each heartbeat; the coordinator adds only their growth to swarm-wide totals over the whole
run (persisted by coordinator/main.py, shown by /status and /metrics, and the training curve's
bytes per step). The rules that keep those totals honest live here:

- A counter smaller than the last one means the peer restarted it from zero: only the new value
  counts (`_delta`), so a restarted peer never subtracts.
- A peer that re-joins keeps its last reported counters (`keep_counters`): its process counts on
  from them, and from zero its next heartbeat would add its whole count again.
- The `recovery:` keys a rebuilt peer puts in bytes_by_kind are a report, not bytes
  (`take_recovery_report` takes them out before counting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocols.coordinator_client import PeerStats
from protocols.recovery_report import describe, is_report_key


@dataclass(slots=True)
class Traffic:
    """Swarm-wide totals over the whole run, robust to peers restarting their counters."""

    bytes_sent_total: int = 0
    bytes_received_total: int = 0
    dropped_total: int = 0
    bytes_by_kind_total: dict[str, int] = field(default_factory=dict)
    _curve_mark: tuple[int, int] | None = None  # (step, bytes sent) of the last curve point

    def count(self, old: PeerStats, new: PeerStats) -> None:
        """Add the growth from a member's last stats `old` to its new `new` (a heartbeat)."""
        self.bytes_sent_total += _delta(old.bytes_sent, new.bytes_sent)
        self.bytes_received_total += _delta(old.bytes_received, new.bytes_received)
        self.dropped_total += _delta(old.dropped_microbatches, new.dropped_microbatches)
        totals = self.bytes_by_kind_total
        for kind, value in new.bytes_by_kind.items():
            totals[kind] = totals.get(kind, 0) + _delta(old.bytes_by_kind.get(kind, 0), value)

    def bytes_per_step(self, step: int) -> float:
        """Bytes sent per step since the last `mark`; NaN before one or without progress."""
        if self._curve_mark is not None and step > self._curve_mark[0]:
            return (self.bytes_sent_total - self._curve_mark[1]) / (step - self._curve_mark[0])
        return math.nan

    def mark(self, step: int) -> None:
        """A curve point was taken at `step`: `bytes_per_step` counts from here."""
        self._curve_mark = (step, self.bytes_sent_total)

    def to_json(self) -> dict:
        """The totals as coordinator/main.py persists them (store meta "totals")."""
        return {"sent": self.bytes_sent_total, "received": self.bytes_received_total,
                "dropped": self.dropped_total, "by_kind": self.bytes_by_kind_total}

    def restore(self, totals: dict) -> None:
        """Totals read back from the store (`to_json`'s form; missing keys are zero)."""
        self.bytes_sent_total = totals.get("sent", 0)
        self.bytes_received_total = totals.get("received", 0)
        self.dropped_total = totals.get("dropped", 0)
        self.bytes_by_kind_total = dict(totals.get("by_kind", {}))


def take_recovery_report(stats: PeerStats) -> str:
    """Remove the `recovery:<method>:<sources>` keys a rebuilt peer puts in bytes_by_kind (the
    one free-form map of a heartbeat; peer/recovery/rebuild.py) and describe them; they are not
    bytes."""
    keys = [k for k in stats.bytes_by_kind if is_report_key(k)]
    return "; ".join(describe(k, stats.bytes_by_kind.pop(k)) for k in keys)


def keep_counters(old: PeerStats, new: PeerStats) -> None:
    """A re-joining peer's byte and drop counters as last reported: its process counts on from
    them, so its next heartbeat adds only what is new to the swarm's totals (from zero it would
    add its whole count again), and /metrics shows no drop to 0 meanwhile."""
    new.bytes_sent, new.bytes_received = old.bytes_sent, old.bytes_received
    new.dropped_microbatches = old.dropped_microbatches
    new.bytes_by_kind = dict(old.bytes_by_kind)


def _delta(old: int, new: int) -> int:
    """Growth of a peer's counter; a smaller value means the peer restarted it from zero."""
    return new - old if new >= old else new
