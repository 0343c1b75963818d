"""`shoal export` of a live swarm takes every stage over the peers' data planes, on the ports
`shoal peer --dataplane-port` fixed (issue #15).

Real processes on 127.0.0.1 (shoal/swarm.py via tests/swarm/conftest.py), every link mTLS as
between machines (SHOAL_TLS_ON_LOOPBACK=1) and states of any size sent over the data plane
(SHOAL_STATE_DATAPLANE_MIN_BYTES=0: the tiny model's are under the 8 MiB threshold). The run
stops at its last step, so two exports read the same states.

Checked: each peer's data plane listens on the port it was given (its log, a TCP connect); an
export, run in this process, receives each stage over the data plane with mTLS (its log lines);
with the data planes' ports refused (a firewall that rejects: `socket.create_connection` to
those ports fails in this process), the export falls back in-band and writes the same weights.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peer.recovery import transfer
from protocols.identity import Identity
from shoal.export import export_to
from tests.swarm.dataplane_ports import add_peer_at_dataplane_port
from tests.swarm.local_swarm import spec_with, step_of, wait_for, wait_replicas_agree

pytestmark = pytest.mark.slow

STEPS = 4


def weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("model*.safetensors"))
    assert files, f"no weights in {out}"
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def test_export_over_the_data_plane_at_fixed_ports_and_in_band_when_refused(
        swarm_factory, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")  # the processes inherit both
    monkeypatch.setenv("SHOAL_STATE_DATAPLANE_MIN_BYTES", "0")
    swarm = swarm_factory(spec_with(**{"run.steps": STEPS}), [])
    ports = [add_peer_at_dataplane_port(swarm, i, ["--stage", str(i), "--grace", "10"],
                                        tls=True)[1] for i in range(3)]  # stage i
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens there
    wait_for(f"{STEPS} steps", lambda: step_of(swarm) >= STEPS, 180, swarm)
    wait_replicas_agree(swarm, {0: 1, 1: 1, 2: 1}, 60, step=STEPS)

    ident = Identity.load_or_create(tmp_path / "export.key")
    token = swarm.token_file.read_text().strip()
    coordinator = f"127.0.0.1:{swarm.port}"
    transfer._IN_BAND_ONLY.clear()
    with caplog.at_level(logging.INFO, "shoal.peer"):
        asyncio.run(export_to(tmp_path / "dataplane", coordinator, ident, token))
    over = [r.getMessage() for r in caplog.records if "over the data plane" in r.getMessage()]
    for stage in range(3):
        assert any(m.startswith(f"state of stage {stage} from ") and
                   m.endswith("(mTLS, blake3 digest)") for m in over), over

    refused = set(ports)
    connect = socket.create_connection

    def firewall(address, *args, **kwargs):
        if address[1] in refused:
            raise ConnectionRefusedError(f"refused {address[0]}:{address[1]} (the test's "
                                         "firewall)")
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", firewall)
    transfer._IN_BAND_ONLY.clear()
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, "shoal.peer"):
            asyncio.run(export_to(tmp_path / "in-band", coordinator, ident, token))
    finally:
        transfer._IN_BAND_ONLY.clear()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "over the data plane" in m], messages
    assert sum("its data plane failed" in m and "the test's firewall" in m
               for m in messages) == 3, messages

    a, b = weights(tmp_path / "dataplane"), weights(tmp_path / "in-band")
    assert set(a) == set(b) and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
