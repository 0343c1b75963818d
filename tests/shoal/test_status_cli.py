"""`shoal status` (shoal/status.py): against the fake status server and a closed port, and through
the real `shoal` command line against a real `shoal coordinator` (text, --json, the HTTP token,
--watch until Ctrl-C on a terminal and into a pipe)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocols.runspec import RunSpec
from shoal.status import CLEAR, SHOW_CURSOR, main, render, status_url
from tests.fake_status import FakeStatusServer, lose_peer, make_status
from tests.shoal.entry import env, shoal_exe
from tests.sim_peer import CoordinatorProcess

ROOT = Path(__file__).resolve().parents[2]
#: the top-level keys of /api/status that the dashboard (coordinator/static/*.js) reads
DASHBOARD_KEYS = {"run", "coordinator", "epoch", "now", "stages", "peers", "totals", "history",
                  "events", "bytes_per_step_by_mode"}
RUN_TOML = '[run]\nname = "cli-status"\n\n[pipeline]\nstages = 3\n'


def run_shoal(*args: str | Path, timeout: float = 60,
              **extra_env: str) -> subprocess.CompletedProcess[str]:
    """`shoal ARGS...` through the console script, to the end; `timeout` only catches a hang.

    PYTHONPATH names this checkout, so the script runs this tree's code even where pip's
    editable install points at another copy of the repository."""
    return subprocess.run([shoal_exe(), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env=env(PYTHONPATH=str(ROOT), **extra_env))


class ShoalCoordinator(CoordinatorProcess):
    """A real `shoal coordinator ...` (the console script, not `python -m coordinator.main`) with
    CoordinatorProcess's flags, start-up parsing and clean-up by process id."""

    def __init__(self, state_dir: Path, **kwargs) -> None:
        super().__init__(state_dir, **kwargs)
        assert self.cmd[1:3] == ["-m", "coordinator.main"]
        self.cmd = [shoal_exe(), "coordinator", *self.cmd[3:]]

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalCoordinator]:
    work = tmp_path_factory.mktemp("status-cli")
    (work / "run.toml").write_text(RUN_TOML)
    assert RunSpec.from_toml(RUN_TOML).pipeline.stages == 3
    with ShoalCoordinator(work / "state", config=work / "run.toml") as coord:
        yield coord


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
    ok = run_shoal("status", "--coordinator-http", f"127.0.0.1:{fake.port}", timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "PEER" in ok.stdout
    js = run_shoal("status", "--json", "--coordinator-http", f"127.0.0.1:{fake.port}", timeout=30)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == fake.status
    gone = run_shoal("status", "--coordinator-http", f"127.0.0.1:{free_port()}", "--json",
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


# ------------------------------------------------------------------ a real `shoal coordinator`


def test_json_through_the_cli_from_a_real_coordinator(coordinator: ShoalCoordinator) -> None:
    """The issue's first complaint: `shoal status --json` / `--coordinator-http` as typed."""
    done = run_shoal("status", "--json", "--coordinator-http", coordinator.http)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc) >= DASHBOARD_KEYS, f"missing: {DASHBOARD_KEYS - set(doc)}"
    assert doc["run"]["name"] == "cli-status"
    assert [st["stage"] for st in doc["stages"]] == [0, 1, 2, 3]  # stage 0 + 3 block stages
    assert doc["peers"] == []
    assert doc["coordinator"]["grpc_address"] == coordinator.grpc_address

    # the logging flags on either side of the subcommand leave stdout the bare document
    for argv in (["--log-format", "json", "status", "--json"],
                 ["status", "--json", "--log-format", "json"],
                 ["--log-level", "debug", "status", "--log-format", "json", "--json"]):
        done = run_shoal(*argv, "--coordinator-http", f"http://{coordinator.http}/")
        assert done.returncode == 0, (argv, done.stderr)
        assert json.loads(done.stdout)["run"]["name"] == "cli-status", argv


def test_text_view_through_the_cli_names_the_stages(coordinator: ShoalCoordinator) -> None:
    done = run_shoal("status", "--coordinator-http", coordinator.http)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Shoal · run cli-status · swarm ")
    assert f"coordinator {coordinator.grpc_address}" in done.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("STAGE"))
    rows = [line.split() for line in lines[header + 1: header + 5]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert all(r[1] == "EMPTY" for r in rows), rows  # nobody has joined
    assert "no peers have joined yet" in done.stdout
    assert "\x1b[" not in done.stdout


def test_http_token_file_through_the_cli(tmp_path: Path) -> None:
    token = tmp_path / "http.token"
    token.write_text("s3cret-http-token\n")
    with ShoalCoordinator(tmp_path / "state",
                          extra=["--http-token-file", str(token)]) as coord:
        refused = run_shoal("status", "--json", "--coordinator-http", coord.http)
        assert refused.returncode == 2 and refused.stdout == ""
        assert "wants the coordinator's HTTP token: pass --http-token-file" in refused.stderr

        ok = run_shoal("status", "--json", "--coordinator-http", coord.http,
                       "--http-token-file", token)
        assert ok.returncode == 0, ok.stderr
        assert set(json.loads(ok.stdout)) >= DASHBOARD_KEYS

        by_env = run_shoal("status", "--coordinator-http", coord.http,
                           SHOAL_HTTP_TOKEN_FILE=str(token))
        assert by_env.returncode == 0, by_env.stderr
        assert "STAGE" in by_env.stdout

        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-it\n")
        bad = run_shoal("status", "--coordinator-http", coord.http, "--http-token-file", wrong)
        assert bad.returncode == 2 and "wants the coordinator's HTTP token" in bad.stderr


# ------------------------------------------------------------------ --watch


def _read_until(fd: int, buf: bytearray, done: Callable[[bytes], bool], timeout: float) -> bool:
    """Append what `fd` gives to `buf` until `done(buf)` or EOF; the bound only catches a hang."""
    deadline = time.monotonic() + timeout
    while not done(bytes(buf)) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side closed (the process ended)
            return done(bytes(buf))
        if not chunk:
            return done(bytes(buf))
        buf.extend(chunk)
    return done(bytes(buf))


def test_watch_on_a_terminal_redraws_survives_the_coordinator_and_stops_on_ctrl_c(
        tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(RUN_TOML)
    coord = ShoalCoordinator(tmp_path / "state", config=tmp_path / "run.toml").start()
    master, slave = pty.openpty()
    proc = None
    try:
        proc = subprocess.Popen(
            [shoal_exe(), "status", "--watch", "--interval", "0.2", "--coordinator-http",
             coord.http], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave,
            stderr=subprocess.PIPE, env=env(PYTHONPATH=str(ROOT), TERM="xterm"))
        os.close(slave)
        out = bytearray()
        clear = CLEAR.encode()
        assert _read_until(master, out, lambda b: b.count(clear) >= 3, 60), bytes(out)[-3000:]
        first = bytes(out).split(clear)[1].decode()
        assert "cli-status" in first and "STAGE" in first and "Ctrl-C to stop" in first
        assert "\x1b[1;31mEMPTY" in first, "a terminal gets colour"

        assert coord.stop() == 0  # the coordinator goes away under the watch
        assert _read_until(master, out, lambda b: b"coordinator unreachable" in b, 60), \
            bytes(out)[-3000:]
        assert _read_until(master, out, lambda b: b"last view, from" in
                           b[b.rfind(clear):], 60), bytes(out)[-3000:]
        assert proc.poll() is None, "it keeps trying"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
        _read_until(master, out, lambda b: False, 2)  # what it wrote before it exited
        assert bytes(out).rstrip(b"\r\n").endswith(SHOW_CURSOR.encode())
        assert b"Traceback" not in bytes(out)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        coord.kill()
        os.close(master)


def test_watch_json_into_a_pipe_prints_a_document_a_line(coordinator: ShoalCoordinator) -> None:
    proc = subprocess.Popen([shoal_exe(), "status", "--watch", "--json", "--interval", "0.2",
                             "--coordinator-http", coordinator.http], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout is not None
        docs = [json.loads(proc.stdout.readline()) for _ in range(3)]
        assert all(d["run"]["name"] == "cli-status" for d in docs)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_watch_exits_2_when_no_coordinator_answers_at_start() -> None:
    done = run_shoal("status", "--watch", "--interval", "0.2", "--coordinator-http",
                     f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert done.returncode == 2 and done.stdout == ""
    assert "no coordinator answers at" in done.stderr
    for bad in ("0", "-1", "soon"):
        refused = run_shoal("status", "--watch", "--interval", bad)
        assert refused.returncode == 2 and "argument --interval" in refused.stderr, bad
