"""Fixtures that start local swarms of real processes and stop exactly what they started.

`swarm_factory(spec, stages)`: a coordinator, then one peer per entry of `stages` in that order
(stage 0 first in most tests: block replicas that join after the first steps download their
stage). `swarm_of(spec, layout)`: block replicas first, then the stage-0 drivers, so every
replica takes part from step 1 (bench/bandwidth.py's `start_blocks_first`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocols.runspec import RunSpec
from shoal.swarm import Swarm

LAYOUT = [0, 1, 1, 2, 2]


@pytest.fixture
def swarm_factory(tmp_path: Path) -> Iterator[Callable[..., Swarm]]:
    made: list[Swarm] = []

    def make(spec: RunSpec, stages: list[int], name: str = "swarm") -> Swarm:
        s = Swarm(tmp_path / name, spec, 0, None, "cpu")
        made.append(s)
        s.start(0)
        for i, stage in enumerate(stages):
            s.add_peer(i, ["--stage", str(stage), "--grace", "10"])
        return s

    yield make
    for s in made:
        s.stop(grace=5)


@pytest.fixture
def swarm_of(tmp_path: Path) -> Iterator[Callable[..., Swarm]]:
    """Makes swarms of real processes (blocks first, then stage 0); stops them all after."""
    from bench.bandwidth import start_blocks_first

    made: list[Swarm] = []

    def make(spec: RunSpec, layout: list[int] = LAYOUT) -> Swarm:
        s = Swarm(tmp_path / f"{spec.sync.mode}{len(made)}", spec, 0, None, "cpu")
        made.append(s)
        s.start(0)
        start_blocks_first(s, layout)
        return s

    yield make
    for s in made:
        s.stop(grace=5)
