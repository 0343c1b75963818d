"""docker/: the image, the compose files and the entrypoint, checked without a Docker engine.

Nothing here builds an image or starts a container: docker/smoke.sh does that for real (a CI
step of its own, .ci/run). What is checked here, fast, is:
- the compose file: `docker-compose config` (Debian's Compose v1, a validating offline parser)
  accepts it, and its content keeps the promises docker/README.md makes (PyYAML when present);
- the Dockerfile: exec-form ENTRYPOINT under tini, a non-root USER, a HEALTHCHECK, COPY sources
  that exist and that the BuildKit ignore file lets through;
- docker/entrypoint.sh: `bash -n`, shellcheck when installed, and its behaviour, by running it
  with stub `tc`, `ip`, `id`, `setpriv` and `shoal` executables on PATH that record their
  arguments: the tc command lines for the bandwidth caps, the privilege drop, the arguments it
  adds for `shoal peer`, and that every step `exec`s (the daemon keeps the entrypoint's pid, so
  tini's SIGTERM reaches it);
- docker/healthcheck.py against a local HTTP server, a listening socket and a fake /proc;
- docker/run.toml loads as a run spec.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import pytest

pytestmark = pytest.mark.docker  # required under CI=true: a skip here fails CI (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
IMAGE_UID = "10001"  # the shoal user in the Dockerfile; compose hands it the secrets


# --------------------------------------------------------------------------- compose file


def _compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHOAL_", "TORCH_", "COMPOSE_"))}
    env.update(extra)
    return env


def _compose_config(*overrides: str, **env: str) -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose); "
                    "the compose file was not validated")
    files = [a for f in (str(COMPOSE), *(str(DOCKER / o) for o in overrides)) for a in ("-f", f)]
    out = subprocess.run([exe, *files, "config"], cwd=ROOT, env=_compose_env(**env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"docker-compose config failed:\n{out.stdout}\n{out.stderr}"
    assert "ignored" not in out.stderr.lower(), f"docker-compose ignores something:\n{out.stderr}"
    return out.stdout


def test_compose_config_accepts_the_file() -> None:
    text = _compose_config()
    for needle in ("coordinator:", "peer:", "coordinator:7000", "shoal_join_token",
                   "/healthz", "stop_grace_period: 30s", "replicas: 4",
                   "snapshots:/var/lib/shoal/snapshots", "exports:/var/lib/shoal/exports"):
        assert needle in text, needle
    assert "NET_ADMIN" not in text and "user:" not in text, "no root, no NET_ADMIN without caps"


def test_caps_override_adds_root_and_net_admin_to_peers_only() -> None:
    text = _compose_config("compose.caps.yaml", SHOAL_EGRESS_MBIT="25")
    assert text.count("NET_ADMIN") == 1 and "user: 0:0" in text
    peer = text[text.index("\n  peer:"):]
    assert "NET_ADMIN" in peer and "user: 0:0" in peer


def test_gpu_override_reserves_a_gpu_and_asks_for_cuda() -> None:
    text = _compose_config("compose.gpu.yaml")
    peer = text[text.index("\n  peer:"):]
    assert "driver: nvidia" in peer and "count: 1" in peer and "- gpu" in peer
    assert "- --device\n    - cuda" in peer


def test_compose_config_interpolates_the_variables() -> None:
    text = _compose_config(SHOAL_PEERS="7", SHOAL_EGRESS_MBIT="25", SHOAL_PEER_PORT="7200",
                           SHOAL_IMAGE="registry.example:5000/shoal:1", SHOAL_HTTP_PUBLISH="18080")
    assert "replicas: 7" in text
    assert "SHOAL_EGRESS_MBIT: '25'" in text
    assert "SHOAL_PEER_PORT: '7200'" in text
    assert text.count("image: registry.example:5000/shoal:1") == 2
    assert "published: 18080" in text


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: compose content not checked")
    return yaml.safe_load(COMPOSE.read_text())


def _grace_s(value: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert m and value, f"unexpected duration {value!r}"
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_compose_keeps_its_promises(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"coordinator", "peer"}
    coord, peer = services["coordinator"], services["peer"]
    for svc in (coord, peer):
        assert svc["image"].startswith("${SHOAL_IMAGE"), "stack deploy needs an image: name"
        assert "init" not in svc, "tini is PID 1 in the image already"
        assert "container_name" not in svc and "hostname" not in svc
        assert svc["healthcheck"]["test"][0] == "CMD"
        assert svc["networks"] == ["shoal"]
        assert svc["deploy"]["restart_policy"]["condition"] in ("any", "on-failure")
    assert "/healthz" in " ".join(coord["healthcheck"]["test"])
    # no IPVS needed on Swarm (docker/smoke.sh runs on a kernel without it): DNS, host ports
    assert coord["deploy"]["endpoint_mode"] == peer["deploy"]["endpoint_mode"] == "dnsrr"
    assert [p["mode"] for p in coord["ports"]] == ["host", "host"]
    assert "--no-mdns" in coord["command"]

    cmd = peer["command"]
    assert cmd[0] == "peer" and cmd[cmd.index("--coordinator") + 1] == "coordinator:7000"
    grace = float(cmd[cmd.index("--grace") + 1])
    assert _grace_s(peer["stop_grace_period"]) >= grace + 5, "SIGKILL must come after the drain"
    assert "cap_add" not in peer and "user" not in peer, "uid 10001, no NET_ADMIN by default"
    assert peer["healthcheck"]["test"] == ["CMD", "/usr/local/bin/shoal-healthcheck"]
    assert {v.split(":")[0] for v in peer["volumes"]} == {"data", "snapshots", "exports"}
    assert set(compose["volumes"]) == {"coordinator-state", "data", "snapshots", "exports"}
    assert str(peer["deploy"]["replicas"]).startswith("${SHOAL_PEERS")
    assert "ports" not in peer, "scaled peers cannot share published host ports"
    env = peer["environment"]
    for key in ("SHOAL_EGRESS_MBIT", "SHOAL_INGRESS_MBIT", "SHOAL_TOKEN_FILE", "SHOAL_ADVERTISE"):
        assert key in env, key

    for svc in (coord, peer):
        for secret in svc["secrets"]:
            assert str(secret["uid"]) == IMAGE_UID and str(secret["gid"]) == IMAGE_UID
    assert set(compose["secrets"]) == {"shoal_join_token", "shoal_run_spec"}
    assert "driver" not in (compose["networks"]["shoal"] or {}), "bridge for compose, overlay " \
        "for swarm: leave the driver to the tool"
    assert f"useradd --uid {IMAGE_UID}" in DOCKERFILE.read_text()


def test_run_spec_loads() -> None:
    from protocols.runspec import RunSpec

    spec = RunSpec.load(DOCKER / "run.toml")
    assert spec.run.name == "shoal-docker"


# --------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_entrypoint_user_healthcheck() -> None:
    ins = _instructions()
    words = [w for w, _ in ins]
    entry = [json.loads(a) for w, a in ins if w == "ENTRYPOINT"]
    assert len(entry) == 1, "one ENTRYPOINT, in exec form (a JSON array)"
    assert entry[0][0] == "/usr/bin/tini" and entry[0][-1] == "/usr/local/bin/shoal-entrypoint"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert words.index("USER") < words.index("ENTRYPOINT")
    health = [a for w, a in ins if w == "HEALTHCHECK"]
    assert len(health) == 1 and " CMD " in f" {health[0]} "
    assert json.loads(health[0].split("CMD", 1)[1]) == ["/usr/local/bin/shoal-healthcheck"]
    assert [a for w, a in ins if w == "EXPOSE"] == ["7000 8080"]
    args = " ".join(a for w, a in ins if w == "ARG")
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in args and "TORCH_SPEC=" in args
    assert "python:3.11-slim" in args
    assert any("tini" in a and "iproute2" in a for w, a in ins if w == "RUN")
    assert "CMD" in words and not any(w == "CMD" and not a.startswith("[") for w, a in ins)


def test_dockerfile_copies_exist_and_pass_the_ignore_file() -> None:
    allowed = [line[1:].rstrip("/") for line in
               (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    copies = [a.split()[:-1] for w, a in _instructions() if w == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert not src.startswith("--"), f"COPY {src}: needs BuildKit; keep the legacy builder"
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") in allowed, f"{src} is not let through Dockerfile.dockerignore"


# --------------------------------------------------------------------------- entrypoint


def test_entrypoint_parses() -> None:
    bash = shutil.which("bash")
    assert bash, "bash is required"
    subprocess.run([bash, "-n", str(ENTRYPOINT)], check=True)
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"


@pytest.mark.parametrize("script", ["entrypoint.sh", "smoke.sh", "local-base.sh"])
def test_scripts_pass_shellcheck(script: str) -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (Debian: apt-get install shellcheck)")
    subprocess.run(["bash", "-n", str(DOCKER / script)], check=True)
    out = subprocess.run([exe, str(DOCKER / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


STUB_RECORD = """#!/bin/sh
printf '%s' "$(basename "$0")" >> "$STUB_LOG"
for a in "$@"; do printf ' %s' "$a" >> "$STUB_LOG"; done
printf '\\n' >> "$STUB_LOG"
"""

STUBS = {
    # tc and ip record and succeed (`ip link show` fails: no ifb device yet); STUB_TC_RC fails tc
    "tc": STUB_RECORD + 'exit "${STUB_TC_RC:-0}"\n',
    "ip": STUB_RECORD + '[ "$1 $2" = "link show" ] && exit 1\nexit 0\n',
    # `id -u` answers STUB_UID (root by default); everything else is the real id
    "id": '#!/bin/sh\nif [ "$#" = 1 ] && [ "$1" = -u ]; then echo "${STUB_UID:-0}"; exit 0; fi\n'
          'exec /usr/bin/id "$@"\n',
    # setpriv records, then execs what follows `--` (it changes no user)
    "setpriv": STUB_RECORD + 'while [ "$#" -gt 0 ] && [ "$1" != -- ]; do shift; done\n'
               'shift\nexec "$@"\n',
    # shoal records its arguments and its pid; STUB_WAIT makes it wait for SIGTERM
    "shoal": STUB_RECORD + 'echo $$ > "$STUB_LOG.pid"\n'
             'if [ -n "${STUB_WAIT:-}" ]; then\n'
             '  trap \'echo "shoal got TERM" >> "$STUB_LOG"; exit 0\' TERM\n'
             '  while :; do sleep 0.05; done\n'
             'fi\n',
}


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        p = bin_dir / name
        p.write_text(text)
        p.chmod(0o755)
    return bin_dir


def _env(stubs: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "STUB_"))}
    env["PATH"] = f"{stubs}:{env.get('PATH', '/usr/bin:/bin')}"
    env["STUB_LOG"] = str(stubs.parent / "calls.log")
    env.update(extra)
    return env


def _run(stubs: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    out = subprocess.run([str(ENTRYPOINT), *args], env=_env(stubs, **env), capture_output=True,
                         text=True, timeout=30)
    log = stubs.parent / "calls.log"
    return out, (log.read_text().splitlines() if log.exists() else [])


def test_egress_cap_runs_tc_tbf_then_the_command(stubs: Path) -> None:
    out, calls = _run(stubs, "shoal", "status", SHOAL_EGRESS_MBIT="25")
    assert out.returncode == 0, out.stderr
    assert calls == [
        "tc qdisc replace dev eth0 root tbf rate 25mbit burst 32768 latency 50ms",
        "shoal status",
    ]
    assert "egress of eth0 capped at 25 Mbit/s" in out.stderr


def test_egress_cap_harmless_command_and_burst_scaling(stubs: Path, tmp_path: Path) -> None:
    # a command that is not a shoal subcommand runs as it is, after the caps
    marker = tmp_path / "ran"
    out, calls = _run(stubs, "touch", str(marker), SHOAL_EGRESS_MBIT="200",
                      SHOAL_NET_DEV="eth1", SHOAL_TBF_LATENCY="20ms")
    assert out.returncode == 0, out.stderr
    assert marker.exists()
    # 200 Mbit/s for 10 ms = 250000 bytes
    assert calls == ["tc qdisc replace dev eth1 root tbf rate 200mbit burst 250000 latency 20ms"]


def test_ingress_cap_goes_through_ifb(stubs: Path) -> None:
    out, calls = _run(stubs, "true", SHOAL_INGRESS_MBIT="10.5")
    assert out.returncode == 0, out.stderr
    assert calls == [
        "ip link show shoal-ifb",
        "ip link add shoal-ifb type ifb",
        "ip link set shoal-ifb up",
        "tc qdisc replace dev eth0 handle ffff: ingress",
        "tc filter add dev eth0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred "
        "egress redirect dev shoal-ifb",
        "tc qdisc replace dev shoal-ifb root tbf rate 10.5mbit burst 32768 latency 50ms",
    ]


def test_no_cap_no_tc(stubs: Path) -> None:
    out, calls = _run(stubs, "true")
    assert out.returncode == 0, out.stderr
    assert calls == []


@pytest.mark.parametrize("value", ["fast", "0", "-5", "25mbit", "0.0"])
def test_bad_rate_stops_the_container(stubs: Path, value: str) -> None:
    out, calls = _run(stubs, "true", SHOAL_EGRESS_MBIT=value)
    assert out.returncode == 3
    assert "positive number of Mbit/s" in out.stderr
    assert calls == []


def test_failing_tc_stops_the_container_and_says_why(stubs: Path) -> None:
    out, calls = _run(stubs, "shoal", "status", SHOAL_EGRESS_MBIT="25", STUB_TC_RC="2")
    assert out.returncode == 3
    assert "NET_ADMIN" in out.stderr
    assert calls == ["tc qdisc replace dev eth0 root tbf rate 25mbit burst 32768 latency 50ms"]


def test_cap_without_root_stops_and_names_the_override(stubs: Path) -> None:
    out, calls = _run(stubs, "peer", SHOAL_EGRESS_MBIT="25", STUB_UID="10001")
    assert out.returncode == 3
    assert "compose.caps.yaml" in out.stderr and "NET_ADMIN" in out.stderr
    assert calls == []


def test_root_applies_caps_then_drops_to_run_as_user(stubs: Path) -> None:
    nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True)
    if nobody.returncode != 0:
        pytest.skip("no user 'nobody' on this machine")
    uid = nobody.stdout.strip()
    gid = subprocess.run(["id", "-g", "nobody"], capture_output=True, text=True).stdout.strip()
    out, calls = _run(stubs, "status", SHOAL_EGRESS_MBIT="25", SHOAL_RUN_AS="nobody")
    assert out.returncode == 0, out.stderr
    me = str(ENTRYPOINT)
    assert calls == [
        "tc qdisc replace dev eth0 root tbf rate 25mbit burst 32768 latency 50ms",
        f"setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all --no-new-privs "
        f"-- {me} status",
        "shoal status",  # the second pass (as the user) does not shape again
    ]


def test_no_drop_when_not_root_or_not_asked(stubs: Path) -> None:
    out, calls = _run(stubs, "status", SHOAL_RUN_AS="nobody", STUB_UID="10001")
    assert out.returncode == 0, out.stderr
    assert calls == ["shoal status"]
    (stubs.parent / "calls.log").unlink()
    out, calls = _run(stubs, "status")
    assert calls == ["shoal status"]


def test_peer_gets_container_defaults(stubs: Path, tmp_path: Path) -> None:
    token = tmp_path / "join.token"
    token.write_text("t0ken\n")
    out, calls = _run(stubs, "peer", "--coordinator", "coordinator:7000", "--grace", "20",
                      SHOAL_TOKEN_FILE=str(token), SHOAL_ADVERTISE="peer-a.example",
                      SHOAL_EXTRA_ARGS="--router round_robin  --stage 1")
    assert out.returncode == 0, out.stderr
    assert calls == ["shoal peer --coordinator coordinator:7000 --grace 20 --router round_robin "
                     "--stage 1 --host 0.0.0.0 --port 7100 --advertise peer-a.example"]


def test_peer_keeps_given_flags_and_advertises_hostname(stubs: Path) -> None:
    out, calls = _run(stubs, "--log-format", "json", "peer", "--host=10.0.0.2", "--port", "9000",
                      SHOAL_PEER_PORT="7200")
    assert out.returncode == 0, out.stderr
    host = socket.gethostname()
    assert calls == [f"shoal --log-format json peer --host=10.0.0.2 --port 9000 --advertise {host}"]


def test_coordinator_gets_no_peer_flags(stubs: Path) -> None:
    out, calls = _run(stubs, "coordinator", "--no-mdns")
    assert out.returncode == 0, out.stderr
    assert calls == ["shoal coordinator --no-mdns"]


def test_missing_token_secret_is_explained(stubs: Path, tmp_path: Path) -> None:
    as_dir = tmp_path / "join.token"
    as_dir.mkdir()  # what Docker mounts when the secret's file is missing on the host
    out, calls = _run(stubs, "peer", SHOAL_TOKEN_FILE=str(as_dir))
    assert out.returncode == 2 and "is a directory" in out.stderr and "token new" in out.stderr
    out, calls = _run(stubs, "coordinator", SHOAL_TOKEN_FILE=str(tmp_path / "absent"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert calls == []


def test_daemon_keeps_the_entrypoint_pid_and_gets_sigterm(stubs: Path) -> None:
    """Every step execs: the process tini started *is* shoal, so tini's SIGTERM reaches it."""
    log = stubs.parent / "calls.log"
    proc = subprocess.Popen([str(ENTRYPOINT), "peer", "--coordinator", "c:7000"],
                            env=_env(stubs, SHOAL_EGRESS_MBIT="25", SHOAL_RUN_AS="nobody",
                                     STUB_WAIT="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pid_file = Path(f"{log}.pid")
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the stub shoal never started"
            time.sleep(0.05)
        assert int(pid_file.read_text()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        # the whole process group: a broken entrypoint would leave an orphaned stub behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert log.read_text().splitlines()[-1] == "shoal got TERM"


# --------------------------------------------------------------------------- healthcheck


class _Coordinator(http.server.BaseHTTPRequestHandler):
    """/api/status with the peers in `doc` (a class attribute the test sets)."""

    doc: ClassVar[dict] = {"peers": []}
    auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).auth.append(self.headers.get("Authorization"))
        body = json.dumps(type(self).doc).encode() if self.path == "/api/status" else b"{}"
        self.send_response(200 if self.path == "/api/status" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shoal_docker_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/healthz" else 404
        body = b'{"ok": true}' if code == 200 else b"not found"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_url_and_tcp(hc: ModuleType, http_port: int, capsys) -> None:
    assert hc.main(["--url", f"http://127.0.0.1:{http_port}/healthz"]) == 0
    assert capsys.readouterr().out.startswith("healthy: ")
    assert hc.main(["--url", f"http://127.0.0.1:{http_port}/nope"]) == 1
    assert "HTTP 404" in capsys.readouterr().out
    assert hc.main(["--url", f"http://127.0.0.1:{_closed_port()}/healthz", "--timeout", "2"]) == 1
    assert hc.main(["--tcp", f"127.0.0.1:{http_port}"]) == 0
    assert hc.main(["--tcp", f"127.0.0.1:{_closed_port()}", "--timeout", "2"]) == 1


def _fake_proc(root: Path, *argvs: list[str]) -> Path:
    for pid, argv in enumerate(argvs, start=100):
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return root


def test_healthcheck_auto_finds_the_daemon(hc: ModuleType, http_port: int,
                                           tmp_path: Path) -> None:
    tini = ["/usr/bin/tini", "--", "/usr/local/bin/shoal-entrypoint", "peer"]
    coord = _fake_proc(tmp_path / "a", tini, ["/usr/local/bin/python3", "/usr/local/bin/shoal",
                                              "coordinator", "--http-port", str(http_port)])
    ok, why = hc.probe_auto(2.0, proc=coord)
    assert ok, why
    peer = _fake_proc(tmp_path / "b", ["python3", "-m", "shoal.cli", "peer", "--host", "0.0.0.0",
                                       f"--port={_closed_port()}"])
    ok, why = hc.probe_auto(2.0, proc=peer)
    assert not ok and "refused" in why.lower()
    nothing = _fake_proc(tmp_path / "d", tini)
    assert hc.probe_auto(2.0, proc=nothing) == (False, "no shoal process in this container")


def test_healthcheck_peer_asks_the_coordinator_for_its_state(
        hc: ModuleType, http_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from protocols.identity import Identity

    key = tmp_path / "peer.key"
    me = Identity.generate()
    me.save(key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Coordinator)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    coord = f"127.0.0.1:{server.server_address[1]}"
    token = tmp_path / "http.token"
    token.write_text("s3cret\n")
    monkeypatch.setenv("SHOAL_COORDINATOR_HTTP", coord)
    monkeypatch.setenv("SHOAL_HTTP_TOKEN_FILE", str(token))
    # the peer's gRPC port is the test's HTTP server: it accepts connections
    proc = _fake_proc(tmp_path / "p", ["/usr/local/bin/shoal", "peer", "--coordinator",
                                       "coordinator:7000", "--port", str(http_port),
                                       "--identity", str(key)])
    row = {"peer_id": me.peer_id, "stage": 1, "state": "training", "live": True, "step": 12}
    try:
        _Coordinator.doc = {"peers": [{"peer_id": "0" * 16, "live": True}, row]}
        ok, why = hc.probe_auto(2.0, proc=proc)
        assert ok and f"peer {me.peer_id}: stage 1, training, step 12" == why
        assert _Coordinator.auth[-1] == "Bearer s3cret"
        _Coordinator.doc = {"peers": [dict(row, live=False, state="lost")]}
        ok, why = hc.probe_auto(2.0, proc=proc)
        assert not ok and "lost, not live" in why
        _Coordinator.doc = {"peers": []}
        ok, why = hc.probe_auto(2.0, proc=proc)
        assert not ok and "not a member" in why
    finally:
        server.shutdown()
        server.server_close()
    # the coordinator gone: the peer is not blamed for it (Swarm would replace every peer)
    ok, why = hc.probe_auto(2.0, proc=proc)
    assert ok and "not answering" in why
    # no key yet: the peer has not started its join
    key.unlink()
    ok, why = hc.probe_auto(2.0, proc=proc)
    assert not ok and "no identity key" in why
