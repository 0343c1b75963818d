"""Reachability through the `shoal` entry point, with real `shoal coordinator` and `shoal peer`
processes on 127.0.0.1 (issue #13).

The links run as between machines: SHOAL_TLS_ON_LOOPBACK=1 makes 127.0.0.1 count as a remote
link (protocols.tls.link_is_local), so a peer started with no --host and no --advertise takes the
default path a volunteer's takes: it binds all interfaces, joins with ":PORT", is registered at
the host the coordinator observes (127.0.0.1) and serves mTLS, and the coordinator dials it back
over mTLS with its own leaf. A second peer advertises 127.0.0.2, where nothing listens: it is
marked unreachable and says so in its log. `shoal status` and /api/status show both. A third
swarm runs --plaintext on every process, default bind included.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.polling import poll_until
from tests.shoal.entry import ROOT, env, shoal, shoal_exe

SPEC = """\
[run]
name = "reach"
steps = 10000

[model]
d_model = 32
n_layers = 2
n_heads = 4
seq_len = 32

[pipeline]
stages = 1
microbatch = 4
target_batch = 16

[membership]
heartbeat_s = 0.5
lease_s = 20.0
"""
WAIT_S = 120  # bounds on waits only catch a hang; nothing here is timed


@dataclass
class Procs:
    dir: Path
    extra_env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    grpc: str = ""
    http: str = ""

    def start(self, name: str, *args: str | Path) -> subprocess.Popen:
        with open(self.dir / f"{name}.log", "ab") as f:
            p = subprocess.Popen([shoal_exe(), *map(str, args)], cwd=ROOT,
                                 env=env(PYTHONPATH=str(ROOT), **self.extra_env), stdout=f,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def shoal(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`shoal ARGS...` to the end, running this checkout's code; it must succeed."""
        done = subprocess.run([shoal_exe(), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=env(PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def status(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{self.http}/api/status", timeout=3) as r:
                return json.load(r)
        except OSError:
            return None

    def reach_of(self) -> dict[str, tuple[str, str]]:
        """peer id -> (address, reach), live peers."""
        st = self.status() or {}
        return {p["peer_id"]: (p["address"], p["reach"]) for p in st.get("peers", [])
                if p.get("live")}

    def stop(self) -> None:
        for p in reversed(self.procs):  # peers first, the coordinator last
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def start_swarm(d: Path, extra_env: dict[str, str], *flags: str) -> Procs:
    (d / "run.toml").write_text(SPEC)
    token = d / "join.token"
    shoal("token", "new", token, check=True)
    s = Procs(d, extra_env)
    coordinator = s.start("coordinator", "coordinator", "--config", d / "run.toml", "--host",
                          "127.0.0.1", "--port", "0", "--http-port", "0", "--state-dir",
                          d / "state", "--token-file", token, "--no-mdns", *flags)

    def started() -> bool:
        assert coordinator.poll() is None, s.log("coordinator")
        text = s.log("coordinator")
        if m := re.search(r"gRPC listening on (\S+)", text):
            s.grpc = m.group(1)
        if m := re.search(r"dashboard http://(\S+?)/", text):
            s.http = m.group(1)
        return bool(s.grpc and s.http)

    assert poll_until(started, WAIT_S), s.log("coordinator")
    return s


def peer_args(s: Procs, name: str, *flags: str) -> list[str | Path]:
    return ["peer", "--coordinator", s.grpc, "--token-file", s.dir / "join.token", "--identity",
            s.dir / f"{name}.key", "--grace", "5", "--progress-s", "0", *flags]


@pytest.fixture(scope="module")
def tls_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    s = start_swarm(tmp_path_factory.mktemp("reach-tls"), {"SHOAL_TLS_ON_LOOPBACK": "1"})
    try:
        s.start("direct", *peer_args(s, "direct"))  # the defaults: no --host, no --advertise
        s.start("closed", *peer_args(s, "closed", "--host", "127.0.0.1", "--advertise",
                                     "127.0.0.2"))
        yield s
    finally:
        s.stop()


def test_default_peer_is_registered_at_the_observed_host_and_reached_over_mtls(
        tls_swarm: Procs) -> None:
    s = tls_swarm
    assert "gRPC TLS" in s.log("coordinator")

    def joined() -> re.Match | None:
        return re.search(r"joined \S+ as \w+ at (\S+): stage", s.log("direct"))

    found = poll_until(joined, WAIT_S)
    assert found, s.log("direct")
    address = found.group(1)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address  # ":PORT", filled in

    def direct() -> bool:
        return (address, "direct") in s.reach_of().values()

    assert poll_until(direct, WAIT_S), (s.reach_of(), s.log("coordinator"))
    assert re.search(r"reachable \(direct\): answered a signed ping at "
                     + re.escape(address) + r" \(mTLS\)", s.log("coordinator"))
    assert poll_until(lambda: f"the coordinator reached this peer at {address} (direct)"
                      in s.log("direct"), WAIT_S), s.log("direct")


def test_unreachable_peer_is_told_and_status_shows_reach(tls_swarm: Procs) -> None:
    s = tls_swarm

    def told() -> bool:
        return "the coordinator cannot reach this peer" in s.log("closed")

    assert poll_until(told, WAIT_S), (s.log("closed"), s.log("coordinator"))
    warning = next(line for line in s.log("closed").splitlines()
                   if "cannot reach this peer" in line)
    assert re.search(r"dialled 127\.0\.0\.2:\d+ back", warning), warning
    assert "--advertise" in warning and "Open TCP port" in warning
    # Once told, the peer attaches to a relay when one is offered (the coordinator's own, as
    # coordinator.main runs one by default) and is dialled again through it: "relayed".
    prefix = re.search(r"joined \S+ as (\w+) at", s.log("closed")).group(1)

    def table_reach(table: str) -> dict[str, str]:
        lines = table.splitlines()
        header = next(line for line in lines if line.startswith("PEER"))
        assert header.split()[3] == "REACH", table
        return {r[0]: r[3] for r in (line.split() for line in lines[lines.index(header) + 1:])
                if len(r) > 3}

    def shown_both() -> tuple[dict, str] | None:
        """The table and --json, once both show the closed peer unreachable or relayed."""
        table = s.shoal("status", "--coordinator-http", s.http).stdout
        doc = json.loads(s.shoal("status", "--coordinator-http", s.http, "--json").stdout)
        reach = {p["peer_id"]: p["reach"] for p in doc["peers"] if p["live"]}
        closed = [r for pid, r in reach.items() if pid.startswith(prefix)]
        done = closed in (["unreachable"], ["relayed"]) and sorted(reach.values()).count(
            "direct") == 1
        return (reach, table) if done and table_reach(table) == reach else None

    got = poll_until(shown_both, WAIT_S)
    assert got, (s.reach_of(), s.log("coordinator"))


def test_plaintext_peer_on_all_interfaces_is_reached(tmp_path: Path) -> None:
    s = start_swarm(tmp_path, {"SHOAL_TLS_ON_LOOPBACK": "1"}, "--plaintext")
    try:
        s.start("plain", *peer_args(s, "plain", "--plaintext"))
        assert poll_until(lambda: [r for _, r in s.reach_of().values()] == ["direct"],
                          WAIT_S), (s.reach_of(), s.log("plain"), s.log("coordinator"))
        assert "gRPC plaintext" in s.log("coordinator")
        assert "(plaintext)" in s.log("coordinator").split("reachable (direct)")[-1]
        [(address, _)] = s.reach_of().values()
        assert address.startswith("127.0.0.1:")
    finally:
        s.stop()
