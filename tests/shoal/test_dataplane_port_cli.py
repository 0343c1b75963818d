"""`shoal peer --dataplane-port PORT` (or SHOAL_DATAPLANE_PORT): the data plane's port, fixed so
an operator can open or forward it beside --port.

Checked: the option's default (0, any free port), the environment variable, bad values refused
by the parser; a peer process given a port serves its data plane there (a coordinator and one
peer on 127.0.0.1); a port already taken stops the peer at start, before it joins, with a clear
error and no traceback. (`shoal export` over such data planes: tests/swarm/
test_export_dataplane_swarm.py.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peer.listening import check_dataplane_port as _check_dataplane_port
from shoal.cli import build_parser
from shoal.swarm import Swarm, free_port
from tests.swarm.dataplane_ports import add_peer_at_dataplane_port
from tests.swarm.local_swarm import spec_with


def test_the_option_defaults_to_any_free_port_and_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("SHOAL_DATAPLANE_PORT", raising=False)
    assert build_parser().parse_args(["peer"]).dataplane_port == 0
    assert build_parser().parse_args(["peer", "--dataplane-port", "7101"]).dataplane_port == 7101
    monkeypatch.setenv("SHOAL_DATAPLANE_PORT", "7201")
    assert build_parser().parse_args(["peer"]).dataplane_port == 7201
    assert build_parser().parse_args(["peer", "--dataplane-port", "0"]).dataplane_port == 0


@pytest.mark.parametrize("value", ["-1", "65536", "http", "7000.5"])
def test_a_bad_port_is_refused_by_the_parser(value, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SHOAL_DATAPLANE_PORT", raising=False)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["peer", "--dataplane-port", value])
    assert exc.value.code == 2
    assert f"argument --dataplane-port: {value!r} is not a port" in capsys.readouterr().err
    monkeypatch.setenv("SHOAL_DATAPLANE_PORT", value)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer"])


def test_the_check_before_joining() -> None:
    _check_dataplane_port("127.0.0.1", 0)  # any free port: nothing to check
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"cannot serve the data plane on 127\.0\.0\.1:"
                           rf"{port} \(Address already in use\): pick another "
                           r"--dataplane-port"):
            _check_dataplane_port("127.0.0.1", port)
    _check_dataplane_port("127.0.0.1", port)  # free again


def test_a_taken_port_stops_the_peer_before_it_joins(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "peer", "--coordinator",
             f"127.0.0.1:{free_port()}", "--host", "127.0.0.1", "--plaintext", "--identity",
             str(tmp_path / "peer.key"), "--dataplane-port", str(port)],
            capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert (f"shoal peer: cannot serve the data plane on 127.0.0.1:{port} (Address already in "
            "use): pick another --dataplane-port (or SHOAL_DATAPLANE_PORT), or 0 for any free "
            "one") in out
    assert "Traceback" not in out and "joined" not in out


def test_a_peer_serves_its_data_plane_on_the_port_given(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path / "swarm", spec_with(), 0, None, "cpu")
    try:
        swarm.start(0)
        _, port = add_peer_at_dataplane_port(swarm, 0, ["--stage", "0"])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens there
    finally:
        swarm.stop(grace=5)
