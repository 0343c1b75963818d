"""The `shoal` entry point as a user runs it: the console script pip installed, as a subprocess.

Tests in tests/shoal/ go through this, not through `python -m shoal.cli` or a module's `main`:
a bug in how `shoal` parses a subcommand's flags (a REMAINDER that swallows nothing, a flag
that is parsed and dropped) only shows there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shoal_exe() -> str:
    """The `shoal` script of the Python running the tests (setup.sh installs it)."""
    beside = Path(sysconfig.get_path("scripts")) / "shoal"
    if beside.exists():
        return str(beside)
    found = shutil.which("shoal")
    assert found, (f"no `shoal` entry point beside {sys.executable} or on PATH: run ./setup.sh "
                   "(pip install -e .) first")
    return found


def env(**extra: str) -> dict[str, str]:
    """The tests' environment without SHOAL_* settings the user may have, one torch thread."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    out.update({"PYTHONUNBUFFERED": "1", "SHOAL_TORCH_THREADS": "1"}, **extra)
    return out


def shoal(*args: str | Path, timeout: float = 60, cwd: Path | None = None,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `shoal ARGS...` to the end; `timeout` only catches a hang (it is no measurement).

    On a hang the process gets SIGTERM first (`shoal demo` then stops the swarm it started),
    SIGKILL only if that does not end it, and the test fails with what it printed.
    """
    cmd = [shoal_exe(), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"shoal {' '.join(cmd[1:])} did not end within {timeout:.0f} s"
                             f"\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check:
        assert out.returncode == 0, (f"shoal {' '.join(map(str, args))} exited "
                                     f"{out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def popen(*args: str | Path, log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `shoal ARGS...` in the background, output to `log`; stop it by its pid only."""
    with open(log, "ab") as f:
        return subprocess.Popen([shoal_exe(), *map(str, args)], cwd=cwd or ROOT, env=env(),
                                stdout=f, stderr=subprocess.STDOUT)
