"""shoal/local.py's helpers that the demo and the lab share: the throughput of the progress line
and the wait for the replicas to agree before the summary."""

from __future__ import annotations

from shoal.local import settle, tokens_per_s


def test_tokens_per_s_adds_the_drivers_of_a_step_and_takes_the_slowest() -> None:
    rows = [{"step": 1, "tokens": 100, "seconds": 1.0},  # two drivers side by side
            {"step": 1, "tokens": 100, "seconds": 2.0},
            {"step": 2, "tokens": 300, "seconds": 2.0}]
    assert tokens_per_s(rows) == 500 / 4.0
    assert tokens_per_s(rows, last=1) == 300 / 2.0
    assert tokens_per_s([]) == 0.0


def status(*hashes: tuple[int, str]) -> dict:
    return {"peers": [{"stage": s, "state": "training", "state_hash": h} for s, h in hashes]}


def test_settle_returns_once_every_stage_agrees_and_gives_up_after_its_bound() -> None:
    seen = iter([status((1, "x"), (1, "y")), status((1, "x"), (1, "x"), (0, "z"))])
    got = settle(lambda: next(seen), None, timeout_s=30.0, poll_s=0.0)
    assert got == status((1, "x"), (1, "x"), (0, "z"))
    # a replica never catches up: the last status seen, after the bound
    stuck = status((1, "x"), (1, "y"))
    assert settle(lambda: stuck, None, timeout_s=0.05, poll_s=0.01) == stuck
    # a coordinator that does not answer: the status the caller had
    assert settle(lambda: None, stuck, timeout_s=0.05, poll_s=0.01) == stuck


def test_the_summary_names_the_stages_whose_replicas_differ() -> None:
    from shoal.local import stages_differ

    assert stages_differ({"0": ["a", "a"], "1": ["b"], "2": ["c", "d"], "3": ["e", ""]}) == [
        "2", "3"]
    assert stages_differ({"0": ["a"], "10": ["x", "y"], "9": ["z", "w"]}) == ["9", "10"]
