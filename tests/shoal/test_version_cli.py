"""`shoal --version`: the installed package's version, through the real command line."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import shoal
from tests.shoal.test_status_cli import run_shoal

ROOT = Path(__file__).resolve().parents[2]


def pyproject_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_shoal_version_prints_the_package_version() -> None:
    done = run_shoal("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"shoal {metadata.version('shoal')}\n"
    assert metadata.version("shoal") == pyproject_version(), "pip's copy is this checkout's"


def test_without_an_installed_package_it_reads_pyproject(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert shoal.package_version() == pyproject_version()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert shoal._pyproject_version(tmp_path / "pyproject.toml") == shoal.FALLBACK_VERSION
    assert shoal._pyproject_version(tmp_path / "absent.toml") == shoal.FALLBACK_VERSION
