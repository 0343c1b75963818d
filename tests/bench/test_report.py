"""bench/report.py: a figure held against its target is rounded toward missing it, and the printed
verdict always agrees with the printed figure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.report import Target, cpu_model, fresh_out, machine, rounded, targets_line


def test_a_floor_target_rounds_down_so_a_near_miss_never_prints_as_met() -> None:
    t = Target("allreduce/diloco", 400.0, digits=1)
    assert t.figure(399.96) == "399.9"
    assert not t.met(399.96)
    assert t.verdict(399.96) == "allreduce/diloco = 399.9 (target >= 400: NOT met)"
    assert t.verdict(400.0) == "allreduce/diloco = 400.0 (target >= 400: met)"
    assert Target("ddp/demo", 3.0).figure(2.997) == "2.99"


def test_a_ceiling_target_rounds_up() -> None:
    p99 = Target("p99", 50.0, at_least=False, strict=True, unit="ms")
    assert p99.verdict(49.996) == "p99 = 50.00 ms (target < 50 ms: NOT met)"
    assert p99.verdict(49.99) == "p99 = 49.99 ms (target < 50 ms: met)"
    spsa = Target("spsa_bytes_per_step", 16.0, at_least=False, digits=1)
    assert spsa.figure(16.01) == "16.1" and not spsa.met(16.01)
    assert spsa.met(16.0)


def test_rounding_works_on_the_decimal_form_not_the_binary_float() -> None:
    assert rounded(0.29, 2, down=True) == "0.29"  # 0.29 * 100 is 28.999... in binary
    assert rounded(1.005, 2, down=False) == "1.01"
    assert rounded(-0.00031, 4, down=True) == "-0.0004"
    assert rounded(math.inf, 2, down=True) == "inf"


def test_nan_never_meets_a_target() -> None:
    assert not Target("x", 1.0).met(math.nan)
    assert not Target("x", 1.0, at_least=False).met(math.nan)
    assert targets_line([(Target("a", 1.0), 2.0), (Target("b", 1.0), math.nan)]) == (
        "targets: a = 2.00 (target >= 1: met); b = nan (target >= 1: NOT met)")


def test_the_machine_line_reads_what_the_kernel_reports() -> None:
    assert cpu_model("processor\t: 0\nmodel name\t: Example CPU 9000\n") == "Example CPU 9000"
    assert cpu_model("Hardware\t: BCM2835\n") == "BCM2835"
    assert cpu_model("") == "unknown CPU"
    line = machine()
    assert line.split()[1] == "CPUs" and int(line.split()[0]) >= 1
    assert "usable by this process" in line and "load " in line


def test_out_must_be_new_or_empty(tmp_path: Path) -> None:
    assert fresh_out(str(tmp_path / "new"), "bench.wan").is_dir()
    assert fresh_out(str(tmp_path / "new"), "bench.wan") == tmp_path / "new"  # empty: fine
    (tmp_path / "new" / "direct").mkdir()
    with pytest.raises(SystemExit, match="not an empty folder"):
        fresh_out(str(tmp_path / "new"), "bench.wan")
