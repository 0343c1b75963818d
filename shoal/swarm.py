"""A swarm of real processes on this machine: one `shoal coordinator` and N `shoal peer`s on
127.0.0.1, each its own process with its own log. `shoal demo` runs one; the lab (on its
network namespaces), the swarm tests and the benches use the same class. `stop` ends exactly the
processes it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from protocols.runspec import RunSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The flags that are also run-spec keys, with their built-in defaults. Precedence, highest first:
# an explicit flag, then the --config file, then these defaults (the flags default to None).


class Swarm:
    """The processes of one local swarm; `stop` ends exactly the ones it started."""

    def __init__(self, work: Path, spec: RunSpec, peers: int, data: str | None, device: str):
        self.work = work
        self.spec = spec
        self.n_peers = peers
        self.data = data
        self.device = device
        self.port = free_port()
        self.http_port = 0
        self.coordinator: subprocess.Popen | None = None
        self.peers: list[subprocess.Popen] = []
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.token_file = work / "join.token"
        self.init_model: str | None = None
        self.coordinator_args: list[str] = []  # more `shoal coordinator` flags

    def _spawn(self, args: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        with open(self.logs / log_name, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)

    def start(self, http_port: int) -> None:
        (self.work / "run.toml").write_text(self.spec.to_toml())
        if not self.token_file.exists():
            from protocols.auth import new_token

            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new_token() + "\n")
        for attempt in range(3):
            self.http_port = http_port or free_port()
            self.coordinator = self._spawn(
                ["coordinator", "--config", str(self.work / "run.toml"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--http-port", str(self.http_port), "--state-dir",
                 str(self.work / "coordinator"), "--token-file", str(self.token_file),
                 "--no-mdns", "--trust-stage-hints", *self.coordinator_args],
                "coordinator.log")
            try:
                wait_port(self.port, 30, self.coordinator)
                break
            except SystemExit:
                # A free port found by bind(0) can be taken (as another connection's local
                # port) before the coordinator binds it: pick new ones, unless the user chose.
                log = (self.logs / "coordinator.log").read_text(errors="replace")[-2000:]
                if attempt == 2 or http_port or "address already in use" not in log:
                    raise
                self.port = free_port()
        for i in range(self.n_peers):
            self.add_peer(i)

    def add_peer(self, i: int, extra: list[str] | None = None) -> subprocess.Popen:
        keys = self.work / "keys"
        keys.mkdir(exist_ok=True)
        args = ["peer", "--coordinator", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                "--identity", str(keys / f"peer{i}.key"), "--token-file", str(self.token_file),
                "--device", self.device, "--metrics-file",
                str(self.logs / f"peer{i}.metrics.jsonl"),
                *(extra or [])]
        if self.data:
            args += ["--data", self.data]
        if self.init_model:
            args += ["--init-model", self.init_model]
        p = self._spawn(args, f"peer{i}.log", env={"SHOAL_TORCH_THREADS": "1"})
        self.peers.append(p)
        return p

    def status(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/status",
                                        timeout=3) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def stop(self, grace: float = 15.0) -> None:
        procs = [p for p in self.peers if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.coordinator and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
            try:
                self.coordinator.wait(10)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
                self.coordinator.wait()


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the coordinator exited with code {proc.returncode} at start; "
                             "see its log")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def read_metrics(logs: Path) -> list[dict]:
    rows = []
    for f in sorted(logs.glob("peer*.metrics.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows
