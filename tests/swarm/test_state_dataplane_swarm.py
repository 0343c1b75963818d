"""A late joiner takes its state over the data plane in a real swarm over mTLS (issue #15).

Real processes on 127.0.0.1 (shoal/swarm.py via tests/swarm/conftest.py), run with
SHOAL_TLS_ON_LOOPBACK=1 so that every link is mTLS as between machines, and
SHOAL_STATE_DATAPLANE_MIN_BYTES=0 so that the tiny model's state goes over the data plane (a
peer sends states of 8 MiB and more that way): the peer daemon runs its DataPlaneServer with its
leaf, the joiner asks for the data plane and BLAKE3, checks the payload as it lands, and its
state then equals its source replica's (same step, same hash).
"""

from __future__ import annotations

import pytest

from tests.swarm.local_swarm import join_late_and_check, spec_with

pytestmark = pytest.mark.slow


def test_late_joiner_takes_its_state_over_the_mtls_data_plane(swarm_factory, monkeypatch
                                                              ) -> None:
    monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")  # the processes inherit both
    monkeypatch.setenv("SHOAL_STATE_DATAPLANE_MIN_BYTES", "0")
    swarm = swarm_factory(spec_with(), [0, 1, 2])
    log = join_late_and_check(swarm)
    assert "downloaded state" in log
    assert "over the data plane (mTLS, blake3 digest)" in log, log[-3000:]
    assert "data plane at 127.0.0.1" in (swarm.logs / "peer2.log").read_text()
