"""Markers by folder, skips that CI does not accept, and a count of what ran per marker.

Every test carries the marker of the package folder it lives in (`-m swarm` runs the
multi-process swarm tests, `-m "not lab"` leaves out the namespace lab).

The folders: optim/ protocols/ coordinator/ peer/ (unit tests, one process), swarm/ (real peer
and coordinator processes on 127.0.0.1), lab/ (network namespaces: root), shoal/ (the command
line through the `shoal` entry point), bench/ (the benchmarks' own logic, small sizes),
security/ (an attacker's calls against real coordinator and peer processes, and fuzzing).

Under `CI=true` a skip of a test marked browser, lab, root, docker or mdns is a failure: those
tests skip on a developer's machine that lacks Chromium, root, `ip netns`, docker-compose or a
multicast interface, and CI installs all of them (.ci/run), so a skip there means CI is not
testing what it claims. Other skips (no CUDA device) stay skips. The terminal summary ends with
`markers: optim=N protocols=N ...`: how many tests of each marker ran (passed or failed, not
skipped), so a log shows at a glance that the browser, lab and docker tests ran.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

FOLDERS = ("optim", "protocols", "coordinator", "peer", "swarm", "lab", "shoal", "bench",
           "security")
REQUIRED_IN_CI = ("browser", "lab", "root", "docker", "mdns")
COUNTED = (*FOLDERS, "browser", "root", "docker", "mdns", "slow")
_HERE = Path(__file__).resolve().parent
_ran: Counter[str] = Counter()


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(_HERE)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if folder in FOLDERS:
            item.add_marker(getattr(pytest.mark, folder))
        if folder == "lab":
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    markers = {m.name for m in item.iter_markers()}
    if report.when == "call" and not report.skipped:
        _ran.update(m for m in COUNTED if m in markers)
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    required = sorted(markers.intersection(REQUIRED_IN_CI))
    if not required:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, where tests marked {', '.join(required)} are "
                       f"required (.ci/run installs what they need): {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.option.collectonly:
        return
    counts = " ".join(f"{m}={_ran[m]}" for m in COUNTED)
    terminalreporter.write_line(f"markers: {counts}  (tests that ran, not skipped)")
