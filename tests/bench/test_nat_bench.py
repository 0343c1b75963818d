"""bench/nat.py's own logic, no lab: steady time per step from the drivers' metrics files, the
NAT'd peers' check and the last line from canned summaries, and a reused --out refused."""

from __future__ import annotations

import json
from pathlib import Path

from bench.nat import steady_step_s, step_ends, verdict


def write_rows(path: Path, rows: list[tuple[int, float]], tail: str = "") -> None:
    path.write_text("".join(json.dumps({"t": t, "step": s, "loss": 3.0}) + "\n" for s, t in rows)
                    + tail)


def test_a_step_ends_when_its_last_driver_wrote_it(tmp_path: Path) -> None:
    write_rows(tmp_path / "peer1-0.metrics.jsonl", [(1, 100.0), (2, 101.0), (3, 102.0)])
    write_rows(tmp_path / "peer3-0.metrics.jsonl", [(1, 100.5), (2, 100.9), (3, 104.0)],
               tail='{"t": 1')  # half-written
    ends = step_ends(tmp_path)
    assert ends == {1: 100.5, 2: 101.0, 3: 104.0}
    assert steady_step_s(ends, warmup=1) == ((104.0 - 100.5) / 2, 1, 3)
    assert steady_step_s(ends, warmup=2) == (3.0, 2, 3)
    assert steady_step_s(ends, warmup=3) is None  # no span left after the warm-up
    assert steady_step_s({}, warmup=0) is None


def reach(host: str, stage: int, step: int, how: str, live: bool = True) -> dict:
    return {"host": host, "peer_id": host, "address": "", "stage": stage, "step": step,
            "live": live, "behind_nat": True, "reachable": how}


def summary(seconds: float, steady: float | None, peers: list[dict], completed: bool = True
            ) -> dict:
    return {"steps": 40, "seconds": seconds, "completed": completed, "peers_reach": peers,
            "steady": (steady, 10, 40) if steady is not None else None,
            "relayed_bytes": 0, "direct_bytes": 0}


def test_ratio_of_steady_times_and_both_nat_peers_relayed() -> None:
    direct = summary(40.0, 1.0, [])
    natted = summary(80.0, 1.25, [reach("peer3", 0, 40, "relayed"),
                                  reach("peer4", 1, 40, "relayed")])
    lines, code = verdict(direct, natted)
    assert code == 0
    assert lines[-1] == "nat: relayed/direct step time = 1.25"
    assert "target <= 1.3: met" in lines[-2] and "relayed to the last step: yes" in lines[-2]


def test_whole_run_time_when_no_steady_span_and_a_missed_target_rounds_up() -> None:
    direct = summary(30.0, None, [])
    natted = summary(39.02, None, [reach("peer3", 0, 40, "relayed"),
                                   reach("peer4", 1, 40, "relayed")])
    lines, _ = verdict(direct, natted)
    assert lines[-1] == "nat: relayed/direct step time = 1.31"  # 1.3007 rounds toward missing
    assert "NOT met" in lines[-2]


def test_a_nat_peer_not_relayed_or_behind_fails() -> None:
    direct = summary(40.0, 1.0, [])
    for peer4 in ([reach("peer4", 1, 40, "direct")], [reach("peer4", 1, 31, "relayed")],
                  [reach("peer4", 1, 40, "relayed", live=False)], []):
        natted = summary(40.0, 1.0, [reach("peer3", 0, 40, "relayed"), *peer4])
        lines, code = verdict(direct, natted)
        assert code == 1
        assert "relayed to the last step: NO" in lines[-2]
        assert any(line.startswith("  peer4:") and "NOT relayed" in line for line in lines)


def test_an_incomplete_run_gives_no_ratio() -> None:
    lines, code = verdict(summary(40.0, 1.0, []), summary(40.0, 1.0, [], completed=False))
    assert code == 1
    assert lines[-1] == "nat: relayed/direct step time = n/a (a run did not complete)"
