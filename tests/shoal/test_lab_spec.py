"""`shoal lab --config`: explicit flags win, the file's values win over the lab's defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from protocols.runspec import RunSpec
from shoal.lab.command import add_arguments, lab_spec


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(RunSpec().replace(**{"pipeline.stages": 3, "run.steps": 7,
                                         "sync.mode": "diloco", "run.seed": 5}).to_toml())
    return path


def test_the_files_values_beat_the_labs_defaults(config: Path) -> None:
    args = _args("--config", str(config), "--hosts", "5")
    spec = lab_spec(args)
    assert (spec.pipeline.stages, spec.run.steps, spec.sync.mode, spec.run.seed) == \
        (3, 7, "diloco", 5)
    assert args.steps == 7  # the chaos schedule reads the resolved number of steps


def test_explicit_flags_beat_the_file(config: Path) -> None:
    spec = lab_spec(_args("--config", str(config), "--hosts", "5", "--steps", "9",
                          "--sync", "demo", "--seed", "1"))
    assert (spec.pipeline.stages, spec.run.steps, spec.sync.mode, spec.run.seed) == \
        (3, 9, "demo", 1)


def test_without_a_file_the_labs_defaults_hold() -> None:
    spec = lab_spec(_args())
    assert (spec.pipeline.stages, spec.run.steps, spec.sync.mode, spec.run.seed) == \
        (2, 50, "allreduce", 0)


def test_a_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--config"):
        lab_spec(_args("--config", str(tmp_path / "nope.toml")))
