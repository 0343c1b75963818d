"""bench/spsa_verify.py's own bookkeeping on made-up metrics rows: what counts as a lie, as
caught, as let through, as an honest contribution struck, and the CPU-time reader. The bench's
swarm path is covered by tests/swarm/test_spsa_verify_swarm.py (slow). No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
import types

from bench import spsa_verify as bench

LIAR_ID = "liar"


def row(step: int, posted: list[int], honest: list[int], flagged: list[str],
        diff: dict[str, int] | None = None) -> dict:
    return {"step": step, "spsa_codes": posted, "spsa_honest_codes": honest,
            "spsa_flagged": flagged, "spsa_peers": ["a", "b", "c"], "seconds": 0.1,
            "loss": 5.0, "microbatches": 1, "spsa_checked": [],
            "spsa_check_diff": diff or {}}


def arm(liar_rows: list[dict], others: list[dict] | None = None) -> bench.Arm:
    rows = {i: others or [] for i in range(bench.DRIVERS)}
    rows[bench.LIAR] = liar_rows
    return bench.Arm("t", rows, 0.0, 0.0)


def test_lies_caught_and_let_through_are_counted_from_the_liars_rows() -> None:
    rows = [row(1, [50], [3], []),  # a lie, not caught (inside the first 10 steps)
            row(2, [4], [3], []),  # within tolerance: not a lie
            row(3, [-90], [3], [LIAR_ID]),  # caught
            row(4, [], [], []),  # abstained
            row(12, [100], [3], []),  # a lie let through after step 1 + 10
            row(13, [100], [3], [LIAR_ID])]
    lies = bench.count_lies(arm(rows), LIAR_ID, 2)
    assert (lies.posted, lies.caught, lies.within_tolerance) == (4, 2, 1)
    assert (lies.first_lie, lies.first_catch, lies.missed_after) == (1, 3, [12])


def test_honest_contributions_struck_and_noise_are_read_from_every_driver() -> None:
    honest_rows = [row(1, [1], [1], [LIAR_ID], {"b": 0}), row(2, [1], [1], ["b"], {"c": 1})]
    a = arm([row(1, [1], [1], [LIAR_ID])], honest_rows)
    assert bench.false_flags(a, LIAR_ID) == (bench.DRIVERS - 1) // bench.DRIVERS
    every = bench.Arm("t", {i: honest_rows for i in range(bench.DRIVERS)}, 0.0, 0.0)
    assert bench.false_flags(every, LIAR_ID) == 1  # step 2 struck b, as all four drivers saw
    assert sorted(bench.noise(every)) == [0] * bench.DRIVERS + [1] * bench.DRIVERS
    assert sorted(bench.noise(every, "c")) == [0] * bench.DRIVERS  # the liar's own are not noise


def test_cpu_seconds_adds_the_swarms_processes() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "sum(range(5_000_000)); print(1, flush=True)"
                             "; input()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        fake = types.SimpleNamespace(peers=[busy], coordinator=None)
        assert busy.stdout.readline().strip() == b"1"  # it has burnt its CPU
        assert bench._cpu_seconds(fake) > 0.0
        busy.stdin.write(b"\n")
        busy.stdin.flush()
        busy.wait(10)
        assert bench._cpu_seconds(fake) == 0.0  # an exited process reads as nothing, no error
    finally:
        if busy.poll() is None:
            busy.kill()
