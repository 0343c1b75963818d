"""The peer's progress lines: rates over the interval, a line on a state change, JSON fields."""

from __future__ import annotations

import json
import logging
import math

from peer.progress import ProgressReporter, progress_fields, progress_text
from protocols.coordinator_client import PeerStats
from protocols.logs import JsonFormatter


def stats(**kw) -> PeerStats:
    base = {"state": "training", "samples_per_s": 120.0, "step": 10, "bytes_sent": 1_000_000,
            "bytes_received": 2_000_000}
    base.update(kw)
    return PeerStats(**base)


def test_first_line_has_totals_but_no_rates() -> None:
    f = progress_fields(1, stats(), None, 0.0)
    assert f["steps_per_min"] is None and f["send_bytes_per_s"] is None
    assert f["bytes_sent"] == 1_000_000 and "loss" not in f
    assert progress_text(f).startswith("stage 1 · training · step 10")


def test_rates_are_measured_over_the_interval() -> None:
    before = stats()
    now = stats(step=16, bytes_sent=4_000_000, bytes_received=2_500_000)
    f = progress_fields(1, now, before, 30.0)
    assert f["steps_per_min"] == 12.0
    assert f["send_bytes_per_s"] == 100_000 and f["recv_bytes_per_s"] == round(500_000 / 30)
    assert "↑ 0.1 MB/s" in progress_text(f)


def test_stage0_reports_loss_block_stages_do_not() -> None:
    assert progress_fields(0, stats(loss=2.5, tokens_per_s=900.0), None, 0)["loss"] == 2.5
    assert "loss" not in progress_fields(0, stats(loss=math.nan), None, 0)
    assert "loss" not in progress_fields(2, stats(loss=2.5), None, 0)


def test_reporter_is_due_on_interval_and_on_state_change() -> None:
    r = ProgressReporter(every_s=30.0)
    assert r.due(stats(), 0.0)
    r.take(1, stats(), 0.0)
    assert not r.due(stats(), 10.0)
    assert r.due(stats(state="draining"), 10.0)
    assert r.due(stats(), 30.0)
    assert not ProgressReporter(every_s=0).due(stats(), 0.0)


def test_json_log_carries_the_fields() -> None:
    f = progress_fields(0, stats(loss=2.0, tokens_per_s=10.0), None, 0)
    rec = logging.LogRecord("shoal.peer", logging.INFO, __file__, 1, "%s", (progress_text(f),),
                            None)
    rec.fields = f
    out = json.loads(JsonFormatter().format(rec))
    assert out["stage"] == 0 and out["loss"] == 2.0 and out["message"].startswith("stage 0")
