"""The README's several-machines recipe on 127.0.0.1, every step through the `shoal` entry point.

`shoal token new` and `shoal identity new` make the files; `shoal coordinator --token-file` and
two `shoal peer --coordinator HOST:PORT --token-file F --identity K` processes make a swarm
(tiny model, 1 block stage); while it trains, `shoal status` (table and --json, with
--coordinator-http) watches it and `shoal export` pulls the model out of the live peers; then
`shoal generate --skip 0.5` samples from the export. The swarm is shared by the module's tests
and stopped by the pids it started.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.shoal.entry import popen, shoal

SPEC = """\
[run]
name = "recipe"
steps = 10000

[model]
d_model = 32
n_layers = 4
n_heads = 4
seq_len = 32

[pipeline]
stages = 1
microbatch = 4
target_batch = 16

[sync]
timeout_s = 5.0

[membership]
heartbeat_s = 0.5
lease_s = 4.0
"""
START_TIMEOUT_S = 120  # bounds on waits only catch a hang; nothing here is timed


@dataclass
class LiveSwarm:
    dir: Path
    token_file: Path
    grpc: str = ""
    http: str = ""
    coordinator: subprocess.Popen | None = None
    peers: list[subprocess.Popen] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                         for f in sorted(self.dir.glob("*.log")))

    def status(self) -> dict:
        done = shoal("status", "--coordinator-http", self.http, "--json", timeout=30)
        assert done.returncode == 0, done.stderr + self.logs()
        return json.loads(done.stdout)

    def wait(self, what: str, pred, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in [self.coordinator, *self.peers]:
                assert p is not None and p.poll() is None, f"a process exited\n{self.logs()}"
            status = self.status()
            if pred(status):
                return status
            time.sleep(0.5)
        raise AssertionError(f"no {what} after {timeout:.0f} s\n{self.logs()}")

    def stop(self) -> None:
        for p in [*self.peers, self.coordinator]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.peers, self.coordinator]:
            if p is None:
                continue
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _training(status: dict) -> bool:
    stages = {p.get("stage") for p in status.get("peers", []) if p.get("state") == "training"}
    return stages >= {0, 1} and (status.get("totals") or {}).get("step", 0) >= 3


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSwarm]:
    d = tmp_path_factory.mktemp("recipe")
    (d / "run.toml").write_text(SPEC)
    token = d / "join.token"
    made = shoal("token", "new", token, check=True)
    assert f"wrote a join token to {token}" in made.stdout
    live = LiveSwarm(d, token)
    try:
        live.coordinator = popen("coordinator", "--config", d / "run.toml", "--host", "127.0.0.1",
                                 "--port", "0", "--http-port", "0", "--state-dir", d / "state",
                                 "--token-file", token, "--no-mdns", log=d / "coordinator.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (live.grpc and live.http):
            assert live.coordinator.poll() is None, live.logs()
            assert time.monotonic() < deadline, "the coordinator did not start\n" + live.logs()
            text = (d / "coordinator.log").read_text(errors="replace")
            if m := re.search(r"gRPC listening on (\S+)", text):
                live.grpc = m.group(1)
            if m := re.search(r"dashboard http://(\S+?)/", text):
                live.http = m.group(1)
            time.sleep(0.2)
        for i in range(2):
            key = d / f"peer{i}.key"
            shoal("identity", "new", key, check=True)
            live.peers.append(popen("peer", "--coordinator", live.grpc, "--token-file", token,
                                    "--identity", key, "--grace", "5", "--progress-s", "0",
                                    log=d / f"peer{i}.log"))
        live.wait("training on both stages", _training)
        yield live
    finally:
        live.stop()


def test_token_and_identity_files_are_private(tmp_path: Path, swarm: LiveSwarm) -> None:
    assert stat.S_IMODE(swarm.token_file.stat().st_mode) == 0o600
    assert len(swarm.token_file.read_text().strip()) >= 32
    again = shoal("token", "new", swarm.token_file)
    assert again.returncode == 1 and "never overwritten" in again.stderr, again.stderr

    key = swarm.dir / "peer0.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = shoal("identity", "show", key, check=True).stdout
    peer_id = re.search(r"peer id (\w+)", shown).group(1)
    assert any(p["peer_id"] == peer_id for p in swarm.status()["peers"]), "joined as this key"
    again = shoal("identity", "new", key)
    assert again.returncode == 1 and "never overwritten" in again.stderr, again.stderr

    printed = shoal("token", "new", check=True).stdout.strip()  # no file: printed
    assert len(printed) >= 32 and "\n" not in printed


def test_status_json_and_table_through_shoal(swarm: LiveSwarm) -> None:
    status = swarm.status()  # `shoal status --coordinator-http HOST:PORT --json`
    assert status["run"]["name"] == "recipe"
    assert status["coordinator"]["grpc_address"].endswith(swarm.grpc.rsplit(":", 1)[1])
    assert len([p for p in status["peers"] if p["state"] == "training"]) == 2
    table = shoal("status", "--coordinator-http", swarm.http, check=True).stdout
    assert table.startswith("Shoal · run recipe")
    assert "STAGE" in table and "PEER" in table and "training" in table


def test_status_of_a_closed_port_exits_2(swarm: LiveSwarm) -> None:
    gone = shoal("status", "--coordinator-http", "127.0.0.1:1", "--json", "--timeout", "2")
    assert gone.returncode == 2 and gone.stdout == ""
    assert "no coordinator answers at http://127.0.0.1:1/api/status" in gone.stderr


def test_export_from_the_live_swarm_then_generate_with_skip(swarm: LiveSwarm) -> None:
    out = swarm.dir / "exported"
    done = shoal("export", "--coordinator", swarm.grpc, "--token-file", swarm.token_file,
                 "--identity", swarm.dir / "export.key", "--out", out, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + swarm.logs()
    assert f"wrote {out}/model.safetensors" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 4
    assert config["shoal"]["metadata"]["run"] == "recipe"

    full = shoal("generate", "--model", out, "--prompt", "def ", "--tokens", "200", "--seed", "2",
                 check=True)
    half = shoal("generate", "--model", out, "--prompt", "def ", "--tokens", "200", "--seed", "2",
                 "--skip", "0.5", check=True)
    assert "running layers 0, 3 of 4 (--skip 0.5)" in half.stderr, half.stderr
    assert "running layers" not in full.stderr
    for text in (full.stdout, half.stdout):
        assert text.startswith("def ") and len(text) > 4
    assert half.stdout != full.stdout, "half of the layers must give other logits"
    again = shoal("generate", "--model", out, "--prompt", "def ", "--tokens", "200", "--seed",
                  "2", "--skip", "0.5", check=True)
    assert again.stdout == half.stdout, "the same seed samples the same text"
    bad = shoal("generate", "--model", out, "--skip", "1")
    assert bad.returncode == 2 and "--skip 1.0" in bad.stderr, bad.stderr


def test_export_without_a_coordinator_says_what_to_pass(tmp_path: Path) -> None:
    done = shoal("export", "--out", tmp_path / "x")
    assert done.returncode != 0 and "pass --coordinator HOST:PORT" in done.stderr, done.stderr


def test_peer_tls_dir_is_refused_not_ignored(tmp_path: Path) -> None:
    # peers get their certificate from the coordinator at join; a hand-made folder would be a
    # second, unchecked source of trust, so the flag is refused rather than silently ignored
    done = shoal("peer", "--coordinator", "127.0.0.1:1", "--tls-dir", tmp_path,
                 "--identity", tmp_path / "k.key")
    assert done.returncode == 2
    assert "--tls-dir is not used by peers" in done.stderr, done.stderr
    assert "certificate the coordinator issues" in done.stderr
    assert not (tmp_path / "k.key").exists(), "refused before anything started"


def test_peer_tls_flags_in_help() -> None:
    done = shoal("peer", "--help", check=True)
    assert "--plaintext" in done.stdout and "--coordinator-fingerprint" in done.stdout
    done = shoal("coordinator", "--help", check=True)
    assert "--plaintext" in done.stdout
    done = shoal("lab", "--help", check=True)
    assert "--plaintext" in done.stdout


def test_lab_help() -> None:
    done = shoal("lab", "--help", check=True)
    for flag in ("--hosts", "--mbit", "--delay-ms", "--fault", "--chaos", "--clean"):
        assert flag in done.stdout, flag


def test_every_readme_command_has_a_subcommand() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    named = set(re.findall(r"`(?:sudo )?shoal ([a-z]+)", readme))
    assert {"demo", "coordinator", "peer", "status", "export", "generate"} <= named, named
    helptext = shoal("--help", check=True).stdout
    for command in named:
        assert re.search(rf"^\s+{command}\b", helptext, re.M), command
        shoal(command, "--help", check=True)
