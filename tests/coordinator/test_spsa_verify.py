"""Verified SPSA in the coordinator's ledger: who checks whom, the verifier's verdict, and that a
contradicted contribution is struck from the closed step every replica fetches."""

from __future__ import annotations

import pytest

from coordinator.ledger import LedgerRefused, SpsaLedger, ledger_reply
from coordinator.spsa_verify import PROBATION, SUSPECT_CLEAR, Verification, consistent

PEERS = ["a", "b", "c", "d"]
KEY = b"k" * 16


def i8(*codes: int) -> bytes:
    return bytes(c & 0xFF for c in codes)


def test_the_verdict_is_a_code_tolerance_on_signed_codes() -> None:
    assert consistent(i8(5), i8(5), 0)
    assert consistent(i8(5), i8(7), 2) and not consistent(i8(5), i8(8), 2)
    assert consistent(i8(-1), i8(1), 2)  # signed: 0xFF is -1, not 255
    assert not consistent(i8(-127), i8(127), 2)
    assert not consistent(i8(3, 4), i8(3, 9), 2)  # every direction must agree
    assert not consistent(i8(3), i8(3, 3), 2)


def test_every_contributor_is_checked_once_per_window_by_another_peer() -> None:
    v = Verification(0.25, 2, KEY)
    assert v.window == 4
    assert set(v.assignment(0, PEERS)) == set(PEERS)  # newcomers: all on probation
    v.suspects.clear()  # as if every one had passed it
    checked: dict[str, list[int]] = {p: [] for p in PEERS}
    for step in range(4, 44):  # windows 1..10, whole
        got = v.assignment(step, PEERS)
        assert got == v.assignment(step, list(reversed(PEERS)))  # fixed by the first call
        for x, verifier in got.items():
            assert verifier != x and verifier in PEERS
            checked[x].append(step)
            assert v.checks_for(verifier, step, PEERS).count(x) == 1
    for steps in checked.values():
        assert [s // 4 for s in steps] == list(range(1, 11)), steps  # once in every window
    positions = {x: [s % 4 for s in steps] for x, steps in checked.items()}
    assert len({tuple(p) for p in positions.values()}) > 1  # drawn per contributor and window
    assert any(len(set(p)) > 1 for p in positions.values())
    assert Verification(1.0, 2, KEY).assignment(7, PEERS).keys() == set(PEERS)
    assert Verification(0.25, 2, KEY).assignment(3, ["a"]) == {}  # nobody else to verify


def _post_all(led: SpsaLedger, step: int, codes: dict[str, bytes],
              recompute: dict[str, bytes] | None = None, shard_of=None) -> None:
    """Every peer posts; a verifier attaches its recomputation of the contributions assigned."""
    recompute = recompute or {}
    assign = led.verification.assignment(step, PEERS) if led.verification else {}
    for i, p in enumerate(PEERS):
        checks = [(x, recompute.get(x, codes[x]), (shard_of or (lambda y: (PEERS.index(y), 4)))(x))
                  for x, v in assign.items() if v == p]
        led.post(step, p, codes[p], PEERS, now=float(step), shard=(i, 4), checks=checks)


def test_a_contradicted_contribution_is_struck_from_the_closed_step() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0, verify=1.0, tolerance=2, key=KEY)
    codes = {"a": i8(10), "b": i8(-20), "c": i8(30), "d": i8(99)}
    honest_d = i8(-40)
    # d lied (posted 99, its batch gives -40); a's recomputation is 1 off: fp noise, passes
    _post_all(led, 1, codes, recompute={"d": honest_d, "a": i8(11)})
    closed = led.steps(1)[0]
    assert closed.flagged == ("d",)
    assert closed.peers == ("a", "b", "c") and closed.codes == i8(10, -20, 30)
    reply = ledger_reply(led, 1, 0)
    assert list(reply.steps[0].flagged) == ["d"] and list(reply.steps[0].peers) == ["a", "b", "c"]
    stats = led.verification.stats
    assert stats.checked == 4 and stats.flagged == 1 and stats.flagged_by_peer == {"d": 1}
    assert led.verification.suspects == {"a": PROBATION - 1, "b": PROBATION - 1,
                                         "c": PROBATION - 1, "d": SUSPECT_CLEAR}


def test_with_repair_a_struck_direction_is_applied_with_the_verifiers_codes() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0, verify=1.0, tolerance=2, key=KEY, repair=True)
    codes = {"a": i8(10), "b": i8(-20), "c": i8(30), "d": i8(99)}
    _post_all(led, 1, codes, recompute={"d": i8(-40)})
    closed = led.steps(1)[0]
    assert closed.flagged == ("d",)
    assert closed.peers == ("a", "b", "c", "d") and closed.codes == i8(10, -20, 30, -40)


def test_newcomers_are_checked_at_their_first_steps_then_once_per_window() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0, verify=0.25, tolerance=2, key=KEY)
    v = led.verification
    for step in range(1, PROBATION + 1):
        assert set(v.assignment(step, PEERS)) == set(PEERS)
        _post_all(led, step, {p: i8(1) for p in PEERS})
    assert v.suspects == {}
    late = Verification(0.25, 2, KEY)
    late.assignment(1, PEERS)
    late.suspects.clear()
    assert "e" in late.assignment(2, [*PEERS, "e"])  # a joiner is on probation at once
    first = dict(late.assignment(3, PEERS[:2]))  # step 3 first asked with two members only
    assert late.assignment(3, PEERS[:2]) == first
    assert "f" in late.assignment(3, [*PEERS[:2], "f"])  # one listed later in the step: added
    assert {x: v for x, v in late.assignment(3, PEERS).items() if x in first} == first


def test_a_suspect_is_checked_every_step_until_it_passes_enough() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0, verify=0.25, tolerance=2, key=KEY)
    v = led.verification
    v.suspects["d"] = 3
    for step in range(1, 4):
        assert "d" in v.assignment(step, PEERS)
        _post_all(led, step, {p: i8(1) for p in PEERS})  # d is honest now
        assert led.steps(step)[0].flagged == ()
    assert "d" not in v.suspects  # three passes cleared it
    windows_hit = sum("d" in v.assignment(s, PEERS) for s in range(4, 24))
    assert windows_hit == 5  # back to once per window of 4


def test_unassigned_inconclusive_and_missing_checks_strike_nothing() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0, verify=1.0, tolerance=2, key=KEY)
    assign = led.verification.assignment(1, PEERS)
    x, verifier = "d", assign["d"]
    outsider = next(p for p in PEERS if p not in (x, verifier))
    codes = {p: i8(5) for p in PEERS}
    for i, p in enumerate(PEERS):
        checks = []
        if p == outsider:  # not assigned d: its accusation is ignored
            checks.append((x, i8(-100), (3, 4)))
        for y, v in assign.items():
            if v == p:  # the assigned verifier used another batch for d: inconclusive
                checks.append((y, i8(-100), (0, 3) if y == x else (PEERS.index(y), 4)))
        led.post(1, p, codes[p], PEERS, now=1.0, shard=(i, 4), checks=checks)
    closed = led.steps(1)[0]
    assert x not in closed.flagged
    assert led.verification.stats.inconclusive == 1
    with pytest.raises(LedgerRefused, match="must carry 1 codes"):
        led.post(2, "a", i8(1), PEERS, now=2.0, checks=[("b", i8(1, 2), (1, 4))])


def test_without_verification_nothing_is_assigned_or_struck() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0)
    assert led.verification is None and led.checks_for("a", 1, PEERS) == []
    _post_all(led, 1, {p: i8(7) for p in PEERS})
    assert led.steps(1)[0].flagged == () and len(led.steps(1)[0].peers) == 4
