"""The status document's `join` field (coordinator/http.py, join_info): the command a peer machine
runs, as the dashboard's "waiting for peers" shows it. The token-file case against a real
coordinator is in test_dashboard_states.py; here the other admissions and transports."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from coordinator.status_doc import join_info
from protocols.identity import Identity
from tests.sim_peer import CoordinatorProcess

FP = "sha256:" + "ab" * 32


def svc(address: str, *, tls: bool, token_file: str = "", ca: bool = True) -> SimpleNamespace:
    return SimpleNamespace(grpc_address=address, tls=tls, join_token_file=token_file,
                           ca=SimpleNamespace(fingerprint=FP) if ca else None)


def test_token_file_by_name_and_tls() -> None:
    j = join_info(svc("198.18.0.5:7000", tls=True, token_file="/srv/shoal/state/join.token"))
    assert j == {"coordinator": "198.18.0.5:7000", "fingerprint": FP,
                 "token_file": "/srv/shoal/state/join.token",
                 "command": "shoal peer --coordinator 198.18.0.5:7000 --token-file join.token"}


def test_allow_list_only_pins_the_fingerprint_and_plaintext_says_so() -> None:
    j = join_info(svc("198.18.0.5:7000", tls=False))
    assert j["token_file"] is None
    assert j["command"] == ("shoal peer --coordinator 198.18.0.5:7000 "
                            f"--coordinator-fingerprint {FP} --plaintext")


def test_loopback_plaintext_is_not_a_flag_and_no_address_no_command() -> None:
    j = join_info(svc("127.0.0.1:7000", tls=False, token_file="t"))
    assert j["command"] == "shoal peer --coordinator 127.0.0.1:7000 --token-file t"
    j = join_info(svc("", tls=False, ca=False))
    assert j == {"coordinator": None, "fingerprint": None, "token_file": None, "command": None}


def test_a_real_allow_list_coordinator_serves_the_fingerprint_command(tmp_path: Path) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text(Identity.generate().public_key.hex() + "\n")
    with CoordinatorProcess(tmp_path / "state", extra=["--allow-file", str(allow)]) as coord, \
            urllib.request.urlopen(coord.http_url + "api/status", timeout=10) as resp:
        j = json.loads(resp.read())["join"]
    assert j["coordinator"] == coord.grpc_address and j["token_file"] is None
    assert j["fingerprint"].startswith("sha256:")
    assert j["command"] == (f"shoal peer --coordinator {coord.grpc_address} "
                            f"--coordinator-fingerprint {j['fingerprint']}")
