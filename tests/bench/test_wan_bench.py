"""bench/wan.py's own logic, no lab: bytes per step from the hosts' counters over the steps that
trained, and DDP rows counted only for steps every rank has logged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.wan import WireMeter, crossing, ddp_rows, parse_sets, spec_for
from protocols.runspec import RunSpecError


def test_bytes_per_step_spans_the_readings_after_the_first_step() -> None:
    meter = WireMeter(base=1_000)
    meter.sample(0, 5_000)  # start-up: not counted
    meter.sample(2, 10_000)
    meter.sample(2, 12_000)
    meter.sample(6, 30_000)
    meter.end = 31_000
    assert meter.window == (2, 6)
    assert meter.per_step == (30_000 - 10_000) / 4
    assert meter.total == 30_000


def test_no_figure_without_two_readings_of_different_steps() -> None:
    meter = WireMeter()
    assert meter.per_step is None and meter.window is None and meter.total is None
    meter.sample(3, 100)
    meter.sample(3, 200)
    assert meter.per_step is None


def test_ddp_rows_keep_only_steps_every_rank_logged(tmp_path: Path) -> None:
    for rank, steps in enumerate([(1, 2, 3), (1, 2)]):
        lines = [json.dumps({"t": 10.0 + s, "step": s, "loss": 3.0 - rank, "seconds": 1.0})
                 for s in steps]
        (tmp_path / f"ddp{rank}.jsonl").write_text("\n".join(lines) + '\n{"t": 1')  # half-written
    rows = ddp_rows(tmp_path, world=2)
    assert sorted(r["step"] for r in rows) == [1, 1, 2, 2]


def test_crossing_uses_the_mean_over_ranks_smoothed() -> None:
    rows = [{"t": 10.0 + s, "step": s, "loss": loss, "seconds": 1.0}
            for s, pair in enumerate([(4.0, 4.0), (3.0, 2.0), (2.5, 2.5), (2.0, 2.0)], start=1)
            for loss in pair]
    # means by step 4.0, 2.5, 2.5, 2.0: smoothed 3.0 at step 3, 2.33 at step 4
    assert crossing(rows, 2.8) == (14.0 - 10.0, 4, 2.0)  # from the first step's start


def test_set_overrides_reach_every_shoal_mode_and_bad_ones_are_refused() -> None:
    sets = parse_sets(["pipeline.activations=fp8", "sync.timeout_s=25"])
    assert sets == {"pipeline.activations": "fp8", "sync.timeout_s": 25}
    for mode in ("allreduce", "demo", "diloco"):
        spec = spec_for(mode, 10, sets)
        assert spec.pipeline.activations == "fp8" and spec.sync.timeout_s == 25
        assert spec.sync.mode == mode and spec.model.d_model == 192
    assert spec_for("demo", 10).pipeline.activations == "int8"  # no --set: the spec's default
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        parse_sets(["pipeline.activations"])
    with pytest.raises(RunSpecError, match=r"pipeline\.activations must be one of"):
        spec_for("demo", 10, parse_sets(["pipeline.activations=fp9"]))
