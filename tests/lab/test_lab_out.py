"""`shoal lab --out` takes a new or empty folder only (root: the lab checks root first). A folder
with an earlier run in it made the lab read that run's metrics files and stop at once, with a
summary of the old run (found when bench.churn was pointed at an old folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shoal.lab.network import netns_available

pytestmark = pytest.mark.root


def test_a_folder_with_an_earlier_run_is_refused_before_any_namespace(tmp_path: Path) -> None:
    why = netns_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "old"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "peer1-1.metrics.jsonl").write_text('{"step": 40}\n')
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    done = subprocess.run([sys.executable, "-m", "shoal.cli", "lab", "--hosts", "3", "--steps",
                           "2", "--out", str(out)], capture_output=True, text=True, timeout=120)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert done.returncode != 0
    assert f"--out {out} is not empty" in done.stderr, done.stderr
    assert after == before  # refused before the lab was built
    assert (out / "logs" / "peer1-1.metrics.jsonl").read_text() == '{"step": 40}\n'
