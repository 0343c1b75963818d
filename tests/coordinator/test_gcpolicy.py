"""coordinator/gcpolicy.py: long-lived objects frozen on a schedule, one full collection an
hour, and the collector's pauses recorded."""

from __future__ import annotations

import gc
import sys
import threading

from coordinator.gcpolicy import FREEZE_EVERY_S, PAUSE_WINDOW_S, SLOTS, THAW_EVERY_S, GcPolicy


def test_freezes_on_schedule_thaws_hourly_and_records_pauses() -> None:
    t = [0.0]
    policy = GcPolicy(clock=lambda: t[0])
    try:
        policy.tick()
        assert policy.freezes == 0  # not due yet
        t[0] = FREEZE_EVERY_S
        kept = [[i] for i in range(1000)]  # long-lived objects
        policy.tick()
        assert policy.freezes == 1 and gc.get_freeze_count() > 0
        assert policy.worst_pause_s() > 0  # the young collection before the freeze
        gc.unfreeze()
        t[0] = THAW_EVERY_S + 1
        policy.tick()  # the hourly full collection, then a freeze again
        assert policy.freezes == 2 and policy.thawed_at == t[0]
        t[0] += PAUSE_WINDOW_S + 1
        assert policy.worst_pause_s() == 0.0  # the window forgets old pauses
        del kept
    finally:
        policy.close()
        gc.unfreeze()
    assert policy._callback not in gc.callbacks


def test_the_pause_record_stays_bounded_when_nobody_reads_it() -> None:
    """Young collections come many times a second; a coordinator whose /metrics nobody scrapes
    must not keep one record per collection for its whole life."""
    t = [0.0]
    policy = GcPolicy(clock=lambda: t[0])
    try:
        for i in range(2000):
            t[0] = i * 1.0  # one collection a second for 2000 s
            policy._callback("start", {})
            policy._callback("stop", {})
        assert len(policy.slots) == SLOTS  # one per second of the window, whatever the rate
        assert policy.worst_pause_s() > 0  # the last minute's collections are still seen
    finally:
        policy.close()


def test_reading_the_pauses_while_collections_record_them() -> None:
    """gc callbacks run in whichever thread collects, at any allocation, so /metrics reads the
    record while other threads write it. With a growing record (a deque) the reader failed
    with "deque mutated during iteration" and the scrape answered 500 (seen in CI); this
    hammers both at a tiny switch interval."""
    t = [0.0]
    policy = GcPolicy(clock=lambda: t[0])
    stop = threading.Event()

    def collections() -> None:
        while not stop.is_set():
            policy._callback("start", {})
            policy._callback("stop", {})
            t[0] += 0.01

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writer = threading.Thread(target=collections)
    writer.start()
    try:
        for _ in range(20000):
            assert policy.worst_pause_s() >= 0.0
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
        policy.close()
