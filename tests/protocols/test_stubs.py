"""The committed gRPC stubs match protocols/proto/*.proto (regenerate: python -m protocols.gen)."""

import subprocess
import sys


def test_generated_stubs_are_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "protocols.gen", "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_shoal_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("demo", "coordinator", "peer", "status", "export", "generate", "identity",
                "token", "lab"):
        assert cmd in out
