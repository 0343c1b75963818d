"""`shoal status` (shoal/status.py) against the fake status server and a closed port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.status import main, render, status_url
from tests.fake_status import FakeStatusServer, lose_peer, make_status
from tests.shoal.entry import shoal

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeStatusServer]:
    status = make_status(n_peers=9, n_stages=4, empty_stages=(2,), rebuilt={1: "checkfree+"})
    lose_peer(status, status["peers"][0]["peer_id"])
    with FakeStatusServer(status) as server:
        yield server


def free_port() -> int:
    """A port nothing listens on (bound and released a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_table_shows_run_stages_and_peers(fake: FakeStatusServer, capsys) -> None:
    assert main(["--coordinator-http", f"127.0.0.1:{fake.port}"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Shoal · run bytes-llama-8L · swarm 9f2c41d07a3b"
    assert "sync demo" in out and "epoch 3" in out and "loss " in out
    assert f"step {fake.status['totals']['step']:,}" in out
    assert "\x1b[" not in out, "no colour codes when stdout is not a terminal"

    header = next(i for i, line in enumerate(lines) if line.startswith("STAGE"))
    for st in fake.status["stages"]:
        row = lines[header + 1 + st["stage"]].split()
        assert row[0] == str(st["stage"])
        assert row[2] == str(len(st["replicas"]))
    assert "EMPTY" in lines[header + 3] and "checkfree+" in lines[header + 2]

    peer_lines = {line.split()[0]: line for line in lines if line[:16] in
                  {p["peer_id"] for p in fake.status["peers"]}}
    assert len(peer_lines) == len(fake.status["peers"])
    for p in fake.status["peers"]:
        assert p["state"] in peer_lines[p["peer_id"]].split()
    lost = sum(p["state"] == "lost" for p in fake.status["peers"])
    assert f"peers {len(fake.status['peers']) - lost} live of {len(fake.status['peers'])}" in out
    assert f"{lost} lost" in out


def test_json_prints_the_status_document(fake: FakeStatusServer, capsys) -> None:
    assert main(["--coordinator-http", f"http://127.0.0.1:{fake.port}/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == fake.status


def test_default_address_comes_from_shoal_http(fake: FakeStatusServer, monkeypatch,
                                               capsys) -> None:
    monkeypatch.setenv("SHOAL_HTTP", f"127.0.0.1:{fake.port}")
    assert main([]) == 0
    assert "bytes-llama-8L" in capsys.readouterr().out


def test_unreachable_coordinator_exits_2_and_says_what_to_do(monkeypatch, capsys) -> None:
    monkeypatch.delenv("SHOAL_HTTP", raising=False)
    port = free_port()
    assert main(["--coordinator-http", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (f"no coordinator answers at http://127.0.0.1:{port}/api/status: "
            "is `shoal coordinator` running? pass --coordinator-http") in captured.err


def test_something_else_on_the_port_exits_2(fake: FakeStatusServer, capsys) -> None:
    assert main(["--coordinator-http", f"127.0.0.1:{fake.port}/not-here"]) == 2
    err = capsys.readouterr().err
    assert "answered HTTP 404" in err and "--coordinator-http" in err


def test_through_the_shoal_entry_point(fake: FakeStatusServer) -> None:
    """`shoal status --coordinator-http ... [--json]` as a user types it (these flags once made
    `shoal` exit 2: its subparser passed them on as a REMAINDER that argparse never filled)."""
    ok = shoal("status", "--coordinator-http", f"127.0.0.1:{fake.port}", timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "PEER" in ok.stdout
    js = shoal("status", "--json", "--coordinator-http", f"127.0.0.1:{fake.port}", timeout=30)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == fake.status
    gone = shoal("status", "--coordinator-http", f"127.0.0.1:{free_port()}", "--json",
                 timeout=30)
    assert gone.returncode == 2 and gone.stdout == ""
    assert "no coordinator answers at" in gone.stderr


def test_status_runs_without_torch(fake: FakeStatusServer) -> None:
    """The coordinator's tiny VM has no torch: `shoal status` must not import it."""
    code = ("import sys; sys.modules['torch'] = None; from shoal.cli import main; "
            f"sys.exit(main(['status', '--json', '--coordinator-http', '127.0.0.1:{fake.port}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr


def test_address_forms() -> None:
    assert status_url("10.0.0.2:8080") == "http://10.0.0.2:8080/api/status"
    assert status_url("http://10.0.0.2:8080/") == "http://10.0.0.2:8080/api/status"
    assert status_url("https://swarm.example/shoal") == "https://swarm.example/shoal/api/status"


def test_a_young_swarm_with_unknowns_renders() -> None:
    """A coordinator that just started: nulls everywhere, no stages, no peers."""
    status = {"run": {"name": None, "swarm_id": None, "sync_mode": None, "stages": None,
                      "spec": None}, "epoch": None, "now": None,
              "coordinator": {"started_at": None, "uptime_s": None, "grpc_address": None,
                              "version": None, "restarts": None},
              "stages": [], "peers": [], "history": [], "events": [],
              "totals": {"peers": 0, "live_peers": 0, "bytes_sent": None, "bytes_received": None,
                         "dropped_microbatches": None, "step": None},
              "bytes_per_step_by_mode": {}}
    out = render(status)
    assert "run -" in out and "step -" in out
    assert "no stages reported yet" in out and "no peers have joined yet" in out
