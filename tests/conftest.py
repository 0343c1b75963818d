"""Markers by folder: every test carries the marker of the package folder it lives in
(`-m swarm` runs the multi-process swarm tests, `-m "not lab"` leaves out the namespace lab).

The folders: optim/ protocols/ coordinator/ peer/ (unit tests, one process), swarm/ (real peer
and coordinator processes on 127.0.0.1), lab/ (network namespaces: root), shoal/ (the command
line through the `shoal` entry point), bench/ (the benchmarks' own logic, small sizes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FOLDERS = ("optim", "protocols", "coordinator", "peer", "swarm", "lab", "shoal", "bench")
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(_HERE)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if folder in FOLDERS:
            item.add_marker(getattr(pytest.mark, folder))
        if folder == "lab":
            item.add_marker(pytest.mark.root)
