"""The SPSA ledger's bounds (issue #12 row 11): posts only for the open step, once per peer per
step, and a far-future post cannot restart (wipe) the history."""

from __future__ import annotations

import pytest

from coordinator.ledger import START_SLACK, LedgerBehind, LedgerRefused, SpsaLedger


def test_posts_only_for_the_open_step_and_once_per_peer() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0)
    led.post(1, "a", b"\x01", ["a", "b"], now=0.0, max_start=2)
    led.post(2, "a", b"\x01", ["a", "b"], now=0.0)  # the step after the open one: fine
    with pytest.raises(LedgerRefused, match="not open"):
        led.post(3, "a", b"\x01", ["a"], now=0.0)
    with pytest.raises(LedgerRefused, match="not open"):
        led.post(10**15, "b", b"\x01", ["a"], now=0.0, max_start=2)
    led.post(1, "a", b"\x01", ["a", "b"], now=0.1)  # a retry of the same post changes nothing
    with pytest.raises(LedgerRefused, match="one post per peer"):
        led.post(1, "a", b"\x07", ["a", "b"], now=0.2)
    led.post(1, "b", b"\x02", ["a", "b"], now=0.3)
    assert led.next_step == 2 and led.steps(1)[0].codes == b"\x01\x02"


def test_a_far_future_post_cannot_wipe_the_history() -> None:
    led = SpsaLedger(directions=1, timeout_s=1.0)
    for s in range(1, 6):
        led.post(s, "a", b"\x01", ["a"], now=float(s), max_start=7)
    assert led.next_step == 6 and len(led.steps(1)) == 5
    with pytest.raises(LedgerRefused, match="beyond the swarm"):
        led.post(10**15, "a", b"\x01", ["a"], now=10.0, max_start=7)
    assert led.base_step == 1 and len(led.steps(1)) == 5
    # a restart at a step the swarm has reached is still taken (stage 0 rebuilt from a snapshot)
    led.post(8, "a", b"\x01", ["a"], now=11.0, max_start=8)
    assert led.base_step == 8 and led.next_step == 9
    fresh = SpsaLedger(directions=1, timeout_s=1.0)
    with pytest.raises(LedgerRefused, match="beyond"):
        fresh.post(2**53 - 1, "a", b"\x01", ["a"], now=0.0, max_start=3)
    assert not fresh.started


def test_a_start_a_little_ahead_of_the_attested_step_is_asked_to_retry() -> None:
    """After a coordinator restart its attested step may lag the driver's by a few steps."""
    led = SpsaLedger(directions=1, timeout_s=1.0)
    with pytest.raises(LedgerBehind):
        led.post(40, "a", b"\x01", ["a"], now=0.0, max_start=32)
    with pytest.raises(LedgerRefused) as info:
        led.post(32 + START_SLACK + 1, "a", b"\x01", ["a"], now=0.0, max_start=32)
    assert not isinstance(info.value, LedgerBehind)
    led.post(40, "a", b"\x01", ["a"], now=1.0, max_start=40)  # the heartbeat arrived
    assert led.base_step == 40
    with pytest.raises(LedgerRefused) as info:  # holding history: no retry, refused
        led.post(45, "a", b"\x01", ["a"], now=2.0, max_start=42)
    assert not isinstance(info.value, LedgerBehind)


def test_closed_steps_survive_a_restart_through_the_store(tmp_path) -> None:
    """Closed steps go to the SQLite store as they close; a new ledger restored from it goes on
    at the next step and serves the old steps to a replica that replays them."""
    from coordinator.store import Batch, Store

    ledger = SpsaLedger(directions=2, timeout_s=5.0)
    for step in (1, 2, 3):
        ledger.post(step, "a", bytes([1, 255]), ["a", "b"], now=float(step))
        ledger.post(step, "b", bytes([step, 0]), [], now=float(step))
    store = Store(tmp_path)
    reset, steps = ledger.take_unsaved()
    store.write(Batch(spsa=steps, spsa_reset=reset))
    assert ledger.take_unsaved() == (False, [])  # taken once
    store.close()

    again = SpsaLedger(directions=2, timeout_s=5.0)
    again.restore(Store(tmp_path).load_spsa())
    assert (again.base_step, again.next_step) == (1, 4)
    assert [c.step for c in again.steps(2)] == [2, 3]
    assert again.steps(3)[0].codes == bytes([1, 255, 3, 0])
    assert again.steps(3)[0].peers == ("a", "b")
    again.post(4, "a", bytes([1, 1]), ["a"], now=10.0)  # goes on; no fresh start
    assert again.next_step == 5 and again.base_step == 1


def test_a_fresh_start_drops_the_saved_history(tmp_path) -> None:
    from coordinator.store import Batch, Store

    ledger = SpsaLedger(directions=1, timeout_s=5.0)
    ledger.post(1, "a", b"\x01", [], now=1.0)
    store = Store(tmp_path)
    store.write(Batch(spsa=ledger.take_unsaved()[1]))
    ledger.post(50, "a", b"\x01", [], now=2.0)  # stage 0 rebuilt far ahead: a new start
    reset, steps = ledger.take_unsaved()
    assert reset and [c.step for c in steps] == [50]
    store.write(Batch(spsa=steps, spsa_reset=reset))
    restored = SpsaLedger(directions=1, timeout_s=5.0)
    restored.restore(store.load_spsa())
    assert (restored.base_step, restored.next_step) == (50, 51)


def test_restore_keeps_the_newest_consecutive_steps() -> None:
    from coordinator.ledger import ClosedStep

    ledger = SpsaLedger(directions=1, timeout_s=5.0)
    ledger.restore([ClosedStep(s, ("a",), b"\x01") for s in (1, 2, 7, 8, 9)])
    assert (ledger.base_step, ledger.next_step) == (7, 10)
