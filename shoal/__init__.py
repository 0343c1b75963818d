"""Shoal's command line and tools (`shoal demo`, status, export, the lab); see shoal/cli.py."""

from __future__ import annotations

from pathlib import Path

FALLBACK_VERSION = "0+unknown"


def package_version() -> str:
    """The installed distribution's version (what `shoal --version` prints).

    Run from a source tree that pip never installed, it is read from the pyproject.toml beside
    this package instead; `0+unknown` if neither exists.
    """
    from importlib import metadata

    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return _pyproject_version(Path(__file__).resolve().parents[1] / "pyproject.toml")


def _pyproject_version(path: Path) -> str:
    import tomllib

    try:
        with open(path, "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return FALLBACK_VERSION
